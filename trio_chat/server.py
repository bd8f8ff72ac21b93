"""The trio server: the only place that touches sockets.

`serve` listens and runs one `Connection` per client inside the root nursery; KILL_SERVICE
cancels the root nursery's scope and everything shuts down. A `Connection` is two tasks: the
reader, which parses requests and dispatches them to the room core synchronously, and the
writer (`Outbox.run_writer`), which owns the sending side of the socket.

`ChatServer.handle_stream` serves an already-open stream, so tests drive the whole server over
in-memory streams with no sockets at all.
"""

from __future__ import annotations

import errno
import functools
import logging
import math
import socket
from collections.abc import Callable
from typing import Literal

import attrs
import trio

from trio_chat import protocol
from trio_chat.broker import Broker, LocalBroker
from trio_chat.config import Config
from trio_chat.outbox import Outbox
from trio_chat.protocol import (
    Chat,
    Disconnect,
    Event,
    Helo,
    Join,
    KillService,
    Leave,
    LineBuffer,
    ProtocolError,
    RequestParser,
    Unknown,
)
from trio_chat.rooms import Session

log = logging.getLogger("trio_chat")

# accept() fails with these when the process or the system is out of a resource; the right
# response is to wait for connections to end rather than to crash (as trio.serve_listeners).
_ACCEPT_CAPACITY_ERRNOS = frozenset(
    code
    for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS")
    if (code := getattr(errno, name, None)) is not None
)

# Unknown lines logged at INFO per connection; the rest go to DEBUG, so a client sending
# garbage cannot flood the log.
UNKNOWN_LINES_LOGGED = 10

# Why a connection ended.
Ending = Literal["eof", "idle", "disconnect", "too_large", "broken", "too slow"]


def _display_ip(ip: str) -> str:
    return ip.removeprefix("::ffff:") if "." in ip else ip


