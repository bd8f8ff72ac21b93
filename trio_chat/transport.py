"""What a connection needs from whatever carries its bytes, and the adapter for trio streams.

A `Connection` (connection.py) serves any `Transport`: plain TCP and TLS through
`StreamTransport`, and any other door (a WebSocket, say) through an adapter of its own. The
protocol's bytes are the same whatever the transport; only the framing of what is sent may
differ, which is why `Transport.send` takes the pending messages one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

import trio


class Transport(Protocol):
    """A client's connection as the server sees it: bytes in, messages out.

    `receive` and `send` raise `trio.BrokenResourceError` when the client is gone; `receive`
    returns ``b""`` at the end of the client's input. At most one task receives and at most
    one task sends at a time.
    """

    local: tuple[str, int]
    """The address and port the client reached (what HELO and JOINED report)."""
    peer: str
    """Who the client is, for the log (``ip:port``)."""

    async def receive(self, max_bytes: int) -> bytes | bytearray:
        """Some bytes from the client (at most `max_bytes`), or ``b""`` at end of input."""
        ...

    async def send(self, messages: Sequence[bytes]) -> None:
        """Send `messages` in order; each is one whole reply or broadcast (or, after a
        partial direct write, the rest of one), so a message-framed transport sends each as
        one message and a byte stream sends them joined."""
        ...

    async def send_eof(self) -> None:
        """End the output; the client still may send (and the server still reads)."""
        ...

    async def aclose(self) -> None:
        """Close at once, without waiting for the peer; never raises but `Cancelled`."""
        ...

    def fileno(self) -> int | None:
        """The socket's descriptor if the outbox may write to it directly, else None.

        Only a plain socket offers this; see outbox.py for the rules of direct writes.
        """
        ...


class StreamTransport:
    """A `Transport` over a trio stream: a `trio.SocketStream`, a `trio.SSLStream`, or an
    in-memory stream in tests."""

    __slots__ = ("_closed_by_eof", "_fileno", "local", "peer", "stream")

    def __init__(self, stream: trio.abc.Stream, *, local: tuple[str, int], peer: str) -> None:
        self.stream = stream
        self.local = local
        self.peer = peer
        self._fileno = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self._closed_by_eof = False

    @classmethod
    def from_socket(cls, stream: trio.SocketStream) -> StreamTransport:
        """A transport over the accepted `stream`, its addresses read from the socket.

        Raises `OSError` if the client is already gone.
        """
        local, peer = socket_addresses(stream)
        return cls(stream, local=local, peer=peer)

    async def receive(self, max_bytes: int) -> bytes | bytearray:
        """Some bytes from the stream, ``b""`` at its end (or once `send_eof` closed it)."""
        try:
            return await self.stream.receive_some(max_bytes)
        except trio.ClosedResourceError:
            if self._closed_by_eof:
                return b""
            raise

    async def send(self, messages: Sequence[bytes]) -> None:
        """Send the messages joined, in one `send_all`."""
        await self.stream.send_all(messages[0] if len(messages) == 1 else b"".join(messages))

    async def send_eof(self) -> None:
        """Half-close (FIN) where the stream can; otherwise (TLS) close it gracefully."""
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()
        else:
            self._fileno = None
            self._closed_by_eof = True
            await self.stream.aclose()

    async def aclose(self) -> None:
        """Close at once."""
        self._fileno = None
        if isinstance(self.stream, trio.SocketStream):
            # A plain socket closes without waiting for anything (waiters are woken), and at
            # shutdown thousands close together: no cancel scope and no checkpoint each.
            self.stream.socket.close()
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.aclose_forcefully(self.stream)

    def fileno(self) -> int | None:
        """The descriptor of a plain socket stream that is still open."""
        return self._fileno


def socket_addresses(stream: trio.SocketStream) -> tuple[tuple[str, int], str]:
    """The (ip, port) the client of an accepted `stream` reached, and the client as
    ``ip:port`` for the log. Raises `OSError` if the client is already gone."""
    local = stream.socket.getsockname()
    peer = stream.socket.getpeername()
    return (local[0], local[1]), f"{display_ip(peer[0])}:{peer[1]}"


def display_ip(ip: str) -> str:
    """`ip` without the ``::ffff:`` of an IPv4-mapped IPv6 address."""
    return ip.removeprefix("::ffff:") if "." in ip else ip
