"""The chat protocol as pure data: bytes in, requests out; replies in, bytes out.

Nothing here performs I/O or knows about trio. `LineBuffer` frames bytes into lines under a
length limit, `RequestParser` turns lines into request objects (or `ProtocolError`s carrying the
protocol's error code), and the `encode_*` functions build the exact bytes of every reply and
broadcast that docs/protocol.md section 2 lists.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator

from attrs import field, frozen

# -- errors ----------------------------------------------------------------------------------


class ErrorCode(enum.IntEnum):
    """The `ERROR_CODE` values of docs/protocol.md section 5."""

    MALFORMED = 1
    NO_SUCH_ROOM = 2
    NOT_A_MEMBER = 3
    TOO_LARGE = 4
    LIMIT_REACHED = 5
    UNAVAILABLE = 6


class ProtocolError(Exception):
    """A recognised request that cannot be carried out; the client gets an ERROR_CODE reply."""

    def __init__(self, code: ErrorCode, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description

    @property
    def closes_connection(self) -> bool:
        """Whether the connection must be closed after the error is sent (error 4 only)."""
        return self.code is ErrorCode.TOO_LARGE


# -- framing ---------------------------------------------------------------------------------


class LineBuffer:
    """Splits a byte stream into lines on ``\\n``, never holding more than `max_line` bytes.

    A trailing ``\\r`` is removed from each line. If a line grows past `max_line` before its
    newline arrives, `lines` raises `ProtocolError` (error 4) and the buffer must be discarded.
    The bytes of an unfinished line are searched for a newline once: a long line arriving one
    byte at a time costs time in proportion to its length.
    """

    __slots__ = ("_buffer", "_max_line", "_scanned")

    def __init__(self, max_line: int) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._scanned = 0  # bytes at the front of the buffer known to hold no newline

    def feed(self, data: bytes | bytearray) -> Iterator[bytes]:
        """Add received bytes and yield every line they complete, without its terminator."""
        buffer = self._buffer
        buffer += data
        start = 0
        scan = self._scanned
        find = buffer.find
        max_line = self._max_line
        while (end := find(b"\n", scan)) >= 0:
            stop = end - 1 if end > start and buffer[end - 1] == 13 else end
            if stop - start > max_line:
                raise _line_too_long(max_line)
            yield bytes(buffer[start:stop])
            start = scan = end + 1
        del buffer[:start]
        self._scanned = len(buffer)
        if len(buffer) > max_line + 1:  # +1: a line may be complete but for its "\n" after "\r"
            raise _line_too_long(max_line)

    def __len__(self) -> int:
        """The number of bytes held for the line not yet complete."""
        return len(self._buffer)


def _line_too_long(max_line: int) -> ProtocolError:
    return ProtocolError(ErrorCode.TOO_LARGE, f"request line longer than {max_line} bytes")


# -- requests --------------------------------------------------------------------------------


@frozen
class Helo:
    """``HELO <text>``: asks the server to identify itself; `text` is echoed verbatim."""

    text: str


@frozen
class KillService:
    """``KILL_SERVICE``: stops the whole service."""


@frozen
class Join:
    """``JOIN_CHATROOM``: joins `room_name` as `client_name`."""

    room_name: str
    client_name: str


@frozen
class Leave:
    """``LEAVE_CHATROOM``: leaves the room with `room_ref`.

    `written` is the ROOM_REF and JOIN_ID as the request wrote them, which LEFT_CHATROOM
    echoes (docs/protocol.md section 5); requests compare equal whatever their spelling.
    """

    room_ref: int
    join_id: int
    client_name: str
    written: tuple[str, str] | None = field(default=None, eq=False)


@frozen
class Disconnect:
    """``DISCONNECT``: leaves every room and closes the connection."""

    client_name: str


@frozen
class Chat:
    """``CHAT``: posts `message` to the room with `room_ref` under `client_name`."""

    room_ref: int
    join_id: int
    client_name: str
    message: str


@frozen
class Unknown:
    """A first line that names no request: ignored without a reply (docs/protocol.md section 3)."""

    line: str


Request = Helo | KillService | Join | Leave | Disconnect | Chat
Event = Request | Unknown | ProtocolError

# Field keys after the first line, per request kind (docs/protocol.md section 1).
_FIELDS: dict[str, frozenset[str]] = {
    "JOIN_CHATROOM": frozenset({"CLIENT_IP", "PORT", "CLIENT_NAME"}),
    "LEAVE_CHATROOM": frozenset({"JOIN_ID", "CLIENT_NAME"}),
    "DISCONNECT": frozenset({"PORT", "CLIENT_NAME"}),
    "CHAT": frozenset({"JOIN_ID", "CLIENT_NAME", "MESSAGE"}),
}

# A CHAT request written the plain way, whole: what `RequestParser.plain_chat` takes in one
# step. Anything else (other spacing, CRLF, a multi-line message, a name with spaces around it
# or beyond printable ASCII) goes line by line, which gives the same result more slowly.
_PLAIN_CHAT = re.compile(
    rb"CHAT: ([0-9]{1,18})\nJOIN_ID: ([0-9]{1,18})\nCLIENT_NAME: ([!-~](?:[ -~]*[!-~])?)\n"
    rb"MESSAGE: ([^\r\n]*)\n\n"
)

# Longest room or client name, in bytes, unless the parser is given another limit. Names are
# kept for as long as a room or a membership lasts, so they are bounded well below a line.
DEFAULT_MAX_NAME = 256

# A ROOM_REF or JOIN_ID is an optional "-" and one or more decimal digits, of any length
# (docs/protocol.md section 5). Identifiers the service assigns are below 10**18, so a value of
# more significant digits names nothing, and is not converted (that would cost time in the
# number of digits squared): it becomes NO_SUCH_ID, which names nothing either.
_INTEGER = re.compile(r"-?[0-9]+")
_SIGNIFICANT_DIGITS = 18
NO_SUCH_ID: int = -(10**_SIGNIFICANT_DIGITS)
"""What a ROOM_REF or JOIN_ID too large to be assigned is read as: it names no room, and no
value of at most 18 digits reads as it, so it is told apart from any number written."""

# Bytes before a message's text on its first line: a one-line message of `max_message`
# bytes needs a line limit this much larger (docs/protocol.md section 6).
MESSAGE_PREFIX = len("MESSAGE: ")


class _Partial:
    """A multi-line request whose lines are still arriving."""

    __slots__ = ("body", "crlfs", "fields", "kind", "message_bytes")

    def __init__(self, kind: str, value: str) -> None:
        self.kind = kind
        self.fields = {kind: value}
        # CHAT only, once every field is in: the message's lines after its first, as bytes
        # received (line ends included), and how many of those line ends are CRLF.
        self.body: bytearray | None = None
        self.crlfs = 0
        self.message_bytes = 0  # of the message's first line, as relayed


# After a newline, an empty line: the end of a CHAT message.
_BLANK_LINE = re.compile(rb"\n\r?\n")


class RequestParser:
    """Turns lines into events, keeping the state of a request whose lines are still arriving.

    `feed_line` returns the events a line completes: usually none (a field line, a blank line
    between requests) or one. Malformed requests come back as `ProtocolError` values, so the
    caller handles replies and errors in one ordered stream. A request whose field lines stop
    early (a blank line, or a line that is not one of its missing fields) is malformed, and
    the line that ended it is read afresh as a first line: one bad request never swallows the
    good one after it.
    """

    __slots__ = ("_max_message", "_max_name", "_partial")

    def __init__(self, max_message: int, max_name: int = DEFAULT_MAX_NAME) -> None:
        self._max_message = max_message
        self._max_name = max_name
        self._partial: _Partial | None = None

    @property
    def idle(self) -> bool:
        """Whether no request is part-way through: the next line is a request's first."""
        return self._partial is None

    @property
    def in_body(self) -> bool:
        """Whether a CHAT has all its fields and waits for the rest of its message: then
        bytes go to `feed_body`, not lines to `feed_line`."""
        return self._partial is not None and self._partial.body is not None

    def plain_chat(
        self, data: bytes | bytearray, start: int, max_line: int
    ) -> tuple[Chat, int] | None:
        """The CHAT request at `data[start:]` and where it ends, if it is whole and plain.

        A shortcut for the commonest request, taken only when the parser is `idle` and
        `start` begins a line: it returns exactly the `Chat` that feeding the request's lines
        to `feed_line` would, or None when the request needs the line-by-line path (anything
        unusual, incomplete, or over `max_line` or the message limit).
        """
        if self._partial is not None:
            return None
        match = _PLAIN_CHAT.match(data, start)
        if match is None or match.end() - start > max_line:
            return None
        ref, join_id, name, raw = match.groups()
        if len(name) > self._max_name:
            return None  # the line-by-line path refuses it with error 1
        message = raw.decode("utf-8", "replace")
        if (len(raw) if raw.isascii() else len(message.encode())) > self._max_message:
            return None
        return Chat(int(ref), int(join_id), name.decode("ascii"), message), match.end()

    def feed_line(self, raw: bytes) -> tuple[Event, ...]:
        """Consume one line, without its terminator, and return the events it completes."""
        partial = self._partial
        if partial is None:
            return self._first_line(raw.decode("utf-8", "replace"))
        if partial.body is not None:
            event, _ = self.feed_body(raw + b"\r\n")  # the line as received, whatever its end
            if type(event) is ProtocolError and event.closes_connection:
                raise event
            return () if event is None else (event,)
        line = raw.decode("utf-8", "replace")
        key, colon, value = line.partition(":")
        key = key.strip()
        if not colon or key not in _FIELDS[partial.kind] or key in partial.fields:
            self._partial = None
            missing = sorted(_FIELDS[partial.kind] - partial.fields.keys())
            error = ProtocolError(
                ErrorCode.MALFORMED, f"{partial.kind} request is missing {', '.join(missing)}"
            )
            return (error, *self._first_line(line))
        if key == "MESSAGE":
            value = value[1:] if value.startswith(" ") else value
            self._count_message(partial, len(value.encode()))
        else:
            value = value.strip()
        partial.fields[key] = value
        if len(partial.fields) <= len(_FIELDS[partial.kind]):
            return ()
        if partial.kind == "CHAT":
            partial.body = bytearray()
            return ()
        self._partial = None
        return (_build(partial.kind, partial.fields, self._max_name),)

    def _first_line(self, line: str) -> tuple[Event, ...]:
        stripped = line.strip()
        if not stripped:
            return ()  # blank lines between requests are ignored
        if stripped == "KILL_SERVICE":
            return (KillService(),)
        if line.startswith("HELO") and (len(line) == 4 or line[4] == " "):
            return (Helo(line[5:]),)
        key, colon, value = line.partition(":")
        key = key.strip()
        if colon and key in _FIELDS:
            self._partial = _Partial(key, value.strip())
            return ()
        return (Unknown(line),)

    def feed_body(self, data: bytes | bytearray, start: int = 0) -> tuple[Event | None, int]:
        """Take the bytes of a CHAT message (when `in_body`) from `data[start:]`.

        Returns the request and where the bytes after it begin, once the blank line that ends
        the message has arrived; else None and ``len(data)``, keeping the bytes. A message
        over the limit gives `ProtocolError` (error 4) as the event, and what it held is
        dropped. A message is held as the bytes received, in one buffer, and each byte is
        searched once: time and memory in proportion to its size, whatever its number of
        lines.
        """
        partial = self._partial
        assert partial is not None
        assert partial.body is not None
        body = partial.body
        end = len(data)
        # A blank line may begin where the held bytes end (or one byte before, if they end
        # with the CR of a CRLF blank line).
        found: tuple[int, int] | None = None
        if not body or body.endswith(b"\n"):
            if data.startswith(b"\n", start):
                found = (start, start + 1)
            elif data.startswith(b"\r\n", start):
                found = (start, start + 2)
        elif (body == b"\r" or body.endswith(b"\n\r")) and data.startswith(b"\n", start):
            del body[-1:]
            found = (start, start + 1)
        if found is None and (match := _BLANK_LINE.search(data, start)) is not None:
            found = (match.start() + 1, match.end())
        if found is None:
            if body.endswith(b"\r") and data.startswith(b"\n", start):
                partial.crlfs += 1
            partial.crlfs += data.count(b"\r\n", start, end)
            body += memoryview(data)[start:end]
            # At least this much is relayed (CRs of CRLFs dropped; invalid UTF-8 only grows).
            if partial.message_bytes + len(body) - partial.crlfs > self._max_message:
                return self._too_large(), end
            return None, end
        lines_end, rest = found
        body += memoryview(data)[start:lines_end]
        message = partial.fields["MESSAGE"]
        if body:
            # Each line loses one CR before its LF, as lines always do; the last newline
            # stands for the one joining the first line to the rest.
            region = body.replace(b"\r\n", b"\n")
            text = region[:-1].decode("utf-8", "replace")
            size = len(region) if region.isascii() else 1 + len(text.encode())
            if partial.message_bytes + size > self._max_message:
                return self._too_large(), rest
            message = f"{message}\n{text}"
        self._partial = None
        partial.fields["MESSAGE"] = message
        return _build(partial.kind, partial.fields, self._max_name), rest

    def _too_large(self) -> ProtocolError:
        self._partial = None
        return ProtocolError(
            ErrorCode.TOO_LARGE, f"chat message longer than {self._max_message} bytes"
        )

    def _count_message(self, partial: _Partial, size: int) -> None:
        # Counts the text as relayed (UTF-8, invalid bytes replaced), newlines included.
        partial.message_bytes += size
        if partial.message_bytes > self._max_message:
            raise self._too_large()


