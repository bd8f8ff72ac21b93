"""A minimal WebSocket test client: wsproto over a trio TCP stream, frames under the test's
control (whole or fragmented text, binary, raw bytes), replies read one message at a time.

It uses no part of the project, so tests check the web door as any WebSocket client sees it.
"""

from __future__ import annotations

import ssl

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from tests.chatclient import RECEIVE_TIMEOUT


class Rejected(Exception):
    """The server answered the opening handshake with an HTTP error."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"{status} {body!r}")
        self.status = status
        self.body = body


class Closed(Exception):
    """The server closed the WebSocket with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class WebSocketClient:
    """One WebSocket connection to the web door."""

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self._events: list[Event] = []
        self._text: list[str] = []
        self.pongs: list[bytes] = []  # payloads of the pongs received so far

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        origin: str | None = None,
        path: str = "/ws",
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> WebSocketClient:
        """Open a WebSocket to the web door on `port` (over TLS with a `tls` context); raise
        `Rejected` if it refuses."""
        stream = await open_stream(port, host, tls)
        ws = WSConnection(ConnectionType.CLIENT)
        headers = [(b"origin", origin.encode())] if origin is not None else []
        await stream.send_all(
            ws.send(Request(host=f"{host}:{port}", target=path, extra_headers=headers))
        )
        client = cls(stream, ws)
        status = 0
        body = b""
        with trio.fail_after(RECEIVE_TIMEOUT):
            while True:
                event = await client._next_event()
                if isinstance(event, AcceptConnection):
                    return client
                if isinstance(event, RejectConnection):
                    status = event.status_code
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        await trio.aclose_forcefully(stream)
                        raise Rejected(status, body)

    async def _next_event(self) -> Event:
        while not self._events:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the server closed the TCP connection")
            self.ws.receive_data(bytes(data))
            self._events.extend(self.ws.events())
        return self._events.pop(0)

    async def send_text(self, text: str, *, finished: bool = True) -> None:
        """Send `text` as a text message (or, with ``finished=False``, its first frames)."""
        await self.stream.send_all(self.ws.send(TextMessage(data=text, message_finished=finished)))

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary message."""
        await self.stream.send_all(self.ws.send(BytesMessage(data=data)))

    async def ping(self, payload: bytes) -> None:
        """Send a ping."""
        await self.stream.send_all(self.ws.send(Ping(payload=payload)))

    async def send_raw(self, data: bytes) -> None:
        """Send bytes as they are, frames or not."""
        await self.stream.send_all(data)

    async def receive(self) -> str:
        """The next whole text message; `Closed` if the server closed instead."""
        with trio.fail_after(RECEIVE_TIMEOUT):
            while True:
                event = await self._next_event()
                if isinstance(event, TextMessage):
                    self._text.append(event.data)
                    if event.message_finished:
                        text = "".join(self._text)
                        self._text.clear()
                        return text
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        await self.stream.send_all(self.ws.send(event.response()))
                    raise Closed(event.code, event.reason or "")
                elif isinstance(event, Pong):
                    self.pongs.append(bytes(event.payload))
                else:
                    raise AssertionError(f"unexpected {event!r}")

    async def expect(self, *messages: str) -> None:
        """Assert the next messages are exactly `messages`, one WebSocket message each."""
        for expected in messages:
            assert await self.receive() == expected

    async def expect_close(self) -> int:
        """Read until the server closes; the code it closed with."""
        try:
            while True:
                await self.receive()
        except Closed as closed:
            return closed.code

    async def send_close(self) -> None:
        """Send a close frame (1000) and nothing else."""
        await self.stream.send_all(self.ws.send(CloseConnection(code=1000)))

    async def close(self) -> None:
        """Close the WebSocket as a browser does, and the TCP connection after."""
        if self.ws.state is ConnectionState.OPEN:
            await self.stream.send_all(self.ws.send(CloseConnection(code=1000)))
        await self.stream.aclose()


async def open_stream(port: int, host: str, tls: ssl.SSLContext | None) -> trio.abc.Stream:
    """A TCP connection to `host`:`port`, inside TLS if given a context."""
    stream = await trio.open_tcp_stream(host, port)
    if tls is None:
        return stream
    encrypted = trio.SSLStream(stream, tls, server_hostname=host)
    with trio.fail_after(RECEIVE_TIMEOUT):
        await encrypted.do_handshake()
    return encrypted


async def fetch(
    port: int, *targets: str, method: str = "GET", tls: ssl.SSLContext | None = None
) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Request `targets` one after another on one HTTP connection (HTTPS with a `tls`
    context): (status, headers, body) of each response, until the server answers them all
    or closes the connection."""
    stream = await open_stream(port, "127.0.0.1", tls)
    client = h11.Connection(h11.CLIENT)
    responses: list[tuple[int, dict[bytes, bytes], bytes]] = []
    with trio.fail_after(RECEIVE_TIMEOUT):
        for target in targets:
            request = h11.Request(
                method=method, target=target, headers=[("host", f"127.0.0.1:{port}")]
            )
            await stream.send_all(
                (client.send(request) or b"") + (client.send(h11.EndOfMessage()) or b"")
            )
            status, headers, body = 0, {}, b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status, headers = event.status_code, dict(event.headers)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            responses.append((status, headers, body))
            if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                break
            client.start_next_cycle()
    await stream.aclose()
    return responses


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw `data` to the web door and read what it answers until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    received = b""
    with trio.fail_after(RECEIVE_TIMEOUT):
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return received
