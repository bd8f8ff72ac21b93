"""A zoo of small chat servers, each with one deliberate fault that real servers have.

`MiniServer` is a compact, separate implementation of the protocol (on the project's pure
protocol and rooms layers) whose `Faults` switch on one mistake at a time; `ZOO` names one
server per fault that the checker's report must name. Each serves on 127.0.0.1, in-process.
"""

from __future__ import annotations

import ast
import contextlib
import math
import sys
from collections.abc import Iterable

import attrs
import trio

from trio_chat import protocol
from trio_chat.protocol import (
    Chat,
    Disconnect,
    ErrorCode,
    Helo,
    Join,
    KillService,
    Leave,
    ProtocolError,
    RequestParser,
    Unknown,
)
from trio_chat.rooms import Registry, RoomEvent, Session


@attrs.frozen(kw_only=True)
class Faults:
    """Deliberate mistakes, each of which some case must catch."""

    greet: bool = False
    """Sends a welcome line to each new connection."""
    answer_unknown: bool = False
    """Replies ERROR_CODE to a line that starts no request."""
    no_self_leave: bool = False
    """Ends the leaver's membership before the leave announcement."""
    recv_holds_whole_requests: bool = False
    """Parses each recv on its own, dropping a request split across two."""
    first_request_per_recv: bool = False
    """Takes one request from each recv and drops the rest of it."""
    joined_after_announcement: bool = False
    """Broadcasts the join announcement before replying JOINED."""
    no_crlf: bool = False
    """Keeps the \\r of CRLF line ends."""
    strict_spacing: bool = False
    """Ignores field lines without ": " (as if split on it)."""
    silent_stray_leave: bool = False
    """Answers nothing to a LEAVE for a room the client is not in."""
    lenient_integers: bool = False
    """Ignores malformed requests instead of answering error 1."""
    error_3_for_unknown_room: bool = False
    """Answers error 3 where error 2 is due."""
    no_membership_check: bool = False
    """Relays a CHAT from a non-member."""
    no_line_limit: bool = False
    """Accepts lines of any length."""
    no_room_limit: bool = False
    """Lets a connection join any number of rooms."""
    disconnect_in_join_order: bool = False
    """Announces a DISCONNECT's leaves in joining order, not ROOM_REF order."""
    serve_after_disconnect: bool = False
    """Keeps answering requests after DISCONNECT."""
    silent_vanish: bool = False
    """Announces nothing when a client closes or resets its connection."""
    blocking_fanout: bool = False
    """Writes each broadcast to every member itself, waiting for slow readers."""
    unbounded_queue: bool = False
    """Queues without limit for a client that does not read."""
    wrong_helo_port: bool = False
    """Reports the listening port plus one in HELO."""
    ignore_kill: bool = False
    """Ignores KILL_SERVICE."""
    wording: str = ""
    """Announces joins and leaves in other words: "chat room" (``has joined the chat
    room.``) or "no period" (``has joined this chatroom``)."""
    single_newline_chat: bool = False
    """Ends each CHAT it sends with one newline instead of a blank line."""
    helo_no_newline: bool = False
    """Leaves the final newline off its HELO reply."""
    state_by_name: bool = False
    """Keys a room's members by client name: a second connection joining under a name takes
    the first one's place."""
    connection_cap: int = 0
    """Serves at most this many connections at once (a pool of worker threads); the others
    wait, unanswered, in the accept backlog."""
    crash_on_error: int = 0
    """Stops altogether (every connection, the listener) where it should reply this error
    code: an unhandled exception that ends the process."""


MAX_LINE = 64 * 1024
MAX_QUEUED = 1024 * 1024  # bytes queued for a client before it is cut off
DRAIN = 2.0  # seconds a closing connection drains input (docs/protocol.md: "a short grace")


class MiniConnection:
    """The sending side of one client: a queue bounded in bytes, or direct sends if fan-out
    blocks."""

    def __init__(
        self,
        stream: trio.SocketStream,
        cut_off: trio.CancelScope,
        *,
        bounded: bool = True,
        faults: Faults = Faults(),
    ) -> None:
        self.faults = faults
        self.stream = stream
        self.cut_off = cut_off
        self.limit = MAX_QUEUED if bounded else math.inf
        self.queued = 0
        self.send_channel, self.receive_channel = trio.open_memory_channel[bytes](math.inf)
        self.unsent: list[bytes] = []  # used when fan-out blocks
        self.lock = trio.Lock()

    def push(self, data: bytes) -> None:
        """Queue `data`; a full queue cuts the client off."""
        data = _dialect(data, self.faults)
        self.queued += len(data)
        if self.queued > self.limit:
            self.cut_off.cancel()
            return
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            self.send_channel.send_nowait(data)