def _integer(fields: dict[str, str], key: str) -> int:
    value = fields[key]
    if not _INTEGER.fullmatch(value):
        raise ProtocolError(ErrorCode.MALFORMED, f"{key} must be an integer")
    if len(value) - (value[0] == "-") > _SIGNIFICANT_DIGITS and (
        len(value.lstrip("-").lstrip("0")) > _SIGNIFICANT_DIGITS
    ):
        return NO_SUCH_ID
    return int(value)


def _name(fields: dict[str, str], key: str, max_name: int) -> str:
    value = fields[key]
    if not value:
        raise ProtocolError(ErrorCode.MALFORMED, f"{key} must not be empty")
    if len(value) > max_name or (not value.isascii() and len(value.encode()) > max_name):
        raise ProtocolError(ErrorCode.MALFORMED, f"{key} longer than {max_name} bytes")
    return value


def _build(kind: str, fields: dict[str, str], max_name: int) -> Event:
    try:
        if kind == "CHAT":
            return Chat(
                _integer(fields, "CHAT"),
                _integer(fields, "JOIN_ID"),
                _name(fields, "CLIENT_NAME", max_name),
                fields["MESSAGE"],
            )
        if kind == "JOIN_CHATROOM":
            return Join(
                _name(fields, "JOIN_CHATROOM", max_name), _name(fields, "CLIENT_NAME", max_name)
            )
        if kind == "LEAVE_CHATROOM":
            return Leave(
                _integer(fields, "LEAVE_CHATROOM"),
                _integer(fields, "JOIN_ID"),
                _name(fields, "CLIENT_NAME", max_name),
                (fields["LEAVE_CHATROOM"], fields["JOIN_ID"]),
            )
        return Disconnect(_name(fields, "CLIENT_NAME", max_name))
    except ProtocolError as error:
        return error


