"""What a benchmark run sends: the shape of the load, the named scenarios, and the bytes of
every message, laid out so that a whole chunk of them can be checked at once."""

from __future__ import annotations

from attrs import define, field, frozen


class BenchError(Exception):
    """The benchmark could not be set up or run (not a wrong delivery: those are counted)."""


@frozen(kw_only=True)
class Load:
    """The shape of one benchmark run."""

    rooms: int = 1
    members: int = 10
    """Member connections per room, senders included."""
    senders: int = 1
    """Senders per room: the last `senders` members."""
    messages: int = 1000
    """Messages per sender."""
    size: int = 64
    """Bytes of message text (a marker, padded with 'x')."""
    rate: float = 0.0
    """Messages per second per sender; 0 sends as fast as the window allows."""
    window: int = 64
    """Most messages of one sender sent but not yet seen by member 0 of its room; 0: no limit."""

    @property
    def expected(self) -> int:
        """Deliveries a correct server makes: every message to every member but its sender."""
        return self.rooms * self.senders * self.messages * (self.members - 1)

    def problem(self) -> str | None:
        """What makes this load impossible to run, or None."""
        if self.members < 2 or not 1 <= self.senders < self.members:
            return "need at least one sender and member 0 that only receives"
        if self.senders > MAX_SENDERS_PER_ROOM:
            return f"at most {MAX_SENDERS_PER_ROOM} senders per room"
        if min(self.rooms, self.messages, self.size) < 1 or self.rate < 0 or self.window < 0:
            return "rooms, messages and size must be positive; rate and window not negative"
        return None


# The scenarios of the comparison with other servers (docs/performance.md), with the same
# names and figures as the C load generator used there.
SCENARIOS: dict[str, Load] = {
    "big": Load(rooms=1, members=500, senders=2, messages=2000),
    "small": Load(rooms=10, members=50, senders=2, messages=2000),
    "paced": Load(rooms=10, members=50, senders=2, messages=1000, rate=100.0),
}

# Digits of sequence numbers: printable ASCII without '~' (the marker), split among the
# senders of a room so each has an alphabet of its own.
SYMBOLS = bytes(sorted(set(range(0x21, 0x7F)) - {ord("~")}))
MAX_SENDERS_PER_ROOM = len(SYMBOLS) // 2
NAME_PREFIX = "b"
"""Every member's CLIENT_NAME: this, then its number, zero-padded to one width."""


@frozen
class Digits:
    """How sequence numbers are written: `width` digits, each sender with its own alphabet."""

    base: int
    width: int
    alphabets: tuple[bytes, ...]
    others: tuple[bytes, ...]
    """Per sender: every byte that is not one of its digits (to delete with translate)."""
    columns: tuple[tuple[bytes, ...], ...]
    """Per sender, per digit position: that digit of 0, 1, ..., messages-1 in its alphabet."""

    @classmethod
    def for_load(cls, load: Load) -> Digits:
        base = len(SYMBOLS) // load.senders
        width = 1
        while base**width < load.messages:
            width += 1
        alphabets = tuple(SYMBOLS[i * base : (i + 1) * base] for i in range(load.senders))
        others = tuple(bytes(b for b in range(256) if b not in a) for a in alphabets)
        columns = tuple(
            tuple(
                bytes(alphabet[(q // base ** (width - 1 - j)) % base] for q in range(load.messages))
                for j in range(width)
            )
            for alphabet in alphabets
        )
        return cls(base, width, alphabets, others, columns)

    def encode(self, sender: int, seq: int) -> bytes:
        alphabet = self.alphabets[sender]
        return bytes(
            alphabet[(seq // self.base ** (self.width - 1 - j)) % self.base]
            for j in range(self.width)
        )

    def decode(self, digits: bytes) -> tuple[int, int] | None:
        """(sender, seq) from a digit field, or None if it is not one."""
        if len(digits) != self.width:
            return None
        sender = -1
        seq = 0
        for byte in digits:
            index = SYMBOLS.find(byte)
            if index < 0 or index // self.base >= len(self.alphabets):
                return None
            if sender < 0:
                sender = index // self.base
            elif index // self.base != sender:
                return None
            seq = seq * self.base + index % self.base
        return sender, seq


def payload_length(load: Load, digits: Digits) -> int:
    """Bytes of every message text of the run."""
    return max(load.size, digits.width + 2)


def message(digits: Digits, load: Load, sender: int, seq: int) -> bytes:
    """The text of message `seq` of `sender`: its digits between two marks, padded."""
    marker = b"~" + digits.encode(sender, seq) + b"~"
    return marker + b"x" * (payload_length(load, digits) - len(marker))


@define(eq=False)
class Room:
    """Per room: its ROOM_REF and the fixed layout of its CHAT frames."""

    index: int
    ref: int = -1
    frame_length: int = 0
    digit_offset: int = 0
    fixed: list[tuple[int, bytes]] = field(factory=list)
    """(offset, byte) that every frame of the room has: where it starts, its ROOM_REF, the
    mark after the digits, where it ends."""

    def lay_out(self, load: Load, digits: Digits, name_length: int) -> None:
        """Work out where everything is in this room's frames, once its ROOM_REF is known."""
        prefix = f"CHAT: {self.ref}\nCLIENT_NAME: {NAME_PREFIX}".encode()
        head = len(prefix) + name_length - len(NAME_PREFIX) + len("\nMESSAGE: ")
        self.digit_offset = head + 1
        self.frame_length = length = head + payload_length(load, digits) + 2
        after_digits = self.digit_offset + digits.width
        # Where a frame starts, its ROOM_REF and the newline after it, the mark after the
        # digits and the blank line: a frame out of place fails one of them.
        where = [0, *range(len("CHAT: "), len(f"CHAT: {self.ref}\n"))]
        where += [after_digits, length - 2, length - 1]
        template = prefix + b"0" * (name_length - len(NAME_PREFIX)) + b"\nMESSAGE: "
        template += message(digits, load, 0, 0) + b"\n\n"
        assert len(template) == length
        self.fixed = [(i, template[i : i + 1]) for i in where]
