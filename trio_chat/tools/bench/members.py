"""The member connections of a run: their state, the poller watching their sockets, and
sending on them without ever blocking."""

from __future__ import annotations

import array
import math
import select
import socket

from attrs import define, field

from trio_chat.tools.bench.load import Room
from trio_chat.tools.bench.statistics import Result

RECEIVE_SIZE = 256 * 1024
"""Most bytes taken from one socket per read: a whole backlog of a busy member at once."""

# A member's state: its steps through setup, then READY for the measured phase, or CLOSED.
CONNECTING, JOINING, JOINED, BARRIER, READY, CLOSED = range(6)


@define(eq=False)
class Conn:
    """One member connection: its socket, its place in its room, what it has received."""

    index: int
    room: Room
    name: str
    sock: socket.socket
    sender: int = -1
    """Index of the sender among its room's senders, or -1 for a member that only receives."""
    state: int = CONNECTING
    inbuf: bytes = b""
    carry: bytes = b""
    out: bytearray = field(factory=bytearray)
    join_id: int = -1
    pump: Sender | None = None
    """The sender that sends on this connection, if any."""
    expect: list[int] = field(factory=list)
    """Per sender of the room: the next sequence number this member must receive."""
    missing: set[tuple[int, int]] = field(factory=set)
    """(sender, seq) skipped over: lost, unless they arrive late."""


@define(eq=False)
class Sender:
    """A member that sends: its next message, and when each message went out."""

    conn: Conn
    number: int
    """Global sender number."""
    prefix: bytes = b""
    next_seq: int = 0
    acked: int = 0
    offset: float = 0.0
    sent_at: array.array[int] = field(factory=lambda: array.array("q"))


class Poller:
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


@define(eq=False)
class Members:
    """Every member connection of a run, by number and by descriptor, and the poller."""

    result: Result
    conns: list[Conn] = field(factory=list)
    by_fd: dict[int, Conn] = field(factory=dict)
    senders: list[Sender] = field(factory=list)
    """Every sender of the run, room after room: a sender's global number is its index."""
    poller: Poller = field(factory=Poller)

    def send(self, conn: Conn, data: bytes) -> None:
        """Send `data` on `conn` now, or after what is already waiting to go."""
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as error:
            self.lost(conn, error.strerror or "send failed")
            return
        if sent < len(data):
            conn.out += data[sent:]
            self.poller.modify(conn.sock.fileno(), Poller.IN | Poller.OUT)

    def flush(self, conn: Conn) -> None:
        """Send what is waiting on `conn`, as far as its socket takes it."""
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError as error:
            self.lost(conn, error.strerror or "send failed")
            return
        del conn.out[:sent]
        if not conn.out:
            self.poller.modify(conn.sock.fileno(), Poller.IN)

    def lost(self, conn: Conn, why: str) -> None:
        """Count `conn` as dropped (once), for the reason `why`, and close it."""
        if conn.state == CLOSED:
            return
        self.result.disconnects += 1
        self.result.note(f"member {conn.name}: {why}")
        self.close(conn)

    def close(self, conn: Conn) -> None:
        """Close `conn`'s socket."""
        conn.state = CLOSED
        self.poller.unregister(conn.sock.fileno())
        conn.sock.close()

    def close_all(self) -> None:
        """Close every socket and the poller."""
        for conn in self.conns:
            if conn.state != CLOSED:
                conn.sock.close()
                conn.state = CLOSED
        self.poller.close()
