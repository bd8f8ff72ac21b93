"""The trio server: listening, accepting, and the life of the service.

`serve` listens and runs one `Connection` (connection.py) per client inside the root
nursery; KILL_SERVICE or a signal calls `ChatServer.shutdown`, which gives every connection's
queued output one last write and cancels the root scope. A connection is served over a
`Transport` (transport.py); `ChatServer.serve_transport` serves one that is already open
(the plain and TLS listeners here, the web door's WebSockets, in-memory streams in tests)
and applies the per-address connection limit to every door alike. Beside the listeners runs
the metrics endpoint (metrics.py), if configured.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs
import trio

from trio_chat import protocol, tls
from trio_chat.broker import Broker, LocalBroker, registry_for
from trio_chat.config import Config
from trio_chat.connection import Connection
from trio_chat.limits import AddressCounter, address_key, parse_address
from trio_chat.metrics import Counters, open_metrics_listener, serve_metrics
from trio_chat.protocol import MESSAGE_PREFIX, ErrorCode, ProtocolError
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


class ListenError(OSError):
    """The TLS or metrics listener could not be opened; names the options that set it."""

    def __init__(
        self, error: OSError, *, host: str | None, port: int, host_option: str, port_option: str
    ) -> None:
        super().__init__(error.errno, error.strerror)
        self.error = error
        self.host = host
        self.port = port
        self.host_option = host_option
        self.port_option = port_option


@attrs.define(eq=False)
class ChatServer:
    """One server process: its settings, its broker, and the scope that KILL_SERVICE cancels."""

    config: Config
    broker: Broker = attrs.field(
        default=attrs.Factory(lambda self: LocalBroker(registry_for(self.config)), takes_self=True)
    )
    shutdown_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    connections: set[Connection] = attrs.field(factory=set, init=False)
    counters: Counters = attrs.field(factory=Counters, init=False)
    tls_context: ssl.SSLContext | None = attrs.field(default=None, init=False)
    """Built from the certificate files when the server is made: a bad file is a start-up
    error (`tls.TLSSetupError`), never a surprise at the first client."""
    ports: dict[str, int] = attrs.field(factory=dict, init=False)
    """The bound port of each listener (plain, tls, metrics) once serving."""
    _per_address: AddressCounter = attrs.field(init=False)
    _refusing: set[str] = attrs.field(factory=set, init=False)
    """Addresses refused since their last connection ended: logged once per episode."""
    _retired_bytes: int = attrs.field(default=0, init=False)
    """Bytes sent to connections that have ended (live ones are read from their outbox)."""
    nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    """The root nursery while `serve_listeners` runs: connections and their writers."""

    def __attrs_post_init__(self) -> None:
        self.broker.on_kill = functools.partial(self.shutdown, everywhere=False)
        self.broker.on_round_trip = self.counters.bus_round_trip.observe
        self._per_address = AddressCounter(self.config.max_connections_per_ip)
        if self.config.tls_cert is not None:
            self.tls_context = tls.server_context(self.config.tls_cert, self.config.tls_key)

    # -- policies ----------------------------------------------------------------------------

    def exempt(self, ip: str) -> bool:
        """Whether a client at `ip` is exempt from the per-address limit and flood control.

        A client that is not on an IP network (an in-process stream) is."""
        return parse_address(ip) is None or ip in self.config.limit_exempt

    def may_stop(self, ip: str) -> bool:
        """Whether KILL_SERVICE from a client at `ip` stops the service."""
        return parse_address(ip) is None or ip in self.config.kill_allow

    def shutdown(self, reason: str, *, everywhere: bool = True) -> None:
        """Stop the service: stop accepting, close every connection, return from `serve`.

        With `everywhere`, every other process of a multi-process service stops too.
        """
        if self.shutdown_scope.cancel_called:
            return
        log.info("shutting down: %s; closing %d connections", reason, len(self.connections))
        if everywhere:
            self.broker.kill_service(reason)
        # What is queued now gets one last write; what the teardown itself would queue
        # (leave announcements) is not sent.
        for connection in self.connections:
            connection.outbox.finish()
        self.shutdown_scope.cancel()

    async def serve_transport(self, transport: Transport, *, listener: str = "plain") -> None:
        """Serve one client on an open `transport` until it leaves; then close it.

        The entry point of every door; `listener` names the door for metrics (plain, tls,
        web). A client past the per-address limit gets error 5 and is closed. An unexpected
        error is logged and ends this client's connection only.
        """
        ip = transport.peer.rpartition(":")[0] or transport.peer
        exempt = self.exempt(ip)
        key = None
        if not exempt:
            key = address_key(ip)
            if not self._per_address.try_add(key):
                await self._refuse(transport, key)
                return
        self.counters.connections[listener] = self.counters.connections.get(listener, 0) + 1
        connection = Connection(self, transport, listener=listener, peer_ip=ip, paced=not exempt)
        self.connections.add(connection)
        try:
            await connection.run()
        except Exception:  # a bug in the teardown itself: still this connection's alone
            log.exception("%s: unexpected error while closing", connection.peer)
        finally:
            self.connections.discard(connection)
            self._retired_bytes += connection.outbox.sent
            if key is not None:
                self._per_address.remove(key)
                self._refusing.discard(key)

    async def _refuse(self, transport: Transport, key: str) -> None:
        """Tell a client past the per-address limit so (error 5), then close gracefully."""
        self.counters.refuse("per_address")
        limit = self.config.max_connections_per_ip
        error = ProtocolError(
            ErrorCode.LIMIT_REACHED,
            f"too many connections from {key}: at most {limit} per address "
            "(max-connections-per-ip)",
        )
        self.counters.error(error.code)
        # Logged once until one of the address's connections ends: a client hammering the
        # limit must not flood the log.
        level = logging.DEBUG if key in self._refusing else logging.WARNING
        self._refusing.add(key)
        log.log(level, "%s refused: %s", transport.peer, error.description)
        # As a graceful close elsewhere: end the output and read what the client sent, so
        # that it is not reset before it reads the error.
        with trio.move_on_after(self.config.disconnect_grace):
            try:
                await transport.send([protocol.encode_error(error)])
                await transport.send_eof()
                while await transport.receive(self.config.receive_size):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await transport.aclose()

    def _count_tls_failure(self) -> None:
        self.counters.tls_failures += 1

    # -- what metrics read at scrape time ----------------------------------------------------

    def open_connections(self) -> Mapping[str, int]:
        """Connections open now, by listener (every listener served, even with none)."""
        counts = dict.fromkeys(self.counters.connections, 0)
        for door in ("plain", "tls", "web"):
            if door in self.ports:
                counts.setdefault(door, 0)
        for connection in self.connections:
            counts[connection.listener] = counts.get(connection.listener, 0) + 1
        return counts

    def room_count(self) -> int:
        """Rooms in the service, as this process knows them."""
        return self.broker.registry.room_count()

    def membership_count(self) -> int:
        """Room memberships of this process's connections."""
        return sum(len(connection.session.rooms) for connection in self.connections)

    def queued_bytes(self) -> int:
        """Bytes queued for this process's clients and not yet sent."""
        return sum(connection.outbox.unsent for connection in self.connections)

    def sent_bytes(self) -> int:
        """Bytes written to clients so far, by every connection, open or ended."""
        return self._retired_bytes + sum(c.outbox.sent for c in self.connections)

    def deliveries(self) -> int:
        """Messages handed to room members so far."""
        return self.broker.registry.deliveries

    def bus_available(self) -> bool | None:
        """Whether the shared bus is reachable; None with none."""
        available = getattr(self.broker, "available", None)
        return available if isinstance(available, bool) else None

    def health(self) -> str | None:
        """Why requests cannot be served now, or None when they can."""
        if self.shutdown_scope.cancel_called:
            return "shutting down"
        if self.bus_available() is False:
            return "Redis unavailable: requests get error 6"
        return None

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

        Every listener (plain, TLS, web door, metrics) is open before any is served, so a
        port in use fails the start-up as a whole. Reports the plain listeners; `ports` has
        every listener's port once started.
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
        opened = list(listeners)
        tls_listeners: list[trio.SocketListener] = []
        web_listeners: list[trio.SocketListener] = []
        metrics_listener = None
        try:
            if config.tls_port is not None:
                try:
                    tls_listeners = await open_listeners(config, port=config.tls_port)
                except OSError as exc:
                    raise ListenError(
                        exc,
                        host=config.host,
                        port=config.tls_port,
                        host_option="--host",
                        port_option="--tls-port",
                    ) from exc
                opened += tls_listeners
            if config.web_port is not None:
                try:
                    web_listeners = await open_listeners(
                        config, host=config.web_host, port=config.web_port
                    )
                except OSError as error:
                    raise WebListenError(error) from error
                opened += web_listeners
            if config.metrics_port is not None:
                try:
                    metrics_listener = await open_metrics_listener(
                        config.metrics_host, config.metrics_port
                    )
                except OSError as exc:
                    raise ListenError(
                        exc,
                        host=config.metrics_host,
                        port=config.metrics_port,
                        host_option="--metrics-host",
                        port_option="--metrics-port",
                    ) from exc
        except BaseException:
            for listener in opened:
                listener.socket.close()
            raise
        for what, bound in (
            ("listening", listeners),
            ("listening for TLS", tls_listeners),
            ("chat page and WebSocket", web_listeners),
        ):
            for listener in bound:
                address = listener.socket.getsockname()
                log.info("%s on %s port %d", what, address[0], address[1])
        if metrics_listener is not None:
            address = metrics_listener.socket.getsockname()
            log.info("metrics on http://%s:%d/metrics", address[0], address[1])
        await self.serve_listeners(
            listeners,
            tls_listeners=tls_listeners,
            web_listeners=web_listeners,
            metrics_listener=metrics_listener,
            task_status=task_status,
        )

    async def serve_listeners(
        self,
        listeners: list[trio.SocketListener],
        *,
        tls_listeners: Sequence[trio.SocketListener] = (),
        web_listeners: Sequence[trio.SocketListener] = (),
        metrics_listener: trio.SocketListener | None = None,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every listener until `shutdown`; at most `max_connections` at once,
        whichever door they came through. Clients of `tls_listeners` are served over TLS.
        The metrics endpoint, given its listener, runs beside them and stops with them.
        Reports the plain `listeners` through `task_status`; every port is in `ports` by
        then."""
        config = self.config
        if tls_listeners and self.tls_context is None:
            raise ValueError("TLS listeners need a certificate (tls_cert)")
        slots = trio.Semaphore(config.max_connections)
        serve_web = functools.partial(self.serve_transport, listener="web")
        door = WebDoor(config, serve_web, self.tls_context, self._count_tls_failure)
        doors: list[tuple[str, Sequence[trio.SocketListener], SocketHandler]] = [
            ("plain", listeners, self._serve_socket),
            ("tls", tls_listeners, functools.partial(self._serve_socket, listener="tls")),
            ("web", web_listeners, door.serve_socket),
        ]
        with self.shutdown_scope:
            try:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    for name, bound, serve in doors:
                        for listener in bound:
                            self.ports.setdefault(name, listener.socket.getsockname()[1])
                            nursery.start_soon(self._accept_loop, listener, slots, nursery, serve)
                    if metrics_listener is not None:
                        self.ports["metrics"] = metrics_listener.socket.getsockname()[1]
                        nursery.start_soon(
                            functools.partial(
                                serve_metrics,
                                self,
                                metrics_listener,
                                request_timeout=config.metrics_request_timeout,
                                max_clients=config.metrics_max_clients,
                            )
                        )
                    task_status.started(listeners)
            finally:
                self.nursery = None

    async def _accept_loop(
        self,
        listener: trio.SocketListener,
        slots: trio.Semaphore,
        nursery: trio.Nursery,
        serve_socket: SocketHandler,
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

    async def _serve_socket(self, stream: trio.SocketStream, *, listener: str = "plain") -> None:
        try:
            transport = StreamTransport.from_socket(stream)
        except OSError:  # the client is already gone
            await trio.aclose_forcefully(stream)
            return
        if listener == "tls":
            # Here, in the client's own task: a slow handshake holds up no one else.
            assert self.tls_context is not None
            encrypted = await tls.accept_tls(
                stream,
                self.tls_context,
                handshake_timeout=self.config.tls_handshake_timeout,
                peer=transport.peer,
            )
            if encrypted is None:
                self._count_tls_failure()
                await trio.aclose_forcefully(stream)
                return
            transport = StreamTransport(encrypted, local=transport.local, peer=transport.peer)
        await self.serve_transport(transport, listener=listener)


# What serves one accepted socket of a door.
SocketHandler = Callable[[trio.SocketStream], Awaitable[None]]


async def _holding_slot(
    serve_socket: SocketHandler,
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
