"""The checker's side of a connection: raw bytes out, exact bytes expected back.

Every expectation is checked with a HELO barrier: after the requests under test, the checker
sends ``HELO <unique token>`` and reads up to that HELO's reply. A server answers a
connection's requests in order, so what arrived before the barrier's reply is what the
earlier requests caused: anything extra (an answer to an unknown line, a duplicate, a message
for another room) shows up, and a missing reply fails without waiting for a timeout. Only
when what arrived is the start of what is expected does the checker wait for the rest, since
a broadcast may cross the nodes of a cluster more slowly than a HELO reply.
"""

from __future__ import annotations

import itertools
import re
import socket
import struct

import trio
from attrs import frozen

from trio_chat import protocol
from trio_chat.tools.check.settings import Settings

_barrier_ids = itertools.count()

# What any ERROR_DESCRIPTION looks like in expectations: the text is the server's choice.
ANY_DESCRIPTION = "…"
_DESCRIPTION = re.compile(rb"ERROR_DESCRIPTION: *[^\n]*\S[^\n]*\n")


Shown = bytes | bytearray | str


class CaseFailed(Exception):
    """A step of a case did not go as PROTOCOL.md says."""

    def __init__(
        self,
        step: str,
        *,
        expected: bytes | bytearray | str = b"",
        arrived: bytes | bytearray | str = b"",
    ) -> None:
        super().__init__(step)
        self.step = step
        self.expected = _text(expected)
        self.arrived = _text(arrived)


def _text(data: Shown) -> str:
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def error_reply(code: int) -> bytes:
    """An ERROR_CODE reply as expectations write it: any one-line description matches."""
    return f"ERROR_CODE: {code}\nERROR_DESCRIPTION: {ANY_DESCRIPTION}\n".encode()


def normalize(arrived: bytes) -> bytes:
    """`arrived` with each non-empty ERROR_DESCRIPTION replaced as `error_reply` writes it."""
    return _DESCRIPTION.sub(f"ERROR_DESCRIPTION: {ANY_DESCRIPTION}\n".encode(), arrived)


@frozen
class Membership:
    """What a JOINED reply said."""

    room_name: str
    client_name: str
    server_ip: str
    port: int
    room_ref: int
    join_id: int

    @property
    def joined(self) -> bytes:
        """The exact JOINED_CHATROOM reply."""
        return protocol.encode_joined(
            self.room_name, self.server_ip, self.port, self.room_ref, self.join_id
        )

    @property
    def announced(self) -> bytes:
        """The join announcement."""
        return protocol.encode_joined_announcement(self.room_ref, self.client_name)

    @property
    def left_announcement(self) -> bytes:
        """The leave announcement."""
        return protocol.encode_left_announcement(self.room_ref, self.client_name)

    def chat(self, message: str, client_name: str | None = None) -> bytes:
        """A CHAT broadcast in this room."""
        return protocol.encode_chat(self.room_ref, client_name or self.client_name, message)


