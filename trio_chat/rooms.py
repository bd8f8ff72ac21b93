"""Rooms and memberships: the synchronous core that decides what is sent to whom.

No trio here and no awaiting: each method runs to completion, so no other task can see a room
half-updated and no locks are needed. A request is handled in two steps:

1. A `Registry` method checks the request against the connection's own view of its rooms,
   updates that view, and returns the reply for the requester and the `RoomEvent` the request
   causes (an announcement or a chat line).
2. `Registry.apply` carries a `RoomEvent` out: it changes the room's delivery list and hands
   the event's bytes to every member's `Recipient`.

The broker sits between the two (see `broker.py`): in one process it applies each event at
once; across processes it applies events in the order a shared bus delivers them, so every
member everywhere sees one order. The requester's view changes at step 1, so a CHAT pipelined
right behind a JOIN is accepted whichever broker is in use.
"""

from __future__ import annotations

from typing import Protocol

from attrs import define, field, frozen

from trio_chat import protocol
from trio_chat.protocol import ErrorCode, ProtocolError


class Recipient(Protocol):
    """The sending side of a connection, as rooms see it."""

    def push(self, data: bytes) -> None:
        """Queue `data` to be sent; never blocks, never raises."""


@define(eq=False)
class Session:
    """One connection's standing in the rooms: its JOIN_ID and the rooms it has joined."""

    recipient: Recipient
    join_id: int | None = None
    rooms: dict[int, str] = field(factory=dict)
    """ROOM_REF -> the name the connection joined that room with."""


@define(eq=False)
class Room:
    """A chat room. Rooms are never deleted: a ROOM_REF is never reused."""

    ref: int
    name: str
    members: dict[Recipient, None] = field(factory=dict)
    """Who receives the room's broadcasts, in joining order (a dict as an ordered set)."""


@frozen
class RoomEvent:
    """One broadcast to a room, with the membership change it carries.

    A joiner becomes a member just before the announcement is delivered (so it receives it);
    a leaver stops being one just after (so it receives its own leave announcement too).
    """

    room_ref: int
    data: bytes
    joining: Session | None = None
    leaving: Session | None = None
    sender: Session | None = None
    """Whose request caused the event, when no one joins or leaves (a CHAT)."""
    welcome: bytes | None = None
    """For the joiner alone, just before the announcement: the JOINED reply. Delivered with
    the event rather than as a reply, so that wherever events are ordered (a shared bus),
    the joiner's membership begins exactly when it is told it has joined."""


@frozen
class Outcome:
    """What a request causes: a reply to the requester, then events for the rooms."""

    reply: bytes | None = None
    events: tuple[RoomEvent, ...] = ()