class BlockingConnection(MiniConnection):
    """A client whose messages the sender's task writes itself, waiting for slow readers."""

    def push(self, data: bytes) -> None:
        """Remember `data` for the sender to write."""
        self.unsent.append(_dialect(data, self.faults))

    async def flush(self) -> None:
        """Write what is unsent, waiting as long as the socket takes."""
        async with self.lock:
            data, self.unsent = b"".join(self.unsent), []
            if data:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.stream.send_all(data)


@attrs.define(eq=False)
class MiniServer:
    """A compact chat server with optional faults; `port` is set once it listens."""

    faults: Faults = Faults()
    registry: Registry = attrs.field(factory=Registry)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    port: int = 0
    connections: set[MiniConnection] = attrs.field(factory=set)
    by_name: dict[tuple[int, str], MiniConnection] = attrs.field(factory=dict)
    """With `state_by_name`: who holds each (ROOM_REF, client name)."""
    workers: trio.Semaphore | None = None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 and serve until KILL_SERVICE."""
        if self.faults.no_room_limit:
            self.registry.max_rooms_per_session = 10**9
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        with self.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self.handle, listeners)
                task_status.started(self.port)

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one client, or wait for a place among `connection_cap` served ones."""
        if not self.faults.connection_cap:
            await self.serve_client(stream)
            return
        if self.workers is None:
            self.workers = trio.Semaphore(self.faults.connection_cap)
        async with self.workers:
            await self.serve_client(stream)

    async def serve_client(self, stream: trio.SocketStream) -> None:
        """Serve one client: read and dispatch; at the end flush, half-close, drain, close."""
        cut_off = trio.CancelScope()
        kind = BlockingConnection if self.faults.blocking_fanout else MiniConnection
        conn = kind(stream, cut_off, bounded=not self.faults.unbounded_queue, faults=self.faults)
        session = Session(conn)
        self.connections.add(conn)
        if self.faults.greet:
            conn.push(b"WELCOME to the mini server\n")
        announce = not self.faults.silent_vanish
        try:
            with cut_off:
                async with trio.open_nursery() as nursery:
                    written = trio.Event()
                    nursery.start_soon(self._write, conn, written)
                    closing = await self._read(conn, session)
                    self._end_membership(session, announce=announce or closing)
                    await self._flush_blocking()
                    conn.send_channel.close()
                    await written.wait()
                    if closing:  # never close with unread input: that would reset
                        with trio.move_on_after(DRAIN):
                            while await stream.receive_some(65536):
                                pass
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.connections.discard(conn)
            self._end_membership(session, announce=announce)
            with trio.move_on_after(DRAIN, shield=True):
                await self._flush_blocking()
            await trio.aclose_forcefully(stream)

    async def _write(self, conn: MiniConnection, written: trio.Event) -> None:
        async for data in conn.receive_channel:
            await conn.stream.send_all(data)
            conn.queued -= len(data)
        if isinstance(conn, BlockingConnection):
            await conn.flush()
        await conn.stream.send_eof()
        written.set()

    async def _read(self, conn: MiniConnection, session: Session) -> bool:
        """Dispatch requests until the client ends (False) or must be closed (True: after
        DISCONNECT or error 4)."""
        pending = b""
        limit = 10**9 if self.faults.no_line_limit else MAX_LINE
        parser = RequestParser(limit)
        while True:
            data = await conn.stream.receive_some(65536)
            if not data:
                return False
            if self.faults.recv_holds_whole_requests:
                pending, parser = b"", RequestParser(limit)
            pending += data
            *lines, pending = pending.split(b"\n")
            if max([len(pending), *(len(line) for line in lines)]) > limit:
                conn.push(protocol.encode_error(ProtocolError(ErrorCode.TOO_LARGE, "too long")))
                return True
            for raw in lines:
                line = raw if self.faults.no_crlf else raw.removesuffix(b"\r")
                if self.faults.strict_spacing and b":" in line and b": " not in line:
                    continue  # as if split(": ") failed
                try:
                    events = parser.feed_line(line)
                except ProtocolError as error:
                    conn.push(protocol.encode_error(error))
                    return True
                for event in events:
                    if await self._dispatch(conn, session, event):
                        return True
                if events and self.faults.first_request_per_recv:
                    pending, parser = b"", RequestParser(limit)
                    break

    async def _dispatch(self, conn: MiniConnection, session: Session, event: object) -> bool:
        faults = self.faults
        registry = self.registry
        local_ip = conn.stream.socket.getsockname()[0]
        try:
            if isinstance(event, Helo):
                port = self.port + 1 if faults.wrong_helo_port else self.port
                reply = protocol.encode_helo(event.text, local_ip, port, "mini")
                conn.push(reply[:-1] if faults.helo_no_newline else reply)
            elif isinstance(event, Join):
                ref = registry.allocate_room(event.room_name)
                if faults.state_by_name:
                    self._take_name(conn, ref, event.client_name)
                outcome = registry.join(
                    session, ref, event.client_name, server_ip=local_ip, server_port=self.port
                )
                if faults.joined_after_announcement:
                    # The JOINED reply travels with the join event: take it off, send it late.
                    (joining,) = outcome.events
                    assert joining.welcome is not None
                    await self._publish([attrs.evolve(joining, welcome=None)])
                    conn.push(joining.welcome)
                else:
                    await self._publish(outcome.events)
            elif isinstance(event, Leave):
                if faults.silent_stray_leave and event.room_ref not in session.rooms:
                    return False
                outcome = registry.leave(
                    session, event.room_ref, event.join_id, written=event.written
                )
                assert outcome.reply is not None
                conn.push(outcome.reply)
                if faults.no_self_leave and outcome.events:
                    room = registry.room(event.room_ref)
                    assert room is not None
                    room.members.pop(conn, None)
                await self._publish(outcome.events)
            elif isinstance(event, Chat):
                ref = event.room_ref
                if faults.no_membership_check and ref not in session.rooms and registry.room(ref):
                    data = protocol.encode_chat(ref, event.client_name, event.message)
                    await self._publish([RoomEvent(ref, data)])
                    return False
                await self._publish(
                    registry.chat(session, event.room_ref, event.client_name, event.message).events
                )
            elif isinstance(event, Disconnect):
                self._end_membership(session, announce=True)
                return not faults.serve_after_disconnect
            elif isinstance(event, KillService):
                if not faults.ignore_kill:
                    self.scope.cancel()
            elif isinstance(event, Unknown):
                if faults.answer_unknown:
                    conn.push(b"ERROR_CODE: 1\nERROR_DESCRIPTION: unknown request\n")
            elif isinstance(event, ProtocolError) and not faults.lenient_integers:
                raise event
        except ProtocolError as error:
            if error.code == faults.crash_on_error:
                self.scope.cancel()
                return True
            if faults.error_3_for_unknown_room and error.code is ErrorCode.NO_SUCH_ROOM:
                error = ProtocolError(ErrorCode.NOT_A_MEMBER, error.description)
            conn.push(protocol.encode_error(error))
        await self._flush_blocking()
        return False

    def _take_name(self, conn: MiniConnection, ref: int, client_name: str) -> None:
        """The one who joined `ref` under `client_name` before stops being a member."""
        holder = self.by_name.get((ref, client_name))
        room = self.registry.room(ref)
        if holder is not None and holder is not conn and room is not None:
            room.members.pop(holder, None)
        self.by_name[(ref, client_name)] = conn

    async def _publish(self, events: Iterable[RoomEvent]) -> None:
        for event in events:
            self.registry.apply(event)

    async def _flush_blocking(self) -> None:
        if self.faults.blocking_fanout:
            for conn in list(self.connections):
                if isinstance(conn, BlockingConnection):
                    await conn.flush()

    def _end_membership(self, session: Session, *, announce: bool) -> None:
        refs = (
            list(session.rooms) if self.faults.disconnect_in_join_order else sorted(session.rooms)
        )
        for ref in refs:
            room = self.registry.room(ref)
            assert room is not None
            if announce:
                data = protocol.encode_left_announcement(ref, session.rooms[ref])
                self.registry.apply(RoomEvent(ref, data, leaving=session))
            else:
                room.members.pop(session.recipient, None)
        session.rooms.clear()


