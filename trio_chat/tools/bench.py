"""The ``trio-chat bench`` command: fan-out load against a running server, every delivery checked.

R rooms of M member connections each; the last S members of every room are senders, each
sending N CHAT messages, as fast as a window of unacknowledged messages allows or at a fixed
rate. Every member must receive every message of its room's other members exactly once and,
per sender, in order. The figures are deliveries per second (a delivery is one message
reaching one member other than its sender) and delivery latency.

A load generator must cost less per delivery than the server it measures, so the measured
phase is one plain ``epoll`` loop over non-blocking sockets rather than a trio task per
connection (a task wake-up per received chunk would cost as much as the server's whole
fan-out), and receivers check whole chunks with a few C-level byte operations instead of
parsing each message in Python:

- Every message of a room has the same length, so a chunk holds whole frames at fixed
  offsets and ``data[offset::frame_length]`` lifts one field out of every frame at once.
- A message carries its sequence number in digits of an alphabet that belongs to its sender
  alone. ``column.translate(None, others)`` keeps one sender's digits, in arrival order, and
  comparing them with the precomputed digits of the next expected sequence numbers proves,
  in one comparison per digit, that the chunk holds exactly that sender's next messages.
- Any chunk that fails the fast check is parsed frame by frame, which names what is wrong.

Latency is the time from a message's send to its arrival at each member; send times are
recorded per message by the sender and matched to arrivals after the run.
"""

from __future__ import annotations

import argparse
import array
import errno
import gc
import json
import math
import os
import re
import resource
import select
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TextIO

from attrs import define, evolve, field, frozen

if TYPE_CHECKING:
    # The subparsers object of the ``trio-chat`` command (argparse keeps the name private).
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

# -- what to run -------------------------------------------------------------------------------


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


# The scenarios of ../shared/bench/compare.sh, with the same names and figures.
SCENARIOS: dict[str, Load] = {
    "big": Load(rooms=1, members=500, senders=2, messages=2000),
    "small": Load(rooms=10, members=50, senders=2, messages=2000),
    "paced": Load(rooms=10, members=50, senders=2, messages=1000, rate=100.0),
}

# -- limits of the tool itself ------------------------------------------------------------------

SETUP_TIMEOUT = 60.0
"""Seconds allowed for connecting and joining every member (a large run joins tens of
thousands of members, one JOIN round trip each)."""
RUN_TIMEOUT = 60.0
"""Seconds allowed for the measured phase."""
IDLE_TIMEOUT = 10.0
"""End the measured phase early after this long without a single delivery: the server has
stopped delivering and waiting longer tells nothing more."""
TEARDOWN_GRACE = 2.0
"""Seconds to wait for the server to close connections after DISCONNECT (the server's own
disconnect grace is 2 s)."""
CONNECT_BATCH = 64
"""Connections being opened and joined at once during setup: enough to set up thousands of
members in seconds, few enough to stay well inside any listen backlog."""
RECEIVE_SIZE = 256 * 1024
"""Most bytes taken from one socket per read: a whole backlog of a busy member at once."""
SEND_BUFFER_LIMIT = 1024 * 1024
"""A sender stops producing while this many of its bytes are still unsent locally."""
PACED_MAX_EVENTS = 32
"""Socket events handled between two looks at the send schedule in a paced run."""
PROGRESS_INTERVAL = 0.25
"""Seconds between progress updates on a terminal (rewritten in place)."""
PROGRESS_LINE_INTERVAL = 1.0
"""Seconds between progress lines when stderr is not a terminal (a log, a CI job)."""

# Digits of sequence numbers: printable ASCII without '~' (the marker), split among the
# senders of a room so each has an alphabet of its own.
_SYMBOLS = bytes(sorted(set(range(0x21, 0x7F)) - {ord("~")}))
MAX_SENDERS_PER_ROOM = len(_SYMBOLS) // 2
_NAME_PREFIX = "b"
_FRAME = re.compile(rb"CHAT: ([0-9]+)\nCLIENT_NAME: ([^\n]*)\nMESSAGE: ([^\n]*)\n\n")


class BenchError(Exception):
    """The benchmark could not be set up or run (not a wrong delivery: those are counted)."""


# -- results ------------------------------------------------------------------------------------