# -- replies and broadcasts (docs/protocol.md section 2) ------------------------------------------


def encode_joined(room_name: str, server_ip: str, port: int, room_ref: int, join_id: int) -> bytes:
    """The JOINED_CHATROOM reply."""
    return (
        f"JOINED_CHATROOM: {room_name}\nSERVER_IP: {server_ip}\nPORT: {port}\n"
        f"ROOM_REF: {room_ref}\nJOIN_ID: {join_id}\n"
    ).encode()


def encode_left(room_ref: int | str, join_id: int | str) -> bytes:
    """The LEFT_CHATROOM reply (the identifiers as the request wrote them, or as numbers)."""
    return f"LEFT_CHATROOM: {room_ref}\nJOIN_ID: {join_id}\n".encode()


def encode_chat(room_ref: int, client_name: str, message: str) -> bytes:
    """A CHAT broadcast, as every member of the room receives it."""
    return f"CHAT: {room_ref}\nCLIENT_NAME: {client_name}\nMESSAGE: {message}\n\n".encode()


def encode_joined_announcement(room_ref: int, client_name: str) -> bytes:
    """The CHAT broadcast announcing that `client_name` joined the room."""
    return encode_chat(room_ref, client_name, f"{client_name} has joined this chatroom.")


def encode_left_announcement(room_ref: int, client_name: str) -> bytes:
    """The CHAT broadcast announcing that `client_name` left the room."""
    return encode_chat(room_ref, client_name, f"{client_name} has left this chatroom.")


def encode_error(error: ProtocolError) -> bytes:
    """The ERROR_CODE reply for `error`."""
    description = " ".join(error.description.split())  # always exactly one line
    return f"ERROR_CODE: {int(error.code)}\nERROR_DESCRIPTION: {description}\n".encode()


def encode_helo(text: str, ip: str, port: int, student_id: str) -> bytes:
    """The HELO reply."""
    return f"HELO {text}\nIP:{ip}\nPort:{port}\nStudentID:{student_id}\n".encode()
