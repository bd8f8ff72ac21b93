"""One client, whatever door it came through: requests in, replies and broadcasts out.

A `Connection` serves one `Transport` with a task of its own, the reader (`_read`): a short
loop that feeds received bytes to the I/O-free `RequestReader` and carries out each request
it gives. What the room core queues for the client goes out through its `Outbox`: written
directly by the flusher on a plain socket, otherwise (and for a client slow to read) by a
writer task (`Outbox.run_writer`) started beside the reader when first needed.
Everything it does to rooms goes through the broker; everything it sends goes through its
outbox, so replies and broadcasts reach the client in one order.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Literal, Protocol

import trio

from trio_chat import protocol
from trio_chat.limits import TokenBucket
from trio_chat.outbox import Outbox
from trio_chat.protocol import (
    Chat,
    Disconnect,
    Event,
    Helo,
    Join,
    KillService,
    Leave,
    ProtocolError,
    Unknown,
)
from trio_chat.reader import NEED_DATA, TURN_OVER, RequestReader
from trio_chat.rooms import Session
from trio_chat.transport import Transport, display_ip

if TYPE_CHECKING:
    from trio_chat.broker import Broker
    from trio_chat.config import Config
    from trio_chat.metrics import Counters

log = logging.getLogger("trio_chat")

# Unknown lines logged at INFO per connection; the rest go to DEBUG, so a client sending
# garbage cannot flood the log.
UNKNOWN_LINES_LOGGED = 10

# Why a connection ended.
Ending = Literal["eof", "idle", "disconnect", "too_large", "broken", "too slow", "error"]


class Service(Protocol):
    """What a connection needs of the server that accepted it (a `ChatServer`)."""

    @property
    def config(self) -> Config: ...

    @property
    def broker(self) -> Broker: ...

    @property
    def counters(self) -> Counters: ...

    def shutdown(self, reason: str, *, everywhere: bool = True) -> None: ...

    def may_stop(self, ip: str) -> bool: ...

    @property
    def nursery(self) -> trio.Nursery | None:
        """Where connections start their writer tasks, beside themselves; None: each
        connection runs its writer in a nursery of its own."""
        ...


class Connection:
    """One client: a reader task that carries out its requests, and an outbox that sends
    what they queue for it (directly, or through a writer task when one is needed)."""

    def __init__(
        self,
        server: Service,
        transport: Transport,
        *,
        listener: str = "plain",
        peer_ip: str = "",
        paced: bool = False,
    ) -> None:
        self.server = server
        self.listener = listener
        """The door the client came through (plain, tls, ...), for metrics."""
        self.peer_ip = peer_ip
        self.config = config = server.config
        self.transport = transport
        self.peer = transport.peer
        self.ip = config.advertise_ip or display_ip(transport.local[0])
        self.port = transport.local[1]
        self.reader = RequestReader(
            max_line=config.max_line, max_message=config.max_message, max_name=config.max_name
        )
        self.outbox = Outbox(config.max_outbound, self._cut_off)
        self.session = Session(self.outbox)
        self.broker = server.broker
        self.counters = server.counters
        # Flood control: None when off, or when the client's address is exempt.
        self.bucket = (
            TokenBucket(config.request_rate, config.burst)
            if paced and config.request_rate is not None
            else None
        )
        self.ending: Ending | None = None
        self._cancel_scope = trio.CancelScope()
        self._read_scope = trio.CancelScope()  # given a deadline when closing begins
        self._write_scope = trio.CancelScope()  # the writer's, which may outlive `run`
        self._write_done = trio.Event()
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._unknown_lines = 0

    async def run(self) -> None:
        """Serve the client until it leaves, breaks, or is cut off; then close the transport.

        An unexpected error (a bug) is logged with its traceback and ends this connection
        only.
        """
        log.info("%s connected", self.peer)
        try:
            with self._cancel_scope:
                # The writer runs beside this task rather than under it: at shutdown every
                # task is unwound, and a nursery per connection would double that work.
                nursery = self.server.nursery
                if nursery is None:
                    async with trio.open_nursery() as own:
                        await self._serve(own)
                else:
                    await self._serve(nursery)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ending = "broken"
        except* Exception:
            self.ending = "error"
            log.exception("%s: unexpected error; closing this connection", self.peer)
        finally:
            self._write_scope.cancel()
            self.outbox.abandon()  # before the transport closes (the outbox's rule 2)
            self._leave_all()
            self.broker.release(self.session)
            if self.outbox.overflowed:
                self.ending = "too slow"
            if self.ending is None:  # shutdown: the server logs one line for all
                log.debug("%s disconnected (shutdown)", self.peer)
            else:
                log.info("%s disconnected (%s)", self.peer, self.ending)
            # The outbox calls back into this connection: without this cycle a connection is
            # freed as soon as it ends (at shutdown, thousands would wait for the collector).
            self.outbox.on_cut_off = None
            # Inside a cancelled scope (shutdown) this raises Cancelled once closed.
            await self.transport.aclose()

    async def _serve(self, nursery: trio.Nursery) -> None:
        def start_writer() -> None:
            try:
                nursery.start_soon(self._write)
            except RuntimeError:  # the server has finished: so has this connection
                self._cancel_scope.cancel()

        self.outbox.attach(
            self.transport, direct=self.config.direct_writes, start_writer=start_writer
        )
        with self._read_scope:
            self.ending = await self._read()
        self._close_gracefully()
        # Let the writer flush what is queued, within the same grace deadline.
        with trio.CancelScope(deadline=self._read_scope.deadline):
            await self._write_done.wait()

    async def _read(self) -> Ending:
        """Read and dispatch requests until the client ends, disconnects or oversteps a limit.

        After DISCONNECT or error 4 the connection is closing: the reader drops input until
        EOF or the grace deadline, and gives nothing but KILL_SERVICE.
        """
        reader = self.reader
        bucket = self.bucket
        requests = self.counters.requests
        arrived: float | None = None  # when the bytes being read arrived, for flood control
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                data = await self._receive()
                if not data:
                    return self.ending or ("eof" if data is not None else "idle")
                reader.receive_data(data)
                arrived = None
                continue
            if event is TURN_OVER:
                await trio.lowlevel.checkpoint()
                arrived = None
                continue
            requests[type(event)] += 1
            if bucket is not None:
                # Over its rate, the client waits for its next request (fakelag): it is
                # neither refused nor reordered, and input waits in the socket meanwhile.
                # Requests received together arrived together: one clock reading for them,
                # read again after anything that may take time (a turn, a JOIN, a wait).
                if arrived is None:
                    arrived = trio.current_time()
                delay = bucket.take(arrived)
                if delay:
                    self.counters.throttled_seconds += delay
                    await trio.sleep(delay)
                    arrived = None
            if type(event) is Join:
                await self._join(event)
                arrived = None
            else:
                self._handle(event)

    async def _receive(self) -> bytes | bytearray | None:
        """The next bytes from the client, ``b""`` at its end, None after `idle_timeout`."""
        config = self.config
        if config.idle_timeout is None or self.ending is not None:
            return await self.transport.receive(config.receive_size)
        with trio.move_on_after(config.idle_timeout):
            return await self.transport.receive(config.receive_size)
        log.info("%s idle for %g s", self.peer, config.idle_timeout)
        return None

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
            with self._write_scope:
                await self.outbox.run_writer(self.transport, direct=self.config.direct_writes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client is gone; the reader learns it from the cancellation.
            self._cancel_scope.cancel()
        except Exception:  # a bug: this connection's alone, even outside its own task
            log.exception("%s: unexpected error while sending; closing this connection", self.peer)
            self.ending = "error"
            self._cancel_scope.cancel()
        finally:
            self._write_done.set()

    def _reply_error(self, error: ProtocolError) -> None:
        self.counters.error(error.code)
        self._reply(protocol.encode_error(error))

    def _reply(self, data: bytes) -> None:
        # Through the broker: with a shared bus, a reply waits for the broadcasts of this
        # connection's earlier requests, so the client sees everything in request order.
        self.broker.reply(self.session, data)

    def _cut_off(self, outbox: Outbox, rejected: int) -> None:
        if outbox.failed:
            self.ending = "error"
        else:
            self.counters.slow_consumers += 1
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
        self.broker.disconnect(self.session)

    def _handle(self, event: Event) -> None:
        """Carry out one request other than JOIN."""
        if self._debug:
            log.debug("%s: %r", self.peer, event)
        try:
            if type(event) is Chat:
                self.broker.chat(self.session, event)
            elif type(event) is Leave:
                was_member = event.room_ref in self.session.rooms
                self.broker.leave(self.session, event)
                if was_member:
                    log.info("%s left room %d", self.peer, event.room_ref)
            elif type(event) is Helo:
                config = self.config
                self._reply(protocol.encode_helo(event.text, self.ip, self.port, config.student_id))
                return
            elif type(event) is Unknown:
                self._log_sparingly(logging.INFO, "ignoring unknown line %.80r", event.line)
                return
            elif type(event) is Disconnect:
                log.info("%s disconnecting as %s", self.peer, event.client_name)
                self._leave_all()  # before the outbox closes: the client hears its own leaves
                self.ending = "disconnect"
                self._close_gracefully()
                return
            elif type(event) is KillService:
                if self.server.may_stop(self.peer_ip):
                    self.server.shutdown(f"KILL_SERVICE from {self.peer}")
                else:  # handled as an unknown line: no reply, the connection stays open
                    self.counters.kill_refused += 1
                    self._log_sparingly(
                        logging.WARNING,
                        "KILL_SERVICE from %s, outside --kill-allow; ignored",
                        self.peer_ip,
                    )
                return
            else:
                assert isinstance(event, ProtocolError)
                raise event
        except ProtocolError as error:
            self._reply_error(error)
            if error.closes_connection:
                log.info("%s: %s; closing", self.peer, error.description)
                self.ending = "too_large"
                self._close_gracefully()

    def _log_sparingly(self, level: int, message: str, *args: object) -> None:
        """Log an ignored line at `level` for the first few, then at DEBUG."""
        self._unknown_lines += 1
        if self._unknown_lines > UNKNOWN_LINES_LOGGED:
            level = logging.DEBUG
        log.log(level, "%s: " + message, self.peer, *args)

    async def _join(self, request: Join) -> None:
        if self._debug:
            log.debug("%s: %r", self.peer, request)
        try:
            await self.broker.join(self.session, request, server_ip=self.ip, server_port=self.port)
        except ProtocolError as error:
            self._reply_error(error)
            return
        log.info("%s joined %r as %r", self.peer, request.room_name, request.client_name)
