"""The trio server: listening, accepting, and the life of the service.

`serve` listens and runs one `Connection` (connection.py) per client inside the root
nursery; KILL_SERVICE or a signal calls `ChatServer.shutdown`, which gives every connection's
queued output one last write and cancels the root scope. A connection is served over a
`Transport` (transport.py); `ChatServer.serve_transport` serves one that is already open
(the plain listener here, a TLS or WebSocket door elsewhere, in-memory streams in tests).
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from trio_chat.broker import Broker, LocalBroker, registry_for
from trio_chat.config import Config
from trio_chat.connection import Connection
from trio_chat.protocol import MESSAGE_PREFIX
from trio_chat.transport import StreamTransport, Transport
from trio_chat.web import WebDoor, WebListenError

log = logging.getLogger("trio_chat")

# accept() fails with these when the process or the system is out of a resource; the right
# response is to wait for connections to end rather than to crash (as trio.serve_listeners).
_ACCEPT_CAPACITY_ERRNOS = frozenset(
    code
    for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS")
    if (code := getattr(errno, name, None)) is not None
)


@attrs.define(eq=False)
class ChatServer:
    """One server process: its settings, its broker, and the scope that KILL_SERVICE cancels."""

    config: Config
    broker: Broker = attrs.field(
        default=attrs.Factory(lambda self: LocalBroker(registry_for(self.config)), takes_self=True)
    )
    shutdown_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    connections: set[Connection] = attrs.field(factory=set, init=False)
    web_listeners: list[trio.SocketListener] = attrs.field(factory=list, init=False)
    """The web door's listeners while it serves (none without `Config.web_port`)."""

    def __attrs_post_init__(self) -> None:
        self.broker.on_kill = functools.partial(self.shutdown, everywhere=False)

    def shutdown(self, reason: str, *, everywhere: bool = True) -> None:
        """Stop the service: stop accepting, close every connection, return from `serve`.

        With `everywhere`, every other process of a multi-process service stops too.
        """
        if self.shutdown_scope.cancel_called:
            return
        log.info("shutting down: %s", reason)
        if everywhere:
            self.broker.kill_service(reason)
        # What is queued now gets one last write; what the teardown itself would queue
        # (leave announcements) is not sent.
        for connection in self.connections:
            connection.outbox.finish()
        self.shutdown_scope.cancel()

    async def serve_transport(self, transport: Transport) -> None:
        """Serve one client on an open `transport` until it leaves; then close it.

        The entry point of every door. An unexpected error is logged and ends this client's
        connection only.
        """
        connection = Connection(self, transport)
        self.connections.add(connection)
        try:
            await connection.run()
        except Exception:  # a bug in the teardown itself: still this connection's alone
            log.exception("%s: unexpected error while closing", connection.peer)
        finally:
            self.connections.discard(connection)

    async def handle_stream(
        self, stream: trio.abc.Stream, *, local: tuple[str, int], peer: str
    ) -> None:
        """Serve one client on `stream`; `local` is the (ip, port) it reached."""
        await self.serve_transport(StreamTransport(stream, local=local, peer=peer))

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen as the config says and serve until `shutdown`; see the function `serve`.

        With `Config.web_port`, the web door listens too (see `web_listeners`).
        """
        config = self.config
        if config.max_line < config.max_message + MESSAGE_PREFIX:
            log.warning(
                "max_line %d leaves room for one-line messages of %d bytes only (max_message %d)",
                config.max_line,
                config.max_line - MESSAGE_PREFIX,
                config.max_message,
            )
        listeners = await open_listeners(config)
        web_listeners: list[trio.SocketListener] = []
        try:
            if config.web_port is not None:
                web_listeners = await open_listeners(
                    config, host=config.web_host, port=config.web_port
                )
        except OSError as error:
            for listener in listeners:
                listener.socket.close()
            raise WebListenError(error) from error
        except BaseException:
            for listener in listeners:
                listener.socket.close()
            raise
        for listener in listeners:
            address = listener.socket.getsockname()
            log.info("listening on %s port %d", address[0], address[1])
        for listener in web_listeners:
            address = listener.socket.getsockname()
            log.info("chat page and WebSocket on %s port %d", address[0], address[1])
        await self.serve_listeners(listeners, web_listeners, task_status=task_status)

    async def serve_listeners(
        self,
        listeners: list[trio.SocketListener],
        web_listeners: Sequence[trio.SocketListener] = (),
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every listener until `shutdown`; at most `max_connections` at once,
        whichever door they came through. Reports the plain `listeners` through
        `task_status`; the web door's are in `web_listeners` by then."""
        slots = trio.Semaphore(self.config.max_connections)
        self.web_listeners = list(web_listeners)
        door = WebDoor(self.config, self.serve_transport)
        with self.shutdown_scope:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    serve = self._serve_socket
                    nursery.start_soon(self._accept_loop, listener, slots, nursery, serve)
                for listener in web_listeners:
                    serve = door.serve_socket
                    nursery.start_soon(self._accept_loop, listener, slots, nursery, serve)
                task_status.started(listeners)

    async def _accept_loop(
        self,
        listener: trio.SocketListener,
        slots: trio.Semaphore,
        nursery: trio.Nursery,
        serve_socket: Callable[[trio.SocketStream], Awaitable[None]],
    ) -> None:
        failures = 0  # accepts failed in a row for want of descriptors or memory
        async with listener:
            while True:
                # Taking a slot before accepting leaves clients beyond the limit waiting in
                # the listen backlog: none is refused or dropped.
                await slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    slots.release()
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    if not failures:  # once per episode, not every retry
                        log.error("accept failed (%s); new clients wait", exc.strerror)
                    failures += 1
                    await trio.sleep(self.config.accept_retry_delay)
                    continue
                except BaseException:
                    slots.release()
                    raise
                if failures:
                    log.info("accepting again after %d failed attempts", failures)
                    failures = 0
                nursery.start_soon(_holding_slot, serve_socket, stream, slots.release)

    async def _serve_socket(self, stream: trio.SocketStream) -> None:
        try:
            transport = StreamTransport.from_socket(stream, stream)
        except OSError:  # the client is already gone
            await trio.aclose_forcefully(stream)
            return
        await self.serve_transport(transport)


async def _holding_slot(
    serve_socket: Callable[[trio.SocketStream], Awaitable[None]],
    stream: trio.SocketStream,
    release: Callable[[], None],
) -> None:
    try:
        await serve_socket(stream)
    finally:
        release()


async def serve(
    config: Config,
    *,
    broker: Broker | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `config.host`:`config.port` and serve until KILL_SERVICE.

    Reports the bound listeners through `task_status`, so callers can use port 0 and learn
    the port with ``listeners[0].socket.getsockname()``.
    """
    server = ChatServer(config) if broker is None else ChatServer(config, broker)
    await server.serve(task_status=task_status)


async def open_listeners(
    config: Config, *, host: str | None = None, port: int | None = None
) -> list[trio.SocketListener]:
    """Bound, listening sockets on `host` and `port` (by default the config's `host` and
    `port`); with `reuse_port`, one shareable IPv4 socket."""
    host = config.host if host is None else host
    port = config.port if port is None else port
    if not config.reuse_port:
        return await trio.open_tcp_listeners(port, host=host)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        await sock.bind((host or "0.0.0.0", port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]
