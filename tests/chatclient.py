"""A minimal test client: sends raw protocol text, reads exact bytes back.

Tests use it rather than `trio_chat.client` so that they check the wire itself, byte for
byte, with nothing of the project's own parsing between the test and the server.
"""

from __future__ import annotations

import socket

import trio

# How long a test waits for bytes that should arrive. Generous, because it only matters when
# the server is wrong (a correct server answers in microseconds) and CI machines are shared.
RECEIVE_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port free on every IPv4 address right now (bound to port 0, then released)."""
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        port: int = sock.getsockname()[1]
        return port


class Client:
    """One connection, with helpers to send requests and expect exact replies."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> Client:
        """Open a TCP connection to a server."""
        return cls(await trio.open_tcp_stream(host, port))

    async def send(self, text: str | bytes) -> None:
        """Send `text` as it is (no newline added)."""
        await self.stream.send_all(text.encode() if isinstance(text, str) else text)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
            raise EOFError("the server closed the connection")
        self.buffer += data

    async def receive_exactly(self, size: int) -> bytes:
        """The next `size` bytes."""
        with trio.fail_after(RECEIVE_TIMEOUT):
            while len(self.buffer) < size:
                await self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def expect(self, text: str) -> None:
        """Assert the next bytes received are exactly `text`."""
        expected = text.encode()
        received = await self.receive_exactly_or_less(len(expected))
        assert received.decode(errors="replace") == text, f"expected {text!r}, got {received!r}"

    async def receive_exactly_or_less(self, size: int) -> bytes:
        """The next `size` bytes, or fewer if the server closes first."""
        try:
            return await self.receive_exactly(size)
        except EOFError:
            data = bytes(self.buffer)
            self.buffer.clear()
            return data

    async def receive_until(self, marker: bytes) -> bytes:
        """Everything up to and including the first `marker`."""
        with trio.fail_after(RECEIVE_TIMEOUT):
            while (end := self.buffer.find(marker)) < 0:
                await self._fill()
        end += len(marker)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    async def barrier(self) -> None:
        """Prove the server handled all this client sent, and that nothing else is waiting.

        A HELO round trip: its reply comes after every reply to earlier requests, so after it
        the buffer must hold nothing else.
        """
        await self.send("HELO barrier\n")
        data = await self.receive_until(b"StudentID:")
        data += await self.receive_until(b"\n")
        head, _, helo = data.partition(b"HELO barrier\n")
        assert head == b"", f"unexpected bytes before the HELO reply: {head!r}"
        assert helo.startswith(b"IP:")

    async def expect_nothing(self) -> None:
        """Assert nothing has arrived (beyond what was read) by a HELO round trip."""
        await self.barrier()

    async def expect_eof(self) -> None:
        """Assert the server closes the connection, with nothing more sent."""
        with trio.fail_after(RECEIVE_TIMEOUT):
            while not self.eof:
                try:
                    await self._fill()
                except EOFError:
                    break
                except trio.BrokenResourceError:
                    break
        assert bytes(self.buffer) == b"", bytes(self.buffer)

    async def expect_error(self, code: int) -> str:
        """Assert the next reply is an ERROR_CODE `code` with a one-line description; return it."""
        await self.expect(f"ERROR_CODE: {code}\nERROR_DESCRIPTION: ")
        description = (await self.receive_until(b"\n")).decode()
        assert description.strip(), "the error has no description"
        return description[:-1]

    async def send_eof(self) -> None:
        """End the sending side (half-close) and keep receiving; close if it cannot half-close."""
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()
        else:
            await self.stream.aclose()

    async def aclose(self) -> None:
        """Close the connection."""
        await self.stream.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def expect_refused(port: int, host: str = "127.0.0.1") -> None:
    """Assert that nothing listens on `host`:`port`: a TCP connection attempt is refused."""
    with trio.socket.socket() as sock:
        try:
            await sock.connect((host, port))
        except ConnectionRefusedError:
            return
    raise AssertionError(f"{host}:{port} accepted a connection")


# -- the wire text of requests and replies (docs/protocol.md sections 1 and 2), written out here
# rather than taken from trio_chat.protocol so that tests check the bytes independently.


def join_request(room: str, name: str) -> str:
    """A JOIN_CHATROOM request, as TCP clients send it (CLIENT_IP and PORT 0)."""
    return f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: {name}\n"


def leave_request(room_ref: int, join_id: int, name: str) -> str:
    """A LEAVE_CHATROOM request."""
    return f"LEAVE_CHATROOM: {room_ref}\nJOIN_ID: {join_id}\nCLIENT_NAME: {name}\n"


def chat_request(room_ref: int, join_id: int, name: str, message: str) -> str:
    """A CHAT request; `message` may span several lines."""
    return f"CHAT: {room_ref}\nJOIN_ID: {join_id}\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n"


def disconnect_request(name: str) -> str:
    """A DISCONNECT request, as TCP clients send it (address and port 0)."""
    return f"DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: {name}\n"


def helo_reply(text: str, ip: str, port: int, student_id: str) -> str:
    """The server's reply to ``HELO <text>``."""
    return f"HELO {text}\nIP:{ip}\nPort:{port}\nStudentID:{student_id}\n"


def joined_reply(room: str, ip: str, port: int, room_ref: int, join_id: int) -> str:
    """The JOINED_CHATROOM reply."""
    return (
        f"JOINED_CHATROOM: {room}\nSERVER_IP: {ip}\nPORT: {port}\n"
        f"ROOM_REF: {room_ref}\nJOIN_ID: {join_id}\n"
    )


def left_reply(room_ref: int, join_id: int) -> str:
    """The LEFT_CHATROOM reply."""
    return f"LEFT_CHATROOM: {room_ref}\nJOIN_ID: {join_id}\n"


def chat_broadcast(room_ref: int, name: str, message: str) -> str:
    """A CHAT as room members receive it."""
    return f"CHAT: {room_ref}\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n"


def joined_announcement(room_ref: int, name: str) -> str:
    """The broadcast announcing that `name` joined."""
    return chat_broadcast(room_ref, name, f"{name} has joined this chatroom.")


def left_announcement(room_ref: int, name: str) -> str:
    """The broadcast announcing that `name` left."""
    return chat_broadcast(room_ref, name, f"{name} has left this chatroom.")
