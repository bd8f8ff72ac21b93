"""The client side of the chat protocol: requests out, typed events in.

`encode_request` turns the protocol module's request classes into the bytes a client sends,
and `ReplyParser` (no I/O) turns the lines a server sends into `Joined`, `Left`,
`ChatMessage`, `Error` and `HeloReply` events. `ChatClient` puts the two on a trio stream:

    async with await ChatClient.connect("127.0.0.1", 8000) as client:
        await client.join("lobby", "alice")
        async for event in client:
            print(event)
"""

from __future__ import annotations

import re
from collections import deque
from types import TracebackType

import trio
from attrs import frozen

from trio_chat.protocol import (
    Chat,
    Disconnect,
    Helo,
    Join,
    KillService,
    Leave,
    LineBuffer,
    ProtocolError,
    Request,
)

# Servers relay CHAT text of up to 64 KiB by default and may be configured for more: a client
# accepts lines and messages up to 1 MiB, which bounds its memory against a runaway server.
MAX_REPLY_LINE = 1024 * 1024
"""Longest line accepted from a server, in bytes."""
MAX_REPLY_MESSAGE = 1024 * 1024
"""Longest CHAT message text accepted from a server, all its lines together, in bytes."""
RECEIVE_SIZE = 64 * 1024
"""Most bytes taken from the socket in one receive."""

# -- events ----------------------------------------------------------------------------------


@frozen
class Joined:
    """``JOINED_CHATROOM``: the reply to a JOIN."""

    room_name: str
    server_ip: str
    port: int
    room_ref: int
    join_id: int


@frozen
class Left:
    """``LEFT_CHATROOM``: the reply to a LEAVE."""

    room_ref: int
    join_id: int


@frozen
class ChatMessage:
    """A CHAT broadcast: a message, or a join or leave announcement, in room `room_ref`."""

    room_ref: int
    client_name: str
    message: str


@frozen
class Error:
    """``ERROR_CODE``: the server refused a request."""

    code: int
    description: str


@frozen
class HeloReply:
    """The reply to HELO: the echoed text and the server's address and identity."""

    text: str
    ip: str
    port: int
    student_id: str


@frozen
class Unrecognized:
    """A line from the server that starts no known reply; reported, never fatal."""

    line: str


Reply = Joined | Left | ChatMessage | Error | HeloReply | Unrecognized


class ReplyError(Exception):
    """The server sent a reply with a missing, unexpected or malformed field."""


# -- requests --------------------------------------------------------------------------------


def _one_line(what: str, value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"{what} must be one line: {value!r}")
    return value


def encode_request(request: Request) -> bytes:
    """The bytes that send `request` over TCP (CLIENT_IP and PORT as ``0``)."""
    if isinstance(request, Helo):
        return f"HELO {_one_line('HELO text', request.text)}\n".encode()
    if isinstance(request, KillService):
        return b"KILL_SERVICE\n"
    if isinstance(request, Join):
        room = _one_line("room name", request.room_name)
        name = _one_line("client name", request.client_name)
        return f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: {name}\n".encode()
    if isinstance(request, Leave):
        name = _one_line("client name", request.client_name)
        return (
            f"LEAVE_CHATROOM: {request.room_ref}\nJOIN_ID: {request.join_id}\nCLIENT_NAME: {name}\n"
        ).encode()
    if isinstance(request, Disconnect):
        name = _one_line("client name", request.client_name)
        return f"DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: {name}\n".encode()
    name = _one_line("client name", request.client_name)
    message = request.message.replace("\r\n", "\n")
    if "\r" in message:
        raise ValueError("a message must not contain a carriage return")
    if "\n\n" in message:
        raise ValueError("a message may span lines but must not contain a blank line")
    return (
        f"CHAT: {request.room_ref}\nJOIN_ID: {request.join_id}\nCLIENT_NAME: {name}\n"
        f"MESSAGE: {message}\n\n"
    ).encode()


# -- replies ---------------------------------------------------------------------------------

# Each reply's first-line key and the keys of the lines after it, in the order servers send.
_REPLY_FIELDS = {
    "JOINED_CHATROOM": ("SERVER_IP", "PORT", "ROOM_REF", "JOIN_ID"),
    "LEFT_CHATROOM": ("JOIN_ID",),
    "CHAT": ("CLIENT_NAME", "MESSAGE"),
    "ERROR_CODE": ("ERROR_DESCRIPTION",),
    "HELO": ("IP", "Port", "StudentID"),
}
_INTEGER = re.compile(r"[0-9]{1,18}")


