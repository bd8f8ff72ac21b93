"""Setting a run up: connect every member, join it to its room, and wait until nothing of
the setup is still in flight, so that the measured phase starts clean."""

from __future__ import annotations

import errno
import os
import re
import resource
import socket
import time
from typing import Any

from attrs import define

from trio_chat.tools.bench.load import NAME_PREFIX, BenchError, Digits, Load, Room
from trio_chat.tools.bench.members import (
    BARRIER,
    CONNECTING,
    JOINED,
    JOINING,
    READY,
    RECEIVE_SIZE,
    Conn,
    Members,
    Poller,
    Sender,
)
from trio_chat.tools.bench.statistics import Status

SETUP_TIMEOUT = 60.0
"""Seconds allowed for connecting and joining every member (a large run joins tens of
thousands of members, one JOIN round trip each)."""
CONNECT_BATCH = 64
"""Connections being opened and joined at once during setup: enough to set up thousands of
members in seconds, few enough to stay well inside any listen backlog."""


@define(eq=False)
class Setup:
    """Connects and joins the members of one run."""

    host: str
    port: int
    load: Load
    digits: Digits
    members: Members
    status: Status
    timeout: float = SETUP_TIMEOUT

    def run(self) -> list[Room]:
        """Connect and join every member, then wait until no announcement is left in flight."""
        load = self.load
        raise_open_files_limit(load.rooms * load.members + 64)
        try:
            address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as error:
            raise BenchError(f"cannot resolve {self.host}: {error.strerror}") from None
        family, _, _, _, sockaddr = address
        rooms = [Room(r) for r in range(load.rooms)]
        self._create(rooms, family)
        deadline = time.monotonic() + self.timeout
        self._join(sockaddr, deadline)
        self._drain(deadline)
        members = self.members
        for sender in members.senders:
            conn = sender.conn
            sender.prefix = (
                f"CHAT: {conn.room.ref}\nJOIN_ID: {conn.join_id}\nCLIENT_NAME: {conn.name}\n"
                "MESSAGE: "
            ).encode()
        name_length = len(members.conns[0].name)
        for room in rooms:
            room.lay_out(load, self.digits, name_length)
        return rooms

    def _create(self, rooms: list[Room], family: int) -> None:
        """A socket for every member of every room; the last members of each are senders."""
        load = self.load
        members = self.members
        width = len(str(load.rooms * load.members - 1))
        index = 0
        for room in rooms:
            for member in range(load.members):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                conn = Conn(index, room, f"{NAME_PREFIX}{index:0{width}d}", sock)
                conn.expect = [0] * load.senders
                position = member - (load.members - load.senders)
                if position >= 0:
                    conn.sender = position
                    conn.pump = Sender(conn, len(members.senders))
                    members.senders.append(conn.pump)
                members.conns.append(conn)
                index += 1
        members.result.connections = len(members.conns)

    def _join(self, sockaddr: Any, deadline: float) -> None:
        """Connect every member and join it to its room, CONNECT_BATCH at a time."""
        members = self.members
        total = len(members.conns)
        pending = iter(members.conns)
        opening = 0
        joined = 0
        while joined < total:
            while opening < CONNECT_BATCH:
                new = next(pending, None)
                if new is None:
                    break
                self._connect(new, sockaddr)
                opening += 1
            if time.monotonic() > deadline:
                raise BenchError(f"setup timed out: {joined} of {total} members joined")
            for fd, events in members.poller.poll(0.1):
                conn = members.by_fd[fd]
                if conn.state == CONNECTING:
                    self._connected(conn, events)
                elif conn.state == JOINING:
                    if self._read_setup(conn) and conn.state == JOINED:
                        opening -= 1
                        joined += 1
                else:
                    self._discard(conn)  # announcements of later joiners
            if self.status.due():
                self.status.show(f"setup: {joined}/{total} members joined")

    def _drain(self, deadline: float) -> None:
        """Read every member's input up to a barrier, so no join announcement is left."""
        # Every join announcement was queued by the server before the last JOINED reply went
        # out, so a HELO round trip on each connection drains them all.
        members = self.members
        total = len(members.conns)
        for conn in members.conns:
            conn.state = BARRIER
            members.send(conn, b"HELO bench\n")
        ready = 0
        while ready < total:
            if time.monotonic() > deadline:
                raise BenchError(f"setup timed out: {ready} of {total} members ready")
            for fd, _ in members.poller.poll(0.1):
                conn = members.by_fd[fd]
                if conn.state == BARRIER and self._read_setup(conn) and conn.state == READY:
                    ready += 1
            if self.status.due():
                self.status.show(f"setup: {ready}/{total} members ready")

    def _connect(self, conn: Conn, sockaddr: Any) -> None:
        fd = conn.sock.fileno()
        self.members.by_fd[fd] = conn
        self.members.poller.register(fd, Poller.OUT)
        code = conn.sock.connect_ex(sockaddr)
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            raise BenchError(f"cannot connect to {self.host}:{self.port}: {os.strerror(code)}")

    def _connected(self, conn: Conn, events: int) -> None:
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise BenchError(f"cannot connect to {self.host}:{self.port}: {os.strerror(code)}")
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.members.poller.modify(conn.sock.fileno(), Poller.IN)
        conn.state = JOINING
        self.members.send(
            conn,
            f"JOIN_CHATROOM: bench{conn.room.index}\nCLIENT_IP: 0\nPORT: 0\n"
            f"CLIENT_NAME: {conn.name}\n".encode(),
        )

    def _read_setup(self, conn: Conn) -> bool:
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
        if conn.state == JOINING:
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
            conn.state = JOINED
            conn.inbuf = b""
            return True
        end = re.search(rb"\nStudentID:[^\n]*\n", buffer)
        if end is None:
            conn.inbuf = buffer[-4096:]
            return False
        if buffer[end.end() :]:
            raise BenchError(f"member {conn.name}: unexpected bytes after the setup barrier")
        conn.inbuf = b""
        conn.state = READY
        return True

    def _discard(self, conn: Conn) -> None:
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


def raise_open_files_limit(needed: int) -> None:
    """Allow `needed` open descriptors if the hard limit allows it (the default is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise BenchError(f"{needed} connections need more open files than the limit ({soft})")