@define(kw_only=True)
class Result:
    """What one run measured."""

    scenario: str
    load: Load
    connections: int = 0
    setup_s: float = 0.0
    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    self_echoes: int = 0
    slow_frames: int = 0
    """Frames that failed the chunk-wide check and were parsed one by one (0 when all is
    well: a chunk is re-checked slowly only when something in it is wrong)."""
    corrupt: int = 0
    misrouted: int = 0
    server_errors: int = 0
    disconnects: int = 0
    sent: int = 0
    wall_s: float = 0.0
    latency_us: dict[str, float] = field(factory=dict)
    send_lag_us: dict[str, float] = field(factory=dict)
    cpu_util: float = 0.0
    timed_out: bool = False
    first_error: str = ""

    @property
    def expected(self) -> int:
        """Deliveries a correct server makes."""
        return self.load.expected

    @property
    def lost(self) -> int:
        """Expected deliveries that never arrived."""
        return max(0, self.expected - self.delivered)

    @property
    def errors(self) -> int:
        """Corrupt or misrouted messages, server errors and dropped connections."""
        return self.corrupt + self.misrouted + self.server_errors + self.disconnects

    @property
    def ok(self) -> bool:
        """Every delivery arrived exactly once and in order, and nothing else went wrong."""
        return not (self.lost or self.errors or self.duplicates or self.out_of_order)

    @property
    def deliveries_per_s(self) -> float:
        """Deliveries over the measured window (first send to last delivery)."""
        return self.delivered / self.wall_s if self.wall_s > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        """The figures as one JSON object, with field names as fanout.c uses them."""
        load = self.load
        return {
            "scenario": self.scenario,
            "rooms": load.rooms,
            "members": load.members,
            "senders": load.senders,
            "messages": load.messages,
            "size": load.size,
            "rate": load.rate,
            "window": load.window,
            "connections": self.connections,
            "setup_s": round(self.setup_s, 6),
            "expected": self.expected,
            "delivered": self.delivered,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "errors": self.errors,
            "corrupt": self.corrupt,
            "misrouted": self.misrouted,
            "server_errors": self.server_errors,
            "disconnects": self.disconnects,
            "self_echoes": self.self_echoes,
            "slow_frames": self.slow_frames,
            "sent": self.sent,
            "wall_s": round(self.wall_s, 6),
            "deliveries_per_s": round(self.deliveries_per_s, 1),
            "latency_us": self.latency_us,
            "send_lag_us": self.send_lag_us,
            "cpu_util": round(self.cpu_util, 3),
            "timed_out": self.timed_out,
            "ok": self.ok,
            "first_error": self.first_error,
        }


# -- the wire format of the load --------------------------------------------------------------


@frozen
class _Digits:
    """How sequence numbers are written: `width` digits, each sender with its own alphabet."""

    base: int
    width: int
    alphabets: tuple[bytes, ...]
    others: tuple[bytes, ...]
    """Per sender: every byte that is not one of its digits (to delete with translate)."""
    columns: tuple[tuple[bytes, ...], ...]
    """Per sender, per digit position: that digit of 0, 1, ..., messages-1 in its alphabet."""

    @classmethod
    def for_load(cls, load: Load) -> _Digits:
        base = len(_SYMBOLS) // load.senders
        width = 1
        while base**width < load.messages:
            width += 1
        alphabets = tuple(_SYMBOLS[i * base : (i + 1) * base] for i in range(load.senders))
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
            index = _SYMBOLS.find(byte)
            if index < 0 or index // self.base >= len(self.alphabets):
                return None
            if sender < 0:
                sender = index // self.base
            elif index // self.base != sender:
                return None
            seq = seq * self.base + index % self.base
        return sender, seq


@define(eq=False)
class _Room:
    """Per room: its ROOM_REF and the fixed layout of its CHAT frames."""

    index: int
    ref: int = -1
    frame_length: int = 0
    digit_offset: int = 0
    fixed: list[tuple[int, bytes]] = field(factory=list)
    """(offset, byte) that every frame of the room has: where it starts, its ROOM_REF, the
    mark after the digits, where it ends."""


def _payload_length(load: Load, digits: _Digits) -> int:
    return max(load.size, digits.width + 2)


def _message(digits: _Digits, load: Load, sender: int, seq: int) -> bytes:
    marker = b"~" + digits.encode(sender, seq) + b"~"
    return marker + b"x" * (_payload_length(load, digits) - len(marker))


# -- connections --------------------------------------------------------------------------------

_CONNECTING, _JOINING, _JOINED, _BARRIER, _READY, _CLOSED = range(6)


@define(eq=False)
class _Conn:
    index: int
    room: _Room
    name: str
    sock: socket.socket
    sender: int = -1
    """Index of the sender among its room's senders, or -1 for a member that only receives."""
    state: int = _CONNECTING
    inbuf: bytes = b""
    carry: bytes = b""
    out: bytearray = field(factory=bytearray)
    join_id: int = -1
    pump: _Sender | None = None
    """The sender that sends on this connection, if any."""
    expect: list[int] = field(factory=list)
    """Per sender of the room: the next sequence number this member must receive."""
    missing: set[tuple[int, int]] = field(factory=set)
    """(sender, seq) skipped over: lost, unless they arrive late."""