@attrs.define(eq=False)
class ChatServer:
    """One server process: its settings, its broker, and the scope that KILL_SERVICE cancels."""

    config: Config
    broker: Broker = attrs.field(factory=LocalBroker)
    shutdown_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    connections: set[Connection] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        self.broker.registry.max_rooms_per_session = self.config.max_rooms_per_connection
        self.broker.registry.max_rooms = self.config.max_rooms
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
        # What is queued now gets one last write as each connection closes; what the
        # teardown itself would queue (leave announcements) is not sent.
        for connection in self.connections:
            connection.outbox.seal()
        self.shutdown_scope.cancel()

    async def handle_stream(
        self, stream: trio.abc.HalfCloseableStream, *, local: tuple[str, int], peer: str
    ) -> None:
        """Serve one client on `stream` until it leaves; `local` is the (ip, port) it reached."""
        ip = self.config.advertise_ip or _display_ip(local[0])
        connection = Connection(self, stream, ip=ip, port=local[1], peer=peer)
        self.connections.add(connection)
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen as the config says and serve until `shutdown`; see the function `serve`."""
        listeners = await open_listeners(self.config)
        for listener in listeners:
            address = listener.socket.getsockname()
            log.info("listening on %s port %d", address[0], address[1])
        await self.serve_listeners(listeners, task_status=task_status)

    async def serve_listeners(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every listener until `shutdown`; at most `max_connections` at once."""
        slots = trio.Semaphore(self.config.max_connections)
        with self.shutdown_scope:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, slots, nursery)
                task_status.started(listeners)

    async def _accept_loop(
        self, listener: trio.SocketListener, slots: trio.Semaphore, nursery: trio.Nursery
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
                nursery.start_soon(self._serve_socket, stream, slots.release)

    async def _serve_socket(self, stream: trio.SocketStream, release: Callable[[], None]) -> None:
        try:
            try:
                local = stream.socket.getsockname()
                peer_address = stream.socket.getpeername()
            except OSError:  # the client is already gone
                await trio.aclose_forcefully(stream)
                return
            peer = f"{_display_ip(peer_address[0])}:{peer_address[1]}"
            await self.handle_stream(stream, local=(local[0], local[1]), peer=peer)
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
    server = ChatServer(config, broker if broker is not None else LocalBroker())
    await server.serve(task_status=task_status)


async def open_listeners(config: Config) -> list[trio.SocketListener]:
    """Bound, listening sockets for `config`; with `reuse_port`, one shareable IPv4 socket."""
    if not config.reuse_port:
        return await trio.open_tcp_listeners(config.port, host=config.host)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        await sock.bind((config.host or "0.0.0.0", config.port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


class Connection:
    """One client: a reader that dispatches requests and a writer that sends replies."""

    def __init__(
        self,
        server: ChatServer,
        stream: trio.abc.HalfCloseableStream,
        *,
        ip: str,
        port: int,
        peer: str,
    ) -> None:
        self.server = server
        self.config = server.config
        self.stream = stream
        self.ip = ip
        self.port = port
        self.peer = peer
        self.outbox = Outbox(self.config.max_outbound, self._overflowed)
        self.session = Session(self.outbox)
        self.broker = server.broker
        self._cancel_scope = trio.CancelScope()
        self._read_scope = trio.CancelScope()  # given a deadline when closing begins
        self._write_done = trio.Event()
        self.ending: Ending | None = None
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._unknown_lines = 0

    async def run(self) -> None:
        """Serve the client until it leaves, breaks, or is cut off; then close the stream."""
        log.info("%s connected", self.peer)
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write)
                    with self._read_scope:
                        self.ending = await self._read()
                    self._close_gracefully()
                    # Let the writer flush what is queued, within the same grace deadline.
                    with trio.CancelScope(deadline=self._read_scope.deadline):
                        await self._write_done.wait()
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ending = "broken"
        finally:
            if self.server.shutdown_scope.cancel_called:  # no time to flush: one last try
                self.outbox.write_nowait(self.stream)
            self.outbox.abandon()
            self._leave_all()
            self.broker.release(self.session)
            if self.outbox.overflowed:
                self.ending = "too slow"
            log.info("%s disconnected (%s)", self.peer, self.ending or "shutdown")
            # Last: inside a cancelled scope (shutdown) this raises Cancelled once closed.
            await trio.aclose_forcefully(self.stream)

    def _close_gracefully(self) -> None:
        """Stop taking requests: leave every room, flush, send EOF, drain within the grace."""
        # Closed once this connection's earlier events are applied: with a shared bus, its
        # own leave announcements after DISCONNECT are still on their way back.
        self.broker.then(self.session, self.outbox.close)
        self._leave_all()
        if self._read_scope.deadline == math.inf:
            self._read_scope.deadline = trio.current_time() + self.config.disconnect_grace

    async def _write(self) -> None:
        try:
            await self.outbox.run_writer(self.stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client is gone; the reader learns it from the cancellation.
            self._cancel_scope.cancel()
        finally:
            self._write_done.set()

    def _reply(self, data: bytes) -> None:
        # Through the broker: with a shared bus, a reply waits for the broadcasts of this
        # connection's earlier requests, so the client sees everything in request order.
        self.broker.reply(self.session, data)

    def _overflowed(self, outbox: Outbox, rejected: int) -> None:
        log.warning(
            "%s is too slow: %d bytes unsent and %d more would pass the limit of %d; "
            "disconnecting it",
            self.peer,
            outbox.unsent,
            rejected,
            outbox.limit,
        )
        self._cancel_scope.cancel()

    def _leave_all(self) -> None:
        outcome = self.broker.registry.disconnect(self.session)
        if outcome.events:
            self.broker.publish(outcome.events)

    async def _read(self) -> Ending:
        """Read and dispatch requests until the client ends, disconnects or oversteps a limit.

        After DISCONNECT or error 4 the connection is closing: input is read and discarded
        (until EOF or the grace deadline) and only KILL_SERVICE is still honoured.
        """
        config = self.config
        buffer = LineBuffer(config.max_line)
        parser = RequestParser(config.max_message, config.max_name)
        receive = self.stream.receive_some
        feed_line = parser.feed_line
        plain_chat = parser.plain_chat
        max_line = config.max_line
        # Lines handled before other connections get a turn: one receive can hold tens of
        # thousands of tiny requests, and handling them all at once would hold every other
        # client up for as long. A plain CHAT counts as its four lines.
        lines_per_turn = 512
        while True:
            if config.idle_timeout is None or self.ending is not None:
                data = await receive(config.receive_size)
            else:
                with trio.move_on_after(config.idle_timeout) as idle:
                    data = await receive(config.receive_size)
                if idle.cancelled_caught:
                    log.info("%s idle for %g s", self.peer, config.idle_timeout)
                    return "idle"
            if not data:
                return self.ending or "eof"
            try:
                # Plain CHAT requests whole in `data` take the parser's shortcut; everything
                # else goes through the line buffer one line at a time, so that the shortcut
                # can be taken again as soon as the parser is between requests.
                start = 0
                end = len(data)
                turn = 0
                while start < end:
                    if turn >= lines_per_turn:
                        turn = 0
                        await trio.lowlevel.checkpoint()
                    if self.ending is None and not len(buffer):
                        while turn < lines_per_turn and (
                            found := plain_chat(data, start, max_line)
                        ):
                            chat, start = found
                            self._handle(chat)
                            turn += 4
                        if start == end:
                            break
                        if turn >= lines_per_turn:
                            continue
                    newline = data.find(b"\n", start)
                    stop = end if newline < 0 else newline + 1
                    piece = data[start:stop] if start or stop < end else data
                    start = stop
                    turn += 1
                    for line in buffer.feed(piece):
                        if self.ending is not None:
                            if line.strip() == b"KILL_SERVICE":
                                self.server.shutdown(f"KILL_SERVICE from {self.peer}")
                            continue
                        for event in feed_line(line):
                            if type(event) is Join:
                                await self._join(event)
                            elif self._handle(event):
                                self.ending = "disconnect"
                                self._close_gracefully()
                                break
            except ProtocolError as error:  # only "too large" is raised; the rest are events
                buffer = LineBuffer(config.max_line)  # what it held is discarded
                if self.ending is None:
                    log.info("%s: %s; closing", self.peer, error.description)
                    self._reply(protocol.encode_error(error))
                    self.ending = "too_large"
                    self._close_gracefully()

    def _handle(self, event: Event) -> bool:
        """Carry out one request other than JOIN; True when the connection is to close."""
        if self._debug:
            log.debug("%s: %r", self.peer, event)
        registry = self.broker.registry
        try:
            if type(event) is Chat:
                self.broker.check_available()
                outcome = registry.chat(
                    self.session, event.room_ref, event.client_name, event.message
                )
            elif type(event) is Leave:
                self.broker.check_available()
                outcome = registry.leave(self.session, event.room_ref, event.join_id)
                if outcome.events:
                    log.info("%s left room %d", self.peer, event.room_ref)
            elif type(event) is Helo:
                config = self.config
                self._reply(protocol.encode_helo(event.text, self.ip, self.port, config.student_id))
                return False
            elif type(event) is Unknown:
                self._unknown_lines += 1
                level = (
                    logging.INFO if self._unknown_lines <= UNKNOWN_LINES_LOGGED else logging.DEBUG
                )
                log.log(level, "%s: ignoring unknown line %.80r", self.peer, event.line)
                return False
            elif type(event) is Disconnect:
                log.info("%s disconnecting as %s", self.peer, event.client_name)
                self._leave_all()  # before the outbox closes: the client hears its own leaves
                return True
            elif type(event) is KillService:
                self.server.shutdown(f"KILL_SERVICE from {self.peer}")
                return False
            else:
                assert isinstance(event, ProtocolError)
                raise event
        except ProtocolError as error:
            self._reply(protocol.encode_error(error))
            return False
        if outcome.reply is not None:
            self._reply(outcome.reply)
        if outcome.events:
            self.broker.publish(outcome.events)
        return False

    async def _join(self, request: Join) -> None:
        if self._debug:
            log.debug("%s: %r", self.peer, request)
        try:
            outcome = await self.broker.join(
                self.session,
                request.room_name,
                request.client_name,
                server_ip=self.ip,
                server_port=self.port,
            )
        except ProtocolError as error:
            self._reply(protocol.encode_error(error))
            return
        log.info("%s joined %r as %r", self.peer, request.room_name, request.client_name)
        if outcome.reply is not None:
            self._reply(outcome.reply)
        self.broker.publish(outcome.events)
