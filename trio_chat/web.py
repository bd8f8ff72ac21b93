"""The web door: the chat page over HTTP, and the chat protocol over a WebSocket.

h11 parses HTTP/1.1 and wsproto does the WebSocket handshake and framing; this module decides
what each request gets (`route`, no I/O), serves the page's files shipped in
``trio_chat/static``, checks a WebSocket's Origin, and turns an accepted WebSocket into a
transport that the chat server serves like a TCP connection (`WebSocketTransport`): each
text message from the client is fed to the same request reader as TCP bytes, and each reply
or broadcast leaves as one text message holding exactly the protocol's bytes
(docs/protocol.md, section 7).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import logging
import math
import os
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus

import h11
import trio
import wsproto
import wsproto.utilities
from attrs import frozen
from wsproto.connection import Connection as WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from trio_chat import tls
from trio_chat.config import Config
from trio_chat.transport import Transport, socket_addresses

log = logging.getLogger("trio_chat")

WEBSOCKET_PATH = "/ws"

# What the page may load and reach: its own files and its own WebSocket, nothing else; no
# other site may frame it.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

# The page's files: request path -> (file in trio_chat/static, content type).
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/chat.css": ("chat.css", "text/css; charset=utf-8"),
}


@functools.cache
def static_file(name: str) -> bytes:
    """The bytes of one of the page's files, read from the package once."""
    return importlib.resources.files("trio_chat").joinpath("static", name).read_bytes()


# -- deciding what a request gets (no I/O) ------------------------------------------------------


@frozen
class Response:
    """An HTTP response to send whole; `close` ends the connection after it."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    close: bool = False

    def events(self, *, head_only: bool) -> list[h11.Event]:
        """The h11 events that send this response (no body for a HEAD request)."""
        headers = [*self.headers, (b"content-length", str(len(self.body)).encode())]
        if self.close:
            headers.append((b"connection", b"close"))
        reason = HTTPStatus(self.status).phrase.encode()
        response = h11.Response(status_code=self.status, headers=headers, reason=reason)
        events: list[h11.Event] = [response]
        if self.body and not head_only:
            events.append(h11.Data(data=self.body))
        events.append(h11.EndOfMessage())
        return events


@frozen
class Upgrade:
    """An accepted WebSocket: the 101 response's bytes and the frame protocol that follows."""

    handshake: bytes
    connection: WebSocketConnection


def error_response(status: int, text: str, *headers: tuple[bytes, bytes]) -> Response:
    """A plain-text error that says what went wrong; the connection closes after it."""
    body = f"{status} {text}\n".encode()
    content = (b"content-type", b"text/plain; charset=utf-8")
    return Response(status, (content, *headers), body, close=True)


def route(request: h11.Request, config: Config) -> Response | Upgrade:
    """What `request` gets: one of the page's files, a WebSocket, or an HTTP error."""
    if request.method not in (b"GET", b"HEAD"):
        return error_response(405, "only GET and HEAD are served", (b"allow", b"GET, HEAD"))
    path = urllib.parse.urlsplit(request.target.decode("ascii", "replace")).path
    if path == WEBSOCKET_PATH:
        return _upgrade(request, config)
    if path not in _STATIC:
        return error_response(404, f"nothing at {path}; the chat page is at /")
    name, content_type = _STATIC[path]
    headers = (
        (b"content-type", content_type.encode()),
        (b"cache-control", b"no-cache"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"content-security-policy", _PAGE_POLICY.encode()),
    )
    return Response(200, headers, static_file(name))


