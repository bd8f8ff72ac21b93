"""What travels on a room's channel, and what one node knows of the room's sequence.

A message is ``<epoch> <seq>\\n<origin> <number>\\n`` followed by frames. The first line is
the room's (added by the script that publishes); the second names the node that published the
batch and its own count of batches for the room, so a batch published twice (a retry after a
timeout whose first attempt went through after all) is applied once. Each frame is one event:
a header line, then the client name (joins only) and the bytes the members receive.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import attrs

JOIN, LEAVE, CHAT = b"J", b"L", b"C"


@attrs.frozen
class Frame:
    """One event. `session` is the publishing node's number for the connection, `token` its
    number for the event (0 when no node waits for it)."""

    kind: bytes
    session: int
    token: int
    name: str
    data: bytes

    def encode(self) -> bytes:
        """A header line of numbers and sizes, then the name and the data."""
        name = self.name.encode()
        header = b"%s %d %d %d %d\n" % (
            self.kind,
            self.session,
            self.token,
            len(name),
            len(self.data),
        )
        return header + name + self.data


def decode_frames(payload: bytes, start: int = 0) -> Iterator[Frame]:
    """The frames of a message body from `start` on."""
    while start < len(payload):
        end = payload.index(b"\n", start)
        kind, session, token, name_size, data_size = payload[start:end].split(b" ")
        name_end = end + 1 + int(name_size)
        data_end = name_end + int(data_size)
        name = payload[end + 1 : name_end].decode()
        yield Frame(kind, int(session), int(token), name, payload[name_end:data_end])
        start = data_end


@attrs.frozen
class Message:
    """One message of a room's channel or log."""

    epoch: bytes
    seq: int
    origin: bytes
    number: int
    body: bytes
    frames_start: int

    @classmethod
    def decode(cls, data: bytes) -> Message:
        """Parse the two header lines; the frames are decoded when applied."""
        first = data.index(b"\n")
        second = data.index(b"\n", first + 1)
        epoch, seq = data[:first].split(b" ")
        origin, number = data[first + 1 : second].split(b" ")
        return cls(epoch, int(seq), origin, int(number), data, second + 1)

    def frames(self) -> Iterator[Frame]:
        """The events of the batch, in publishing order."""
        return decode_frames(self.body, self.frames_start)


@attrs.define(eq=False)
class Feed:
    """One room as this node receives it: where its sequence stands and what waits.

    A message is applied when its number is the next one (`seq` + 1) of the current epoch;
    a later number means a gap, filled from the room's log before anything else is applied.
    """

    ref: int
    channel: str
    epoch: bytes | None = None
    seq: int = 0
    synced: bool = False
    """The starting point (`epoch`, `seq`) is known and the subscription confirmed."""
    syncing: bool = False
    """Reading the log; messages received meanwhile wait in `received`."""
    received: list[Message] = attrs.field(factory=list)
    ready: collections.deque[tuple[bytes, Frame]] = attrs.field(factory=collections.deque)
    """Events (with their origin) in the room's order, not yet applied: an event of this
    node's own is held
    until its connection's earlier events elsewhere are applied."""
    origins: dict[bytes, int] = attrs.field(factory=dict)
    """Per publishing node, the last batch number applied."""
    interest: int = 0
    """Joins under way here and own events not yet applied: while above zero, or while the
    room has members here, the node stays subscribed."""

    def accept(self, message: Message) -> bool:
        """Take `message` if it is the next one; False if there is a gap to fill first."""
        if message.epoch != self.epoch:
            # The room's first message since this node subscribed; any other change of epoch
            # is for the log to sort out (what was lost, whose request it was).
            if self.epoch is not None or message.seq != 1:
                return False
            self.epoch, self.seq = message.epoch, 0
        if message.seq <= self.seq:
            return True  # already applied
        if message.seq > self.seq + 1:
            return False
        self.seq = message.seq
        if message.number:  # 0: not a node's batch (a dead node's departures)
            if message.number <= self.origins.get(message.origin, 0):
                return True  # a batch published twice: its second copy
            self.origins[message.origin] = message.number
        self.ready.extend((message.origin, frame) for frame in message.frames())
        return True
