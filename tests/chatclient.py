"""A minimal test client: sends raw protocol text, reads exact bytes back.

Tests use it rather than `trio_chat.client` so that they check the wire itself, byte for
byte, with nothing of the project's own parsing between the test and the server.
"""

from __future__ import annotations

import trio

# How long a test waits for bytes that should arrive. Generous, because it only matters when
# the server is wrong (a correct server answers in microseconds) and CI machines are shared.
RECEIVE_TIMEOUT = 10.0


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
        assert received.decode(errors="replace") == text

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
        assert bytes(self.buffer) == b""

    async def aclose(self) -> None:
        """Close the connection."""
        await self.stream.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
