"""How identifiers are allocated and how room events reach members.

A broker is the boundary between one process and the service: `LocalBroker` serves a single
process from memory; `redis_broker.RedisBroker` makes several processes one service. Room logic
(`rooms.py`) and the protocol do not change with the broker; only where ROOM_REF and JOIN_ID
come from and the order in which `RoomEvent`s are applied do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from attrs import define, field

from trio_chat.rooms import Outcome, Registry, RoomEvent, Session


class Broker(Protocol):
    """What the server needs from a broker."""

    registry: Registry
    on_kill: Callable[[str], None]
    """Called when KILL_SERVICE reaches this process from elsewhere in the service."""

    def check_available(self) -> None:
        """Raise `ProtocolError` (error 6) if requests cannot be served right now."""
        ...

    async def join(
        self,
        session: Session,
        room_name: str,
        client_name: str,
        *,
        server_ip: str,
        server_port: int,
    ) -> Outcome:
        """Allocate what a JOIN needs (ROOM_REF, JOIN_ID) and record the membership."""
        ...

    def publish(self, events: Iterable[RoomEvent]) -> None:
        """Have `events` applied, in order, wherever their rooms' members are."""
        ...

    def reply(self, session: Session, data: bytes) -> None:
        """Send `data` to `session` after every event it published before."""
        ...

    def then(self, session: Session, action: Callable[[], None]) -> None:
        """Call `action` once every event `session` published before is applied."""
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

    def check_available(self) -> None:
        """Memory is always available."""

    async def join(
        self,
        session: Session,
        room_name: str,
        client_name: str,
        *,
        server_ip: str,
        server_port: int,
    ) -> Outcome:
        """Join `room_name`, creating it on first use."""
        self.registry.check_room_limit(session, room_name)
        room_ref = self.registry.allocate_room(room_name)
        return self.registry.join(
            session, room_ref, client_name, server_ip=server_ip, server_port=server_port
        )

    def publish(self, events: Iterable[RoomEvent]) -> None:
        """Apply each event now: every member has it queued before this returns."""
        apply = self.registry.apply
        for event in events:
            apply(event)

    def reply(self, session: Session, data: bytes) -> None:
        """Send at once: events are applied as they are published, so none is pending."""
        session.recipient.push(data)

    def then(self, session: Session, action: Callable[[], None]) -> None:
        """Call `action` at once, for the same reason."""
        action()

    def kill_service(self, reason: str) -> None:
        """Nothing to do: this process is the whole service."""

    def release(self, session: Session) -> None:
        """Nothing to do: no state outlives the session's memberships."""