class Conn:
    """One TCP connection to the server under test."""

    def __init__(self, stream: trio.SocketStream, label: str, settings: Settings) -> None:
        self.stream = stream
        self.label = label
        self.settings = settings
        self.buffer = bytearray()
        self.eof = False
        self.helo_tail = b""  # "IP:..\nPort:..\nStudentID:..\n" of the last barrier reply
        self.closed = False

    @property
    def peer(self) -> tuple[str, int]:
        """The server address this connection reached."""
        host, port = self.stream.socket.getpeername()[:2]
        return host.removeprefix("::ffff:") if "." in host else host, port

    # -- sending ---------------------------------------------------------------------------

    async def send(self, data: bytes | str, step: str = "") -> None:
        """Send `data` as it is."""
        payload = data.encode() if isinstance(data, str) else data
        try:
            await self.stream.send_all(payload)
        except (trio.BrokenResourceError, OSError) as exc:
            raise CaseFailed(
                f"{self.label}: sending failed ({exc or type(exc).__name__})"
                + (f" during: {step}" if step else ""),
                arrived=self.buffer,
            ) from None

    async def send_bytewise(self, data: bytes | str) -> None:
        """Send `data` one byte per TCP segment, pausing between bytes."""
        payload = data.encode() if isinstance(data, str) else data
        for index in range(len(payload)):
            await self.send(payload[index : index + 1])
            await trio.sleep(self.settings.byte_pause)

    async def reset(self) -> None:
        """Close abruptly: the server sees a connection reset (RST), not an end of stream."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (an end of stream for the server)."""
        if not self.closed:
            self.closed = True
            await trio.aclose_forcefully(self.stream)

    # -- receiving -------------------------------------------------------------------------

    async def fill(self, step: str) -> None:
        """Receive more bytes into the buffer; an end of stream or an error fails `step`."""
        if self.eof:
            raise CaseFailed(f"{step}: the server closed the connection", arrived=self.buffer)
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, OSError) as exc:
            raise CaseFailed(
                f"{step}: connection error ({exc or type(exc).__name__})", arrived=self.buffer
            ) from None
        if not data:
            self.eof = True
            raise CaseFailed(f"{step}: the server closed the connection", arrived=self.buffer)
        self.buffer += data

    async def receive_exactly(self, size: int, step: str) -> bytes:
        """The next `size` bytes."""
        with trio.move_on_after(self.settings.reply_timeout):
            while len(self.buffer) < size:
                await self.fill(step)
            data = bytes(self.buffer[:size])
            del self.buffer[:size]
            return data
        raise CaseFailed(
            f"{step}: {size} bytes did not arrive within {self.settings.reply_timeout:g} s",
            arrived=self.buffer,
        )

    async def settle(self, step: str) -> bytes:
        """Everything the server sent before answering a HELO barrier sent now."""
        token = f"check-barrier-{next(_barrier_ids)}"
        await self.send(f"HELO {token}\n", step)
        marker = f"HELO {token}\n".encode()
        with trio.move_on_after(self.settings.reply_timeout):
            while True:
                start = self.buffer.find(marker)
                if start >= 0:
                    end = start + len(marker)
                    for _ in range(3):  # IP, Port, StudentID
                        end = self.buffer.find(b"\n", end) + 1
                        if not end:
                            break
                    if end:
                        arrived = bytes(self.buffer[:start])
                        self.helo_tail = bytes(self.buffer[start + len(marker) : end])
                        del self.buffer[:end]
                        return arrived
                await self.fill(f"{step} (waiting for the reply to HELO {token})")
        raise CaseFailed(
            f"{step}: no complete reply to HELO {token} within {self.settings.reply_timeout:g} s",
            arrived=self.buffer,
        )

    async def expect(self, step: str, *alternatives: bytes) -> None:
        """Assert what arrives next is one of `alternatives` and nothing more.

        The first alternative is what PROTOCOL.md describes; others are tolerated variants.
        A HELO barrier shows what arrived before its reply. If that is only the start of an
        alternative, the rest may still be on its way (a broadcast crossing the nodes of a
        cluster): it is awaited, for `optional_wait` if a tolerated variant is already
        complete, and a second barrier then shows whether anything else came with it.
        """
        label = f"{self.label}: {step}"
        canonical = alternatives[0]
        arrived = normalize(await self.settle(label))
        if arrived == canonical or (arrived in alternatives and not canonical.startswith(arrived)):
            return
        if _incomplete(arrived, alternatives):
            settings = self.settings
            wait = settings.optional_wait if arrived in alternatives else settings.reply_timeout
            with trio.move_on_after(wait):
                while _incomplete(arrived + normalize(bytes(self.buffer)), alternatives):
                    await self.fill(label)
            arrived += normalize(await self.settle(label))
        if arrived not in alternatives:
            raise CaseFailed(label, expected=canonical, arrived=arrived)

    async def expect_nothing(self, step: str) -> None:
        """Assert nothing arrived since the last check (as far as a HELO barrier can tell)."""
        await self.expect(step, b"")

    async def wait_for(self, marker: bytes, step: str) -> None:
        """Wait until `marker` is among the bytes received (or the reply timeout passes)."""
        with trio.move_on_after(self.settings.reply_timeout):
            while marker not in self.buffer:
                await self.fill(f"{self.label}: {step}")

    async def expect_close(self, step: str, expected: bytes, *tolerated: bytes) -> None:
        """Assert `expected` (or one of `tolerated`) arrives, then the server closes.

        A reset after everything expected arrived is tolerated: it loses nothing.
        """
        accepted = (expected, *tolerated)
        with trio.move_on_after(self.settings.reply_timeout):
            while not self.eof:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, OSError) as exc:
                    if normalize(bytes(self.buffer)) in accepted:
                        break
                    raise CaseFailed(
                        f"{self.label}: {step}: connection reset before the close "
                        f"({exc or type(exc).__name__})",
                        expected=expected,
                        arrived=self.buffer,
                    ) from None
                if not data:
                    self.eof = True
                self.buffer += data
        arrived = normalize(bytes(self.buffer))
        if not self.eof and arrived in accepted:
            raise CaseFailed(
                f"{self.label}: {step}: the server did not close the connection within "
                f"{self.settings.reply_timeout:g} s",
                expected=expected + b"(end of stream)",
                arrived=arrived,
            )
        if arrived not in accepted:
            raise CaseFailed(f"{self.label}: {step}", expected=expected, arrived=arrived)
        self.buffer.clear()

    # -- requests with their expected replies ----------------------------------------------

    async def join(
        self,
        room_name: str,
        client_name: str,
        *,
        request: bytes | None = None,
        bytewise: bool = False,
        strict: bool = False,
    ) -> Membership:
        """JOIN `room_name` and check the JOINED reply and the joiner's own announcement.

        `request` replaces the plain JOIN request (to test a spelling of it). Unless `strict`,
        the reply and the announcement may come in either order: only the cases about joining
        insist on the order, so a server with that one fault fails only those.
        """
        step = f"{self.label}: JOIN {room_name!r} as {client_name!r}"
        if request is None:
            request = (
                f"JOIN_CHATROOM: {room_name}\nCLIENT_IP: 0\nPORT: 0\n"
                f"CLIENT_NAME: {client_name}\n".encode()
            )
        if bytewise:
            await self.send_bytewise(request)
        else:
            await self.send(request, step)
        announcement = f"CLIENT_NAME: {client_name}\nMESSAGE: {client_name} has joined"
        with trio.move_on_after(self.settings.reply_timeout):
            while (
                not (JOINED_PATTERN.search(self.buffer) and announcement.encode() in self.buffer)
                and b"ERROR_CODE:" not in self.buffer
            ):
                await self.fill(step)
        arrived = await self.settle(step)
        membership = parse_joined(arrived, room_name, client_name)
        if membership is None:
            raise CaseFailed(
                step,
                expected=(
                    f"JOINED_CHATROOM: {room_name}\nSERVER_IP: …\nPORT: …\nROOM_REF: …\n"
                    f"JOIN_ID: …\nCHAT: …\nCLIENT_NAME: {client_name}\n"
                    f"MESSAGE: {client_name} has joined this chatroom.\n\n"
                ),
                arrived=arrived,
            )
        exact = membership.joined + membership.announced
        tolerated = () if strict else (membership.announced + membership.joined,)
        if arrived not in (exact, *tolerated):
            raise CaseFailed(step, expected=exact, arrived=arrived)
        return membership

    async def chat(self, membership: Membership, message: str, client_name: str = "") -> bytes:
        """Send a CHAT to the room of `membership`; returns the broadcast it should cause."""
        name = client_name or membership.client_name
        await self.send(
            f"CHAT: {membership.room_ref}\nJOIN_ID: {membership.join_id}\n"
            f"CLIENT_NAME: {name}\nMESSAGE: {message}\n\n"
        )
        return membership.chat(message, name)

    async def leave(self, membership: Membership) -> None:
        """Send a LEAVE for the room of `membership`."""
        await self.send(
            leave_request(membership.room_ref, membership.join_id, membership.client_name)
        )