@define
class Registry:
    """Every room of the service, by name and by ROOM_REF, and the identifier counters."""

    max_rooms_per_session: int = 1_000
    max_rooms: int = 100_000
    _by_name: dict[str, Room] = field(factory=dict, init=False)
    _by_ref: dict[int, Room] = field(factory=dict, init=False)
    _next_join_id: int = field(default=0, init=False)
    deliveries: int = field(default=0, init=False)
    """Messages `apply` has handed to members (one per member and event), counted per event
    rather than per member so that counting costs fan-out nothing."""

    # -- identifiers -----------------------------------------------------------------------

    def room_ref_for(self, room_name: str) -> int | None:
        """The ROOM_REF of `room_name`, or None if no one ever joined it."""
        room = self._by_name.get(room_name)
        return None if room is None else room.ref

    def allocate_room(self, room_name: str) -> int:
        """The ROOM_REF of `room_name`, creating the room with the next free ROOM_REF."""
        room = self._by_name.get(room_name)
        if room is None:
            room = self.add_room(len(self._by_ref), room_name)
        return room.ref

    def add_room(self, room_ref: int, room_name: str) -> Room:
        """Record a room whose ROOM_REF was allocated elsewhere (or return the known one)."""
        room = self._by_ref.get(room_ref)
        if room is None:
            room = self._by_name[room_name] = self._by_ref[room_ref] = Room(room_ref, room_name)
        return room

    def allocate_join_id(self) -> int:
        """The next unused JOIN_ID."""
        join_id = self._next_join_id
        self._next_join_id += 1
        return join_id

    def room(self, room_ref: int) -> Room | None:
        """The room with `room_ref`, if it exists here."""
        return self._by_ref.get(room_ref)

    def room_name(self, room_ref: int) -> str:
        """The name of the room with `room_ref`, which must exist."""
        return self._by_ref[room_ref].name

    def room_count(self) -> int:
        """How many rooms exist."""
        return len(self._by_ref)

    def room_names(self) -> list[tuple[str, int]]:
        """Every room as (name, ROOM_REF)."""
        return [(room.name, room.ref) for room in self._by_ref.values()]

    # -- requests (step 1) -----------------------------------------------------------------

    def check_room_limit(self, session: Session, room_name: str) -> None:
        """Raise error 5 if joining `room_name` would take `session` past its room limit,
        or create a room beyond the service's.

        Brokers call it before allocating anything, so a refused JOIN creates no room.
        """
        room_ref = self.room_ref_for(room_name)
        if room_ref is None and len(self._by_ref) >= self.max_rooms:
            raise ProtocolError(
                ErrorCode.LIMIT_REACHED, f"the service has its maximum of {self.max_rooms} rooms"
            )
        if room_ref in session.rooms or len(session.rooms) < self.max_rooms_per_session:
            return
        raise ProtocolError(
            ErrorCode.LIMIT_REACHED,
            f"a connection may be in at most {self.max_rooms_per_session} rooms",
        )

    def join(
        self,
        session: Session,
        room_ref: int,
        client_name: str,
        *,
        server_ip: str,
        server_port: int,
    ) -> Outcome:
        """JOIN_CHATROOM for a room whose ROOM_REF is known (see `allocate_room`)."""
        room = self._by_ref[room_ref]
        self.check_room_limit(session, room.name)
        if session.join_id is None:
            session.join_id = self.allocate_join_id()
        session.rooms[room_ref] = client_name
        welcome = protocol.encode_joined(
            room.name, server_ip, server_port, room_ref, session.join_id
        )
        announcement = protocol.encode_joined_announcement(room_ref, client_name)
        return Outcome(
            events=(RoomEvent(room_ref, announcement, joining=session, welcome=welcome),)
        )

    def leave(
        self,
        session: Session,
        room_ref: int,
        join_id: int,
        *,
        written: tuple[str, str] | None = None,
    ) -> Outcome:
        """LEAVE_CHATROOM: the same LEFT reply whether or not the connection is in the room.

        The reply echoes `written`, the ROOM_REF and JOIN_ID as the request spelled them,
        when given.
        """
        reply = protocol.encode_left(*(written or (room_ref, join_id)))
        name = session.rooms.pop(room_ref, None)
        if name is None:
            return Outcome(reply)
        announcement = protocol.encode_left_announcement(room_ref, name)
        return Outcome(reply, (RoomEvent(room_ref, announcement, leaving=session),))

    def chat(self, session: Session, room_ref: int, client_name: str, message: str) -> Outcome:
        """CHAT: broadcast to every member, the sender included; JOIN_ID is not checked."""
        if room_ref not in self._by_ref:
            # NO_SUCH_ID stands for a number too large to be any room's: do not name it.
            which = "that ROOM_REF" if room_ref == protocol.NO_SUCH_ID else f"ROOM_REF {room_ref}"
            raise ProtocolError(ErrorCode.NO_SUCH_ROOM, f"no room has {which}")
        if room_ref not in session.rooms:
            raise ProtocolError(ErrorCode.NOT_A_MEMBER, f"not a member of room {room_ref}")
        return Outcome(
            events=(
                RoomEvent(
                    room_ref, protocol.encode_chat(room_ref, client_name, message), sender=session
                ),
            )
        )

    def disconnect(self, session: Session) -> Outcome:
        """Leave every room, in ascending ROOM_REF order, announcing each departure."""
        events = tuple(
            RoomEvent(
                ref, protocol.encode_left_announcement(ref, session.rooms[ref]), leaving=session
            )
            for ref in sorted(session.rooms)
        )
        session.rooms.clear()
        return Outcome(events=events)

    # -- delivery (step 2) -----------------------------------------------------------------

    def apply(self, event: RoomEvent) -> None:
        """Carry out `event`: change the room's members and deliver the bytes to each."""
        room = self._by_ref[event.room_ref]
        members = room.members
        if event.joining is not None:
            recipient = event.joining.recipient
            members[recipient] = None
            if event.welcome is not None:
                recipient.push(event.welcome)
                self.deliveries += 1
        data = event.data
        for recipient in members:
            recipient.push(data)
        self.deliveries += len(members)
        if event.leaving is not None:
            members.pop(event.leaving.recipient, None)
