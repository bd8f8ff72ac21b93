"""How requests that touch rooms are carried out, and how room events reach members.

A broker is the boundary between one process and the service, with one entry point per
request that touches rooms: `join`, `leave`, `chat`, `disconnect`. `LocalBroker` serves a
single process from memory; `trio_chat.redis.RedisBroker` makes several processes one service.
Room logic (`rooms.py`) and the protocol do not change with the broker; only where ROOM_REF and
JOIN_ID come from and when the resulting `RoomEvent`s are applied do.

Replies go through the broker too (`reply`): with a shared bus, a connection's reply waits
until the broadcasts of its earlier requests have reached it, so every client sees the effects
of its own requests in request order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from attrs import define, field

from trio_chat.config import Config
from trio_chat.protocol import Chat, Join, Leave
from trio_chat.rooms import Registry, Session


def registry_for(config: Config) -> Registry:
    """An empty registry with the limits `config` sets."""
    return Registry(
        max_rooms_per_session=config.max_rooms_per_connection, max_rooms=config.max_rooms
    )


class Broker(Protocol):
    """What the server needs from a broker. Requests raise `ProtocolError` for an error reply."""

    registry: Registry
    on_kill: Callable[[str], None]
    """Called when KILL_SERVICE reaches this process from elsewhere in the service."""
    on_round_trip: Callable[[float], None]
    """Called with the seconds one of this process's events took from being published on a
    shared bus to coming back (for metrics); never, without a bus."""

    async def join(
        self, session: Session, request: Join, *, server_ip: str, server_port: int
    ) -> None:
        """JOIN_CHATROOM: the room's ROOM_REF (allocated on first use), then the membership."""
        ...

    def leave(self, session: Session, request: Leave) -> None:
        """LEAVE_CHATROOM."""
        ...

    def chat(self, session: Session, request: Chat) -> None:
        """CHAT."""
        ...

    def disconnect(self, session: Session) -> None:
        """Leave every room of `session` (DISCONNECT, or the connection's end)."""
        ...

    def reply(self, session: Session, data: bytes) -> None:
        """Send `data` to `session` after the broadcasts of its earlier requests."""
        ...

    def then(self, session: Session, action: Callable[[], None]) -> None:
        """Call `action` once the broadcasts of `session`'s earlier requests reached it."""
        ...

    def kill_service(self, reason: str) -> None:
        """Have every other process of the service stop too."""
        ...

    def release(self, session: Session) -> None:
        """The connection of `session` has ended (after leaving its rooms)."""
        ...


@define
class LocalBroker:
    """The single-process broker: identifiers from counters in memory, events applied at once."""

    registry: Registry = field(factory=Registry)
    on_kill: Callable[[str], None] = lambda reason: None
    on_round_trip: Callable[[float], None] = lambda seconds: None

    async def join(
        self, session: Session, request: Join, *, server_ip: str, server_port: int
    ) -> None:
        """Join the room, creating it on first use; the JOINED reply comes with the event."""
        registry = self.registry
        registry.check_room_limit(session, request.room_name)
        room_ref = registry.allocate_room(request.room_name)
        outcome = registry.join(
            session, room_ref, request.client_name, server_ip=server_ip, server_port=server_port
        )
        for event in outcome.events:
            registry.apply(event)

    def leave(self, session: Session, request: Leave) -> None:
        """Reply LEFT_CHATROOM, then announce the departure."""
        outcome = self.registry.leave(
            session, request.room_ref, request.join_id, written=request.written
        )
        if outcome.reply is not None:
            session.recipient.push(outcome.reply)
        for event in outcome.events:
            self.registry.apply(event)

    def chat(self, session: Session, request: Chat) -> None:
        """Broadcast to every member at once."""
        outcome = self.registry.chat(
            session, request.room_ref, request.client_name, request.message
        )
        for event in outcome.events:
            self.registry.apply(event)

    def disconnect(self, session: Session) -> None:
        """Announce each departure, in ascending ROOM_REF order."""
        for event in self.registry.disconnect(session).events:
            self.registry.apply(event)

    def reply(self, session: Session, data: bytes) -> None:
        """Send at once: every event is applied as it is caused, so none is pending."""
        session.recipient.push(data)

    def then(self, session: Session, action: Callable[[], None]) -> None:
        """Call `action` at once, for the same reason."""
        action()

    def kill_service(self, reason: str) -> None:
        """Nothing to do: this process is the whole service."""

    def release(self, session: Session) -> None:
        """Nothing to do: no state outlives the session's memberships."""