def _incomplete(arrived: bytes, alternatives: tuple[bytes, ...]) -> bool:
    """Whether `arrived` is the start of an alternative, short of its end."""
    return any(len(arrived) < len(option) and option.startswith(arrived) for option in alternatives)


JOINED_PATTERN = re.compile(
    rb"JOINED_CHATROOM: (?P<room>[^\n]*)\nSERVER_IP: (?P<ip>[^\n]*)\nPORT: (?P<port>[0-9]+)\n"
    rb"ROOM_REF: (?P<ref>[0-9]+)\nJOIN_ID: (?P<join_id>[0-9]+)\n"
)


def parse_joined(arrived: bytes, room_name: str, client_name: str) -> Membership | None:
    """The membership a JOINED reply for `room_name` in `arrived` describes, if there is one."""
    for match in JOINED_PATTERN.finditer(arrived):
        if match["room"] == room_name.encode():
            return Membership(
                room_name,
                client_name,
                match["ip"].decode("utf-8", "replace"),
                int(match["port"]),
                int(match["ref"]),
                int(match["join_id"]),
            )
    return None


def leave_request(room_ref: int, join_id: int, client_name: str) -> bytes:
    """A LEAVE_CHATROOM request."""
    return f"LEAVE_CHATROOM: {room_ref}\nJOIN_ID: {join_id}\nCLIENT_NAME: {client_name}\n".encode()


def left_reply(room_ref: int, join_id: int) -> bytes:
    """The LEFT_CHATROOM reply."""
    return protocol.encode_left(room_ref, join_id)