WORDINGS = {
    "chat room": (b" has joined the chat room.", b" has left the chat room."),
    "no period": (b" has joined this chatroom", b" has left this chatroom"),
}


def _dialect(data: bytes, faults: Faults) -> bytes:
    """`data` as a server with `faults` writes it."""
    if faults.wording:
        joined, left = WORDINGS[faults.wording]
        data = data.replace(b" has joined this chatroom.", joined)
        data = data.replace(b" has left this chatroom.", left)
    if faults.single_newline_chat and data.startswith(b"CHAT: ") and data.endswith(b"\n\n"):
        data = data[:-1]
    return data


async def start_mini(nursery: trio.Nursery, faults: Faults = Faults()) -> int:
    """Start a MiniServer with `faults` in `nursery`; its port."""
    port: int = await nursery.start(MiniServer(faults).serve)
    return port


async def _serve_forever(faults: Faults) -> None:
    async with trio.open_nursery() as nursery:
        port = await start_mini(nursery, faults)
        changed = {
            field.name: getattr(faults, field.name)
            for field in attrs.fields(Faults)
            if getattr(faults, field.name) != field.default
        }
        print(f"serving on 127.0.0.1:{port} with the faults {changed}", flush=True)


def main(argv: list[str]) -> None:
    """Serve a zoo server until interrupted: ``python -m tests.faulty_servers FAULT[=VALUE]...``
    (a bare fault is switched on; a value is read as a Python literal)."""
    values: dict[str, object] = {}
    for argument in argv:
        name, _, value = argument.partition("=")
        values[name] = ast.literal_eval(value) if value else True
    trio.run(_serve_forever, Faults(**values))  # type: ignore[arg-type]


if __name__ == "__main__":
    main(sys.argv[1:])