def _upgrade(request: h11.Request, config: Config) -> Response | Upgrade:
    headers = dict(request.headers)  # h11 gives lower-case names
    if b"websocket" not in headers.get(b"upgrade", b"").lower():
        return error_response(
            426, f"{WEBSOCKET_PATH} takes WebSocket connections only", (b"upgrade", b"websocket")
        )
    if request.method != b"GET":
        return error_response(405, "a WebSocket opens with GET", (b"allow", b"GET"))
    websocket = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    try:
        websocket.initiate_upgrade_connection(list(request.headers), request.target)
        for _ in websocket.events():
            pass  # the handshake's Request event: its checks have passed
    except wsproto.utilities.RemoteProtocolError as exc:
        hint = exc.event_hint
        status = hint.status_code if isinstance(hint, RejectConnection) else 400
        extra = tuple(hint.headers) if isinstance(hint, RejectConnection) else ()
        return error_response(status, f"bad WebSocket handshake: {exc}", *extra)
    origin = headers.get(b"origin")
    if origin is not None and not origin_allowed(
        origin.decode("ascii", "replace"), headers[b"host"].decode("ascii", "replace"), config
    ):
        page = origin.decode("ascii", "replace")
        return error_response(403, f"pages from {page} may not open this WebSocket")
    handshake = websocket.send(AcceptConnection())
    assert websocket.connection is not None  # accepting opens it
    return Upgrade(handshake, websocket.connection)


def origin_allowed(origin: str, host: str, config: Config) -> bool:
    """Whether a page from `origin` may open the WebSocket of the server reached as `host`.

    The server's own page always may: its origin is the address the browser used to reach
    this server, which it also sent as the Host header. Pages from the origins listed in
    `web_origins` may too, and any page if that list holds ``*``.
    """
    allowed = {f"http://{host}", f"https://{host}", *config.web_origins}
    return "*" in allowed or origin.lower() in {a.lower().rstrip("/") for a in allowed}


# -- the trio side ------------------------------------------------------------------------------