@define(eq=False)
class _Sender:
    conn: _Conn
    number: int
    """Global sender number."""
    prefix: bytes = b""
    next_seq: int = 0
    acked: int = 0
    offset: float = 0.0
    sent_at: array.array[int] = field(factory=lambda: array.array("q"))


class _Poller:
    """epoll where there is one, poll elsewhere; timeouts in seconds."""

    IN = select.POLLIN
    OUT = select.POLLOUT

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._poll = None if self._epoll is not None else select.poll()

    def register(self, fd: int, mask: int) -> None:
        if self._epoll is not None:
            self._epoll.register(fd, mask)
        else:
            assert self._poll is not None
            self._poll.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        if self._epoll is not None:
            self._epoll.modify(fd, mask)
        else:
            assert self._poll is not None
            self._poll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        try:
            if self._epoll is not None:
                self._epoll.unregister(fd)
            else:
                assert self._poll is not None
                self._poll.unregister(fd)
        except (KeyError, OSError, ValueError):
            pass

    def poll(self, timeout: float, max_events: int = -1) -> list[tuple[int, int]]:
        timeout = max(0.0, timeout)
        if self._epoll is not None:
            return self._epoll.poll(timeout, max_events)
        assert self._poll is not None
        return self._poll.poll(math.ceil(timeout * 1000))

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


# -- progress -----------------------------------------------------------------------------------

Progress = Callable[[str], None]


def progress_printer(stream: TextIO, *, tty: bool) -> Progress:
    """A progress callback: one line rewritten in place on a terminal, else a line per call."""

    last = -math.inf

    def show(text: str) -> None:
        nonlocal last
        if tty:
            stream.write("\r\x1b[K" + text)
        elif time.monotonic() - last >= PROGRESS_LINE_INTERVAL:
            last = time.monotonic()
            stream.write(text + "\n")
        stream.flush()

    return show


# -- the run ------------------------------------------------------------------------------------