class ReplyParser:
    """Turns the lines a server sends into events; a pure object with no I/O.

    Fields after the first line may come in any order and with any spacing around the colon,
    as the server accepts them from clients. A CHAT message runs to the first blank line.
    """

    __slots__ = ("_body", "_body_bytes", "_fields", "_kind", "_max_message")

    def __init__(self, max_message: int = MAX_REPLY_MESSAGE) -> None:
        self._max_message = max_message
        self._kind: str | None = None
        self._fields: dict[str, str] = {}
        self._body: list[str] | None = None
        self._body_bytes = 0

    @property
    def idle(self) -> bool:
        """Whether no reply is half-way through arriving."""
        return self._kind is None

    def feed_line(self, raw: bytes) -> Reply | None:
        """Consume one line without its terminator; return the event it completes, if any."""
        line = raw.decode("utf-8", "replace")
        if self._kind is None:
            return self._first_line(line)
        if self._body is not None:
            return self._body_line(line, len(raw))
        key, colon, value = line.partition(":")
        key = key.strip()
        if not colon or key not in _REPLY_FIELDS[self._kind] or key in self._fields:
            kind = self._kind
            self._reset()
            raise ReplyError(f"unexpected line in a {kind} reply: {line!r}")
        if key == "MESSAGE":
            self._body = [value.removeprefix(" ")]
            self._body_bytes = len(self._body[0].encode())
            self._check_size()
            return None
        self._fields[key] = value.strip()
        if len(self._fields) <= len(_REPLY_FIELDS[self._kind]):
            return None
        return self._complete()

    def _first_line(self, line: str) -> Reply | None:
        if not line.strip():
            return None  # blank lines between replies
        if line.startswith("HELO ") or line == "HELO":
            self._kind = "HELO"
            self._fields = {"HELO": line[5:]}
            return None
        key, colon, value = line.partition(":")
        key = key.strip()
        if not colon or key not in _REPLY_FIELDS or key == "HELO":
            return Unrecognized(line)
        self._kind = key
        self._fields = {key: value.strip()}
        return None

    def _body_line(self, line: str, size: int) -> Reply | None:
        assert self._body is not None
        if line:
            self._body.append(line)
            self._body_bytes += size + 1
            self._check_size()
            return None
        self._fields["MESSAGE"] = "\n".join(self._body)
        return self._complete()

    def _check_size(self) -> None:
        if self._body_bytes > self._max_message:
            self._reset()
            raise ReplyError(f"chat message longer than {self._max_message} bytes")

    def _reset(self) -> None:
        self._kind = None
        self._fields = {}
        self._body = None
        self._body_bytes = 0

    def _complete(self) -> Reply:
        kind, fields = self._kind, self._fields
        self._reset()
        if kind == "JOINED_CHATROOM":
            return Joined(
                fields[kind],
                fields["SERVER_IP"],
                _integer(fields, "PORT"),
                _integer(fields, "ROOM_REF"),
                _integer(fields, "JOIN_ID"),
            )
        if kind == "LEFT_CHATROOM":
            return Left(_integer(fields, kind), _integer(fields, "JOIN_ID"))
        if kind == "CHAT":
            return ChatMessage(_integer(fields, kind), fields["CLIENT_NAME"], fields["MESSAGE"])
        if kind == "ERROR_CODE":
            return Error(_integer(fields, kind), fields["ERROR_DESCRIPTION"])
        return HeloReply(
            fields["HELO"], fields["IP"], _integer(fields, "Port"), fields["StudentID"]
        )


def _integer(fields: dict[str, str], key: str) -> int:
    value = fields[key]
    if not _INTEGER.fullmatch(value):
        raise ReplyError(f"{key} is not an integer: {value!r}")
    return int(value)


# -- the client ------------------------------------------------------------------------------


class ChatClient:
    """One connection to a chat server.

    The request methods only send: every reply and broadcast arrives, in the order the server
    sent it, through `receive` or by iterating over the client (which ends when the server
    closes the connection). One task may send while another receives.
    """

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.stream = stream
        self._lines = LineBuffer(MAX_REPLY_LINE)
        self._parser = ReplyParser()
        self._pending: deque[Reply] = deque()
        self._send_lock = trio.StrictFIFOLock()
        self._eof = False

    @classmethod
    async def connect(cls, host: str, port: int) -> ChatClient:
        """Open a TCP connection to the server at `host`:`port`."""
        return cls(await trio.open_tcp_stream(host, port))

    # -- requests ------------------------------------------------------------------------

    async def send(self, request: Request) -> None:
        """Send one request."""
        data = encode_request(request)
        async with self._send_lock:
            await self.stream.send_all(data)

    async def helo(self, text: str) -> None:
        """Send ``HELO text``; a `HeloReply` follows."""
        await self.send(Helo(text))

    async def join(self, room_name: str, client_name: str) -> None:
        """Join `room_name` as `client_name`; `Joined` and the announcement follow."""
        await self.send(Join(room_name, client_name))

    async def leave(self, room_ref: int, join_id: int, client_name: str) -> None:
        """Leave the room `room_ref`; `Left` and the announcement follow."""
        await self.send(Leave(room_ref, join_id, client_name))

    async def chat(self, room_ref: int, join_id: int, client_name: str, message: str) -> None:
        """Post `message` to the room `room_ref`; every member, this client too, receives it."""
        await self.send(Chat(room_ref, join_id, client_name, message))

    async def disconnect(self, client_name: str) -> None:
        """Leave every room and ask the server to close the connection."""
        await self.send(Disconnect(client_name))

    async def kill_service(self) -> None:
        """Ask the server to shut down."""
        await self.send(KillService())

    # -- events --------------------------------------------------------------------------

    async def receive(self) -> Reply:
        """The next event from the server; `EOFError` once the server has closed.

        Raises `ReplyError` if the server sends something malformed.
        """
        while not self._pending:
            if self._eof:
                raise EOFError("the server closed the connection")
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                self._eof = True
                continue
            try:
                lines = list(self._lines.feed(data))
            except ProtocolError as error:
                raise ReplyError(error.description) from None
            for line in lines:
                event = self._parser.feed_line(line)
                if event is not None:
                    self._pending.append(event)
        return self._pending.popleft()

    def __aiter__(self) -> ChatClient:
        return self

    async def __anext__(self) -> Reply:
        """The next event; iteration ends when the server closes the connection."""
        try:
            return await self.receive()
        except EOFError:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Close the connection."""
        await self.stream.aclose()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