class WebListenError(OSError):
    """The web door could not listen: `error` says why (its address, not the chat port's)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.errno, error.strerror)
        self.error = error


class WebSocketTransport:
    """An accepted WebSocket as the chat server sees a connection: bytes in, messages out.

    `receive` returns the text of the client's messages as UTF-8 bytes, piece by piece as
    frames arrive (a message may hold part of a request, one, or several), and ``b""`` once
    the client closed, the socket ended, or the client broke a rule of the door: a binary
    message (close code 1003), a message over `web_max_message` (1009), a malformed frame or
    invalid UTF-8 (wsproto's code: 1002 or 1007). After a binary or oversized message it
    first waits, within `disconnect_grace`, for the client's answering close, so the client
    reads the code before the socket goes (after a malformed frame nothing more can be
    parsed, so it does not wait). `send` sends each reply or broadcast as one text message.

    The reader and the writer both send (pongs and closes from one, messages from the
    other), so every send goes through one lock, and frames are built inside it, in the
    order they go out.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: WebSocketConnection,
        config: Config,
        *,
        local: tuple[str, int],
        peer: str,
    ) -> None:
        self.stream = stream
        # A plain socket's descriptor, for the close frame written at shutdown (see aclose).
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self.local = local
        self.peer = peer
        self._ws = connection
        self._config = config
        self._send_lock = trio.StrictFIFOLock()
        self._message_size = 0  # bytes of the client's current message so far
        self._input_over = False  # no more frames will be read
        self._torn = False  # a send was interrupted part-way: nothing more may follow
        self.sent_close_code: int | None = None  # the code of this side's close frame

    def fileno(self) -> None:
        """No direct writes: every message needs its frame."""

    async def receive(self, max_bytes: int) -> bytes:
        """The next piece of the client's text, or ``b""`` at the end of its input."""
        ws = self._ws
        while not self._input_over:
            for event in ws.events():
                if isinstance(event, TextMessage):
                    data = event.data.encode()
                    self._message_size += len(data)
                    if self._message_size > self._config.web_max_message:
                        limit = self._config.web_max_message
                        await self._refuse(CloseReason.MESSAGE_TOO_BIG, f"over {limit} bytes")
                        break
                    if event.message_finished:
                        self._message_size = 0
                    if data:
                        return data
                elif isinstance(event, BytesMessage):
                    await self._refuse(CloseReason.UNSUPPORTED_DATA, "send text, not binary")
                    break
                elif isinstance(event, Ping):
                    await self._send_frame(event.response())
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:  # the client closed
                        self._input_over = True
                        await self._send_frame(event.response())
                    else:  # wsproto's verdict: after a malformed frame nothing more parses
                        reason = event.reason or "malformed frame"
                        await self._refuse(event.code, reason, await_answer=False)
                    break
            else:
                data = bytes(await self.stream.receive_some(max_bytes))  # TLS gives bytearray
                if not data:
                    self._input_over = True
                    break
                ws.receive_data(data)
        return b""

    async def _refuse(self, code: int, reason: str, *, await_answer: bool = True) -> None:
        """Close with `code` after the client broke a rule, and wait (within the grace) for
        its answering close if it can still be read: its input is over either way."""
        self._input_over = True
        log.info("%s: closing the WebSocket with %d (%s)", self.peer, code, reason)
        await self._send_frame(CloseConnection(code=code, reason=reason))
        if not await_answer:
            return
        ws = self._ws
        with trio.move_on_after(self._config.disconnect_grace):
            while ws.state is ConnectionState.LOCAL_CLOSING:
                data = bytes(await self.stream.receive_some(self._config.receive_size))
                if not data:
                    break
                ws.receive_data(data)
                for _ in ws.events():
                    pass  # only the client's close matters now

    async def _send_frame(self, event: CloseConnection | Pong) -> None:
        async with self._send_lock:
            state = self._ws.state
            if isinstance(event, CloseConnection):
                if state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                    return
                self.sent_close_code = event.code
            elif state is not ConnectionState.OPEN:
                return
            await self._send_all(self._ws.send(event))

    async def _send_all(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except BaseException:
            self._torn = True
            raise

    async def send(self, messages: Sequence[bytes]) -> None:
        """Send each of `messages` as one text message, all in one write to the socket.

        Once either side has begun closing, messages are dropped: the client said it wants
        no more, or was told it gets no more.
        """
        async with self._send_lock:
            if self._ws.state is not ConnectionState.OPEN:
                return
            send = self._ws.send
            frames = [send(TextMessage(data=m.decode("utf-8", "replace"))) for m in messages]
            await self._send_all(frames[0] if len(frames) == 1 else b"".join(frames))

    async def send_eof(self) -> None:
        """Begin the closing handshake (code 1000): the server has nothing more to send."""
        await self._send_frame(CloseConnection(code=CloseReason.NORMAL_CLOSURE))

    async def aclose(self) -> None:
        """Close at once. A WebSocket still open on a plain socket gets one non-blocking try
        at a close frame first: 1001 when the service is stopping (this runs cancelled), else
        1000, so that a browser tells its user why rather than showing a broken connection.
        (Over TLS a frame cannot be written without awaiting: the browser sees the end.)"""
        if self._ws.state is ConnectionState.OPEN and not self._torn and self._fd is not None:
            if trio.current_effective_deadline() == -math.inf:  # shutdown
                goodbye = CloseConnection(CloseReason.GOING_AWAY, "server stopping")
            else:
                goodbye = CloseConnection(CloseReason.NORMAL_CLOSURE)
            self.sent_close_code = goodbye.code
            with contextlib.suppress(OSError):
                os.write(self._fd, self._ws.send(goodbye))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.aclose_forcefully(self.stream)


class WebDoor:
    """Serves connections to the web door: the page over HTTP, and WebSockets handed to
    `serve_transport` (the chat server's) as members like any other."""

    def __init__(
        self,
        config: Config,
        serve_transport: Callable[[Transport], Awaitable[None]],
        tls_context: ssl.SSLContext | None = None,
        on_tls_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.serve_transport = serve_transport
        self.tls_context = tls_context  # with `Config.web_tls`: HTTPS and secure WebSockets
        self.on_tls_failure = on_tls_failure  # for metrics: a handshake failed or timed out

    async def serve_socket(self, stream: trio.SocketStream) -> None:
        """Serve one accepted connection: HTTP, until it ends or becomes a WebSocket."""
        try:
            local, peer = socket_addresses(stream)
        except OSError:  # the client is already gone
            await trio.aclose_forcefully(stream)
            return
        http_stream: trio.abc.Stream = stream
        if self.config.web_tls:
            assert self.tls_context is not None
            # Here, in the client's own task: a slow handshake holds up no one else.
            encrypted = await tls.accept_tls(
                stream,
                self.tls_context,
                handshake_timeout=self.config.tls_handshake_timeout,
                peer=peer,
            )
            if encrypted is None:
                self.on_tls_failure()
                await trio.aclose_forcefully(stream)
                return
            http_stream = encrypted
        try:
            upgrade = await self.handle_http(http_stream, peer)
        except Exception:  # a bug: it ends this connection only, never the server
            log.exception("%s: unexpected error in the web door; closing", peer)
            await trio.aclose_forcefully(stream)
            return
        if upgrade is not None:
            transport = WebSocketTransport(
                http_stream, upgrade.connection, self.config, local=local, peer=peer
            )
            await self.serve_transport(transport)

    async def handle_http(self, stream: trio.abc.Stream, peer: str) -> Upgrade | None:
        """Answer requests on `stream` until it closes or asks for a WebSocket.

        Returns the accepted WebSocket (its handshake already sent, the stream now the
        WebSocket's), or None once the connection is done and closed.
        """
        http = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.config.web_max_request_head
        )
        upgrade: Upgrade | None = None
        try:
            try:
                upgrade = await self._answer_requests(http, stream, peer)
            except _BadRequest as exc:
                await stream.send_all(exc.data)
            if upgrade is None:
                await self._close(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if upgrade is None:  # also when cancelled (shutdown)
                await trio.aclose_forcefully(stream)
        return upgrade

    async def _answer_requests(
        self, http: h11.Connection, stream: trio.abc.Stream, peer: str
    ) -> Upgrade | None:
        """Answer requests until the connection should close (None) or becomes a WebSocket."""
        while True:
            request = await self._next_request(http, stream)
            if request is None:
                return None
            decision = route(request, self.config)
            if isinstance(decision, Upgrade):
                await stream.send_all(decision.handshake)
                leftover, _ = http.trailing_data
                if leftover:
                    decision.connection.receive_data(leftover)
                return decision
            if decision.status >= 400:
                target = request.target.decode("ascii", "replace")
                log.info("%s %s %.80s: %d", peer, request.method.decode(), target, decision.status)
            for event in decision.events(head_only=request.method == b"HEAD"):
                data = http.send(event)
                if data:
                    await stream.send_all(data)
            if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return None  # a closing response, or a request with a body: not worth reading
            http.start_next_cycle()

    async def _next_request(
        self, http: h11.Connection, stream: trio.abc.Stream
    ) -> h11.Request | None:
        """The next complete request head and its end (GET has no body), or None at EOF."""
        request: h11.Request | None = None
        with trio.move_on_after(self.config.web_request_timeout) as timer:
            while True:
                try:
                    event = http.next_event()
                except h11.RemoteProtocolError as exc:
                    raise _BadRequest(http, exc.error_status_hint, str(exc)) from None
                if event is h11.NEED_DATA:
                    if request is not None and http.their_state is h11.SEND_BODY:
                        return request  # a body follows: answered, then the connection ends
                    http.receive_data(bytes(await stream.receive_some(self.config.receive_size)))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                    return request
                elif isinstance(event, h11.ConnectionClosed):
                    return None
                else:  # body data
                    return request
        assert timer.cancelled_caught
        if http.their_state is h11.IDLE and not http.trailing_data[0]:
            return None  # an idle keep-alive connection: close it quietly
        raise _BadRequest(http, 408, "the request took too long to arrive")

    async def _close(self, stream: trio.abc.Stream) -> None:
        """Half-close, read what the client still sends for a short grace, then close: a
        close with unread input would reset the connection and lose the last response.
        (TLS cannot half-close: there, a graceful TLS close.)"""
        try:
            if not isinstance(stream, trio.abc.HalfCloseableStream):
                with trio.move_on_after(self.config.disconnect_grace):
                    await stream.aclose()
                return
            await stream.send_eof()
            with trio.move_on_after(self.config.disconnect_grace):
                while await stream.receive_some(self.config.receive_size):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


class _BadRequest(Exception):
    """A request h11 could not parse, or one too slow: `data` is the error response."""

    def __init__(self, http: h11.Connection, status: int, text: str) -> None:
        super().__init__(text)
        response = error_response(status, text)
        data = b""
        if http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            data = b"".join(http.send(event) or b"" for event in response.events(head_only=False))
        self.data = data