@define(eq=False)
class _Run:
    host: str
    port: int
    load: Load
    result: Result
    progress: Progress | None
    setup_timeout: float
    run_timeout: float
    idle_timeout: float
    digits: _Digits = field(init=False)
    rooms: list[_Room] = field(factory=list)
    conns: list[_Conn] = field(factory=list)
    by_fd: dict[int, _Conn] = field(factory=dict)
    senders: list[_Sender] = field(factory=list)
    poller: _Poller = field(factory=_Poller)
    arrivals: list[tuple[int, int, int, int]] = field(factory=list)
    """(arrival time ns, global sender, first seq, count) for each checked run of messages."""
    send_lag: array.array[int] = field(factory=lambda: array.array("q"))
    receive_buffer: bytearray = field(factory=lambda: bytearray(RECEIVE_SIZE))
    receive_view: memoryview = field(init=False)
    last_progress: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.digits = _Digits.for_load(self.load)
        self.receive_view = memoryview(self.receive_buffer)

    # errors and progress

    def note(self, text: str) -> None:
        if not self.result.first_error:
            self.result.first_error = text

    def progress_due(self) -> bool:
        return (
            self.progress is not None and time.monotonic() - self.last_progress >= PROGRESS_INTERVAL
        )

    def show(self, text: str) -> None:
        if self.progress is not None:
            self.last_progress = time.monotonic()
            self.progress(f"{self.result.scenario}: {text}")

    # setup

    def setup(self) -> None:
        load = self.load
        _raise_open_files_limit(load.rooms * load.members + 64)
        self.rooms = [_Room(r) for r in range(load.rooms)]
        width = len(str(load.rooms * load.members - 1))
        address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        family, _, _, _, sockaddr = address
        index = 0
        for room in self.rooms:
            for member in range(load.members):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                conn = _Conn(index, room, f"{_NAME_PREFIX}{index:0{width}d}", sock)
                conn.expect = [0] * load.senders
                position = member - (load.members - load.senders)
                if position >= 0:
                    conn.sender = position
                    conn.pump = _Sender(conn, len(self.senders))
                    self.senders.append(conn.pump)
                self.conns.append(conn)
                index += 1
        self.result.connections = len(self.conns)
        deadline = time.monotonic() + self.setup_timeout
        pending = iter(self.conns)
        opening = 0
        joined = 0
        while joined < len(self.conns):
            while opening < CONNECT_BATCH:
                new = next(pending, None)
                if new is None:
                    break
                self._connect(new, sockaddr)
                opening += 1
            if time.monotonic() > deadline:
                raise BenchError(f"setup timed out: {joined} of {len(self.conns)} members joined")
            for fd, events in self.poller.poll(0.1):
                conn = self.by_fd[fd]
                if conn.state == _CONNECTING:
                    self._connected(conn, events)
                elif conn.state == _JOINING:
                    if self._read_setup(conn) and conn.state == _JOINED:
                        opening -= 1
                        joined += 1
                else:
                    self._discard(conn)  # announcements of later joiners
            if self.progress_due():
                self.show(f"setup: {joined}/{len(self.conns)} members joined")
        # Every join announcement was queued by the server before the last JOINED reply went
        # out, so a HELO round trip on each connection drains them all.
        for conn in self.conns:
            conn.state = _BARRIER
            self._send(conn, b"HELO bench\n")
        ready = 0
        while ready < len(self.conns):
            if time.monotonic() > deadline:
                raise BenchError(f"setup timed out: {ready} of {len(self.conns)} members ready")
            for fd, _ in self.poller.poll(0.1):
                conn = self.by_fd[fd]
                if conn.state == _BARRIER and self._read_setup(conn) and conn.state == _READY:
                    ready += 1
            if self.progress_due():
                self.show(f"setup: {ready}/{len(self.conns)} members ready")
        for sender in self.senders:
            conn = sender.conn
            sender.prefix = (
                f"CHAT: {conn.room.ref}\nJOIN_ID: {conn.join_id}\nCLIENT_NAME: {conn.name}\n"
                "MESSAGE: "
            ).encode()
        name_length = len(self.conns[0].name)
        payload = _payload_length(self.load, self.digits)
        for room in self.rooms:
            prefix = f"CHAT: {room.ref}\nCLIENT_NAME: {_NAME_PREFIX}".encode()
            head = len(prefix) + name_length - len(_NAME_PREFIX) + len("\nMESSAGE: ")
            room.digit_offset = head + 1
            room.frame_length = length = head + payload + 2
            after_digits = room.digit_offset + self.digits.width
            # Where a frame starts, its ROOM_REF and the newline after it, the mark after the
            # digits and the blank line: a frame out of place fails one of them.
            where = [0, *range(len("CHAT: "), len(f"CHAT: {room.ref}\n"))]
            where += [after_digits, length - 2, length - 1]
            template = prefix + b"0" * (name_length - len(_NAME_PREFIX)) + b"\nMESSAGE: "
            template += _message(self.digits, self.load, 0, 0) + b"\n\n"
            assert len(template) == length
            room.fixed = [(i, template[i : i + 1]) for i in where]

    def _connect(self, conn: _Conn, sockaddr: Any) -> None:
        fd = conn.sock.fileno()
        self.by_fd[fd] = conn
        self.poller.register(fd, _Poller.OUT)
        code = conn.sock.connect_ex(sockaddr)
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            raise BenchError(f"cannot connect to {self.host}:{self.port}: {os.strerror(code)}")

    def _connected(self, conn: _Conn, events: int) -> None:
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise BenchError(f"cannot connect to {self.host}:{self.port}: {os.strerror(code)}")
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.poller.modify(conn.sock.fileno(), _Poller.IN)
        conn.state = _JOINING
        self._send(
            conn,
            f"JOIN_CHATROOM: bench{conn.room.index}\nCLIENT_IP: 0\nPORT: 0\n"
            f"CLIENT_NAME: {conn.name}\n".encode(),
        )

    def _read_setup(self, conn: _Conn) -> bool:
        """Read during setup; True if the connection's state may have changed."""
        try:
            data = conn.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return False
        except OSError as error:
            raise BenchError(f"member {conn.name}: {error.strerror} during setup") from None
        if not data:
            raise BenchError(f"member {conn.name}: the server closed the connection during setup")
        buffer = conn.inbuf + data
        if b"ERROR_CODE:" in buffer:
            start = buffer.index(b"ERROR_CODE:")
            raise BenchError(
                f"member {conn.name}: server error during setup: "
                + buffer[start : start + 200].decode(errors="replace").replace("\n", " ")
            )
        if conn.state == _JOINING:
            match = re.search(rb"JOINED_CHATROOM: [^\n]*\n(?:[^\n]*\n){4}", buffer)
            if match is None:
                conn.inbuf = buffer[-4096:]
                return False
            fields = dict(
                line.split(b":", 1) for line in match.group().splitlines()[1:] if b":" in line
            )
            ref = int(fields[b"ROOM_REF"])
            if conn.room.ref < 0:
                conn.room.ref = ref
            elif conn.room.ref != ref:
                raise BenchError(
                    f"room {conn.room.index} got two ROOM_REFs ({conn.room.ref}, {ref})"
                )
            conn.join_id = int(fields[b"JOIN_ID"])
            conn.state = _JOINED
            conn.inbuf = b""
            return True
        end = re.search(rb"\nStudentID:[^\n]*\n", buffer)
        if end is None:
            conn.inbuf = buffer[-4096:]
            return False
        if buffer[end.end() :]:
            raise BenchError(f"member {conn.name}: unexpected bytes after the setup barrier")
        conn.inbuf = b""
        conn.state = _READY
        return True

    def _discard(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError as error:
            raise BenchError(f"member {conn.name}: {error.strerror} during setup") from None
        if not data:
            raise BenchError(f"member {conn.name}: the server closed the connection during setup")
        if b"ERROR_CODE:" in data:
            raise BenchError(f"member {conn.name}: server error during setup")

    def _send(self, conn: _Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self._lost(conn, error.strerror or "send failed")
            return
        if sent < len(data):
            conn.out += data[sent:]
            self.poller.modify(conn.sock.fileno(), _Poller.IN | _Poller.OUT)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError as error:
            self._lost(conn, error.strerror or "send failed")
            return
        del conn.out[:sent]
        if not conn.out:
            self.poller.modify(conn.sock.fileno(), _Poller.IN)

    def _lost(self, conn: _Conn, why: str) -> None:
        if conn.state == _CLOSED:
            return
        self.result.disconnects += 1
        self.note(f"member {conn.name}: {why}")
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        conn.state = _CLOSED
        self.poller.unregister(conn.sock.fileno())
        conn.sock.close()

    # the measured phase

    def measure(self) -> None:
        load = self.load
        result = self.result
        expected = load.expected
        window = load.window or math.inf
        rate = load.rate
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter_ns()
        start_s = time.monotonic()
        last_delivery = start
        for sender in self.senders:
            sender.offset = sender.number / (rate * len(self.senders)) if rate else 0.0
        ready = list(self.senders)  # capacity mode: senders whose window may have opened
        by_fd = self.by_fd
        receive = self._receive
        poll = self.poller.poll
        deadline = start_s + self.run_timeout
        idle_until = start_s + self.idle_timeout
        delivered = 0
        # Paced runs take fewer events per wake-up so that due sends are not held back
        # behind a long batch of reads.
        max_events = PACED_MAX_EVENTS if rate else -1
        while delivered < expected:
            now_s = time.monotonic()
            if now_s > deadline or now_s > idle_until:
                result.timed_out = True
                self.note(
                    f"no delivery for {self.idle_timeout:g} s"
                    if now_s > idle_until
                    else f"run timed out after {self.run_timeout:g} s"
                )
                break
            timeout = min(deadline, idle_until) - now_s
            if rate:
                elapsed = (time.perf_counter_ns() - start) / 1e9
                for sender in self.senders:
                    due = self._pump_paced(sender, start, elapsed, window)
                    if due is not None:
                        timeout = min(timeout, due - elapsed)
            elif ready:
                for sender in ready:
                    self._pump(sender, window)
                ready.clear()
            for fd, events in poll(timeout, max_events):
                conn = by_fd[fd]
                if events & _Poller.OUT and conn.out:
                    self._flush(conn)
                    if not conn.out and conn.pump is not None and not rate:
                        ready.append(conn.pump)
                if conn.state == _READY:
                    acked = receive(conn)
                    if acked and not rate:
                        # Send at once rather than after the rest of this batch of events:
                        # the window is the server's work in flight; keep it full.
                        first = conn.room.index * load.senders
                        for s in acked:
                            self._pump(self.senders[first + s], window)
            if result.delivered != delivered:
                delivered = result.delivered
                last_delivery = time.perf_counter_ns()
                idle_until = time.monotonic() + self.idle_timeout
            if self.progress_due():
                self.show(
                    f"{delivered:,}/{expected:,} deliveries "
                    f"({delivered / max(1e-9, (last_delivery - start) / 1e9):,.0f}/s)"
                )
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        elapsed_all = max(1e-9, time.monotonic() - start_s)
        result.wall_s = (last_delivery - start) / 1e9
        result.cpu_util = (
            usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime
        ) / elapsed_all

    def _pump(self, sender: _Sender, window: float) -> None:
        conn = sender.conn
        if conn.state != _READY:
            return
        messages = self.load.messages
        chunk = []
        now = time.perf_counter_ns()
        seq = sender.next_seq
        limit = min(messages, sender.acked + window)
        while seq < limit and len(conn.out) < SEND_BUFFER_LIMIT:
            chunk.append(self._frame(sender, seq))
            sender.sent_at.append(now)
            seq += 1
        if chunk:
            self.result.sent += seq - sender.next_seq
            sender.next_seq = seq
            self._send(conn, b"".join(chunk))

    def _pump_paced(
        self, sender: _Sender, start: int, elapsed: float, window: float
    ) -> float | None:
        """Send what is due; return when the next message is due (None: nothing more)."""
        conn = sender.conn
        load = self.load
        if conn.state != _READY or sender.next_seq >= load.messages:
            return None
        chunk = []
        now = time.perf_counter_ns()
        seq = sender.next_seq
        while seq < load.messages and seq - sender.acked < window:
            due = sender.offset + seq / load.rate
            if due > elapsed:
                break
            chunk.append(self._frame(sender, seq))
            sender.sent_at.append(now)
            self.send_lag.append(now - start - int(due * 1e9))
            seq += 1
        if chunk:
            self.result.sent += seq - sender.next_seq
            sender.next_seq = seq
            self._send(conn, b"".join(chunk))
        if seq >= load.messages:
            return None
        return sender.offset + seq / load.rate

    def _frame(self, sender: _Sender, seq: int) -> bytes:
        return sender.prefix + _message(self.digits, self.load, sender.conn.sender, seq) + b"\n\n"

    def _receive(self, conn: _Conn) -> list[int]:
        """Read and check what arrived; the room's senders acknowledged if this is member 0."""
        try:
            # Into one buffer allocated once: a fresh 256 KiB object per receive would be
            # mapped and unmapped by the allocator every time.
            size = conn.sock.recv_into(self.receive_buffer)
        except BlockingIOError:
            return []
        except OSError as error:
            self._lost(conn, error.strerror or "receive failed")
            return []
        if not size:
            self._lost(conn, "the server closed the connection")
            return []
        now = time.perf_counter_ns()
        received = self.receive_view[:size]
        data = conn.carry + received if conn.carry else bytes(received)
        room = conn.room
        length = room.frame_length
        count = len(data) // length
        end = count * length
        conn.carry = data[end:]
        if not count:
            return []
        runs = self._check_fast(conn, data, count, end)
        if runs is None:
            conn.carry = b""
            runs = self._check_slow(conn, data, now)
        result = self.result
        first = room.index * self.load.senders
        acked = []
        for sender, start, n in runs:
            if sender == conn.sender:
                result.self_echoes += n
                continue
            result.delivered += n
            self.arrivals.append((now, first + sender, start, n))
            if conn.index == room.index * self.load.members:  # member 0 acknowledges
                pump = self.senders[first + sender]
                pump.acked = max(pump.acked, start + n)
                acked.append(sender)
        return acked

    def _check_fast(
        self, conn: _Conn, data: bytes, count: int, end: int
    ) -> list[tuple[int, int, int]] | None:
        """Check `count` whole frames with byte operations; None if they need a closer look."""
        room = conn.room
        length = room.frame_length
        for offset, byte in room.fixed:  # every frame in its place, and of this room
            if data[offset:end:length] != byte * count:
                return None
        digits = self.digits
        columns = [data[room.digit_offset + j : end : length] for j in range(digits.width)]
        expect = conn.expect
        runs: list[tuple[int, int, int]] = []
        total = 0
        for sender in range(self.load.senders):
            start = expect[sender]
            n = -1
            for j, column in enumerate(columns):
                mine = column.translate(None, digits.others[sender])
                if n < 0:
                    n = len(mine)
                    if not n:
                        break
                if mine != digits.columns[sender][j][start : start + n]:
                    return None
            if n > 0:
                runs.append((sender, start, n))
                total += n
        if total != count:
            return None
        for sender, start, n in runs:
            expect[sender] = start + n
        return runs

    def _check_slow(self, conn: _Conn, data: bytes, now: int) -> list[tuple[int, int, int]]:
        """Parse frame by frame, counting and naming whatever is wrong."""
        result = self.result
        digits = self.digits
        payload = _payload_length(self.load, digits)
        runs: list[tuple[int, int, int]] = []
        pos = 0
        while pos < len(data):
            match = _FRAME.match(data, pos)
            if match is None:
                stop = data.find(b"\n\n", pos)
                if stop < 0 and not data.startswith(b"ERROR_CODE:", pos):
                    conn.carry = data[pos:]
                    break
                text = data[pos : pos + 120].decode(errors="replace")
                if data.startswith(b"ERROR_CODE:", pos):
                    result.server_errors += 1
                    self.note(f"member {conn.name}: server error: {text!r}")
                    stop = data.find(b"\n", data.find(b"ERROR_DESCRIPTION:", pos))
                    pos = len(data) if stop < 0 else stop + 1
                    continue
                result.corrupt += 1
                self.note(f"member {conn.name}: unexpected bytes {text!r}")
                pos = stop + 2
                continue
            pos = match.end()
            ref, message = int(match.group(1)), match.group(3)
            result.slow_frames += 1
            if ref != conn.room.ref:
                result.misrouted += 1
                self.note(f"member {conn.name} of room {conn.room.ref} got a message for {ref}")
                continue
            decoded = digits.decode(message[1 : 1 + digits.width])
            if decoded is None or len(message) != payload or decoded[1] >= self.load.messages:
                result.corrupt += 1
                self.note(f"member {conn.name}: corrupt message {message[:60]!r}")
                continue
            sender, seq = decoded
            expected = conn.expect[sender]
            if seq == expected:
                conn.expect[sender] = seq + 1
                if runs and runs[-1][0] == sender and runs[-1][1] + runs[-1][2] == seq:
                    runs[-1] = (sender, runs[-1][1], runs[-1][2] + 1)
                    continue
            elif seq > expected:
                # Those skipped are lost unless they turn up later, out of order.
                self.note(f"member {conn.name}: message {seq} of sender {sender} before {expected}")
                conn.missing.update((sender, q) for q in range(expected, seq))
                conn.expect[sender] = seq + 1
            elif (sender, seq) in conn.missing:
                conn.missing.discard((sender, seq))
                result.out_of_order += 1
                self.note(f"member {conn.name}: message {seq} of sender {sender} out of order")
            else:
                result.duplicates += 1
                self.note(f"member {conn.name}: message {seq} of sender {sender} twice")
                continue
            runs.append((sender, seq, 1))
        return runs

    # after the run

    def teardown(self) -> None:
        """Say DISCONNECT on every connection and wait, briefly, for the server to close."""
        open_conns = [c for c in self.conns if c.state not in (_CLOSED, _CONNECTING)]
        for conn in open_conns:
            conn.out.clear()
            try:
                conn.sock.send(f"DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: {conn.name}\n".encode())
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(conn)
                continue
            self.poller.modify(conn.sock.fileno(), _Poller.IN)
        remaining = sum(1 for c in open_conns if c.state != _CLOSED)
        deadline = time.monotonic() + TEARDOWN_GRACE
        while remaining and time.monotonic() < deadline:
            for fd, _ in self.poller.poll(min(0.1, deadline - time.monotonic())):
                conn = self.by_fd[fd]
                try:
                    data = conn.sock.recv(RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data and conn.state != _CLOSED:
                    self._close(conn)
                    remaining -= 1
        self.close()

    def close(self) -> None:
        for conn in self.conns:
            if conn.state != _CLOSED:
                conn.sock.close()
                conn.state = _CLOSED
        self.poller.close()

    def latencies(self) -> None:
        """Turn send times and arrival runs into latency percentiles (microseconds)."""
        samples = array.array("q")
        for arrived, sender, start, n in self.arrivals:
            sent = self.senders[sender].sent_at[start : start + n]
            samples.extend(map(arrived.__sub__, sent))
        self.result.latency_us = _percentiles(samples)
        if self.send_lag:
            self.result.send_lag_us = _percentiles(self.send_lag)


def _raise_open_files_limit(needed: int) -> None:
    """Allow `needed` open descriptors if the hard limit allows it (the default is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise BenchError(f"{needed} connections need more open files than the limit ({soft})")


def _percentiles(samples: Iterable[int]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {}

    def at(fraction: float) -> float:
        index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
        return round(ordered[index] / 1000, 1)

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round(ordered[-1] / 1000, 1),
        "mean": round(sum(ordered) / len(ordered) / 1000, 1),
    }


def run_load(
    host: str,
    port: int,
    load: Load,
    *,
    scenario: str = "custom",
    progress: Progress | None = None,
    setup_timeout: float = SETUP_TIMEOUT,
    run_timeout: float = RUN_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
) -> Result:
    """Run `load` against the server at `host`:`port` and return what it measured.

    Blocking: it runs its own event loop (from trio, call it in a thread). Raises
    `BenchError` when the run cannot be set up; wrong deliveries are counted, not raised.
    """
    if load.members < 2 or not 1 <= load.senders < load.members:
        raise BenchError("need at least one sender and member 0 that only receives")
    if load.senders > MAX_SENDERS_PER_ROOM:
        raise BenchError(f"at most {MAX_SENDERS_PER_ROOM} senders per room")
    if min(load.rooms, load.messages, load.size) < 1 or load.rate < 0 or load.window < 0:
        raise BenchError("rooms, messages and size must be positive; rate and window not negative")
    result = Result(scenario=scenario, load=load)
    run = _Run(host, port, load, result, progress, setup_timeout, run_timeout, idle_timeout)
    try:
        started = time.monotonic()
        run.setup()
        result.setup_s = time.monotonic() - started
        run.show("setup done; sending")
        # A collection pass over the arrival records would pause the loop and show up as
        # latency that is not the server's.
        gc.disable()
        try:
            run.measure()
        finally:
            gc.enable()
        run.show("done; disconnecting")
        run.teardown()
    finally:
        run.close()
    run.latencies()
    return result


# -- the command --------------------------------------------------------------------------------


def format_table(results: list[Result]) -> str:
    """The results as a table for people."""
    lines = [
        f"{'scenario':<8} {'rooms x members':>15} {'senders':>7} {'msgs':>6} {'msgs/s':>6} "
        f"{'deliveries/s':>13} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}  result"
    ]
    for r in results:
        load = r.load
        latency = r.latency_us

        def ms(key: str, latency: dict[str, float] = latency) -> str:
            return f"{latency[key] / 1000:8.2f}" if key in latency else f"{'-':>8}"

        verdict = (
            "ok"
            if r.ok
            else f"FAIL lost {r.lost} dup {r.duplicates} reordered {r.out_of_order} "
            f"errors {r.errors}: {r.first_error}"
        )
        rate = f"{load.rate:g}" if load.rate else "max"
        lines.append(
            f"{r.scenario:<8} {f'{load.rooms} x {load.members}':>15} {load.senders:>7} "
            f"{load.messages:>6} {rate:>6} {r.deliveries_per_s:>13,.0f} {ms('p50')} "
            f"{ms('p90')} {ms('p99')} {ms('max')}  {verdict}"
        )
    return "\n".join(lines)


def add_parser(commands: Commands) -> None:
    """Register ``trio-chat bench``."""
    parser = commands.add_parser(
        "bench",
        help="measure fan-out against a running server, checking every delivery",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.set_defaults(run=_run_bench)
    parser.add_argument("host", help="server address")
    parser.add_argument("port", type=int, help="server port")
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"named loads ({', '.join(SCENARIOS)}); default: all of them, or one custom "
        "load if any load option is given",
    )
    shape = parser.add_argument_group(
        "load (each overrides the scenario's value; defaults for a custom load in brackets)"
    )
    custom = Load()
    for name, kind, text in (
        ("rooms", int, "rooms"),
        ("members", int, "member connections per room, senders included"),
        ("senders", int, "senders per room (the last members)"),
        ("messages", int, "messages per sender"),
        ("size", int, "bytes of message text"),
        ("rate", float, "messages/s per sender; 0: as fast as the window allows"),
        ("window", int, "unacknowledged messages per sender; 0: no limit"),
    ):
        shape.add_argument(f"--{name}", type=kind, help=f"{text} [{getattr(custom, name):g}]")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per run")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="show progress on stderr even when it is not a terminal",
    )
    parser.add_argument(
        "--setup-timeout", type=float, default=SETUP_TIMEOUT, help="seconds to join everyone"
    )
    parser.add_argument(
        "--timeout", type=float, default=RUN_TIMEOUT, help="seconds for the measured phase"
    )
    parser.add_argument(
        "--idle", type=float, default=IDLE_TIMEOUT, help="give up after this long with no delivery"
    )


_LOAD_OPTIONS = ("rooms", "members", "senders", "messages", "size", "rate", "window")


def loads_from_args(args: argparse.Namespace) -> list[tuple[str, Load]]:
    """The (scenario name, load) pairs the command line asks for."""
    overrides = {k: getattr(args, k) for k in _LOAD_OPTIONS if getattr(args, k) is not None}
    names = args.scenarios or ([] if overrides else list(SCENARIOS))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r} (known: {', '.join(SCENARIOS)})")
    if not names:
        return [("custom", Load(**overrides))]
    return [(n, evolve(SCENARIOS[n], **overrides)) for n in names]


def _run_bench(args: argparse.Namespace) -> int:
    loads = loads_from_args(args)
    tty = sys.stderr.isatty()
    progress = progress_printer(sys.stderr, tty=tty) if tty or args.progress else None
    results = []
    for name, load in loads:
        try:
            result = run_load(
                args.host,
                args.port,
                load,
                scenario=name,
                progress=progress,
                setup_timeout=args.setup_timeout,
                run_timeout=args.timeout,
                idle_timeout=args.idle,
            )
        except (BenchError, OSError) as error:
            if progress is not None and tty:
                sys.stderr.write("\n")
            print(f"trio-chat bench: {name}: {error}", file=sys.stderr)
            return 2
        finally:
            if progress is not None and tty:
                sys.stderr.write("\r\x1b[K")
        results.append(result)
        if args.json:
            print(json.dumps(result.as_json()), flush=True)
    if not args.json:
        print(format_table(results))
    return 0 if all(r.ok for r in results) else 1
