"""How identifiers are allocated and how room events reach members.

A broker is the boundary between one process and the service: `LocalBroker` serves a
single process from memory. Room logic (`rooms.py`) and the protocol do not change with the
broker; only where ROOM_REF and JOIN_ID come from and the order in which `RoomEvent`s are
applied do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from attrs import define, field

from trio_chat.rooms import Outcome, Registry, RoomEvent, Session


class Broker(Protocol):
    """What the server needs from a broker."""

    registry: Registry

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


@define
class LocalBroker:
    """The single-process broker: identifiers from counters in memory, events applied at once."""

    registry: Registry = field(factory=Registry)

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
        room_ref = self.registry.allocate_room(room_name)
        return self.registry.join(
            session, room_ref, client_name, server_ip=server_ip, server_port=server_port
        )

    def publish(self, events: Iterable[RoomEvent]) -> None:
        """Apply each event now: every member has it queued before this returns."""
        apply = self.registry.apply
        for event in events:
            apply(event)
