"""Tests for ``trio-chat check``: it passes correct servers and pins each fault on its case.

Besides trio-chat itself, the checker runs against `MiniServer`: a small, separate
implementation of the protocol written here (on the project's pure protocol and rooms
layers) whose `Faults` switch on one deliberate mistake at a time, each a mistake real
servers for this protocol make.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable

import attrs
import pytest
import trio

from trio_chat import protocol
from trio_chat.config import Config
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
from trio_chat.server import serve
from trio_chat.tools.check import CASES, Settings, case_names, run_checks
from trio_chat.tools.check.runner import CaseResult

# Faulty servers fail some cases by not sending what is awaited: a short wait keeps the
# suite fast, and is still hundreds of times what a local server needs to answer. Bytes sent
# one at a time go without pauses except where the pause matters (see below).
FAST = Settings(reply_timeout=1.0, optional_wait=0.2, byte_pause=0.0)

# Cases that take longer (many connections, many rooms, megabytes) run against a faulty
# server only when they are the ones meant to catch its fault.
HEAVY = {"slow_reader", "crowd", "error_5", "error_4", "kill"}
LIGHT = [name for name in case_names() if name not in HEAVY]


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


MAX_LINE = 64 * 1024
MAX_QUEUED = 1024 * 1024  # bytes queued for a client before it is cut off
DRAIN = 2.0  # seconds a closing connection drains input (PROTOCOL.md: "a short grace")


class MiniConnection:
    """The sending side of one client: a queue bounded in bytes, or direct sends if fan-out
    blocks."""

    def __init__(
        self, stream: trio.SocketStream, cut_off: trio.CancelScope, *, bounded: bool = True
    ) -> None:
        self.stream = stream
        self.cut_off = cut_off
        self.limit = MAX_QUEUED if bounded else math.inf
        self.queued = 0
        self.send_channel, self.receive_channel = trio.open_memory_channel[bytes](math.inf)
        self.unsent: list[bytes] = []  # used when fan-out blocks
        self.lock = trio.Lock()

    def push(self, data: bytes) -> None:
        """Queue `data`; a full queue cuts the client off."""
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
        self.unsent.append(data)

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
        """Serve one client: read and dispatch; at the end flush, half-close, drain, close."""
        cut_off = trio.CancelScope()
        kind = BlockingConnection if self.faults.blocking_fanout else MiniConnection
        conn = kind(stream, cut_off, bounded=not self.faults.unbounded_queue)
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
                conn.push(protocol.encode_helo(event.text, local_ip, port, "mini"))
            elif isinstance(event, Join):
                ref = registry.allocate_room(event.room_name)
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
                outcome = registry.leave(session, event.room_ref, event.join_id)
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
            if faults.error_3_for_unknown_room and error.code is ErrorCode.NO_SUCH_ROOM:
                error = ProtocolError(ErrorCode.NOT_A_MEMBER, error.description)
            conn.push(protocol.encode_error(error))
        await self._flush_blocking()
        return False

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


# -- fixtures and helpers --------------------------------------------------------------------


async def start_mini(nursery: trio.Nursery, faults: Faults = Faults()) -> int:
    """Start a MiniServer with `faults`; its port."""
    port: int = await nursery.start(MiniServer(faults).serve)
    return port


def failed(results: list[CaseResult]) -> set[str]:
    """The names of the cases that failed."""
    return {result.name for result in results if result.status == "fail"}


def describe(results: list[CaseResult]) -> str:
    """The failures, for an assertion message."""
    return "\n".join(
        f"{r.name}: {r.step}\n  expected {r.expected!r}\n  arrived  {r.arrived!r}"
        for r in results
        if r.status == "fail"
    )


# -- correct servers -------------------------------------------------------------------------


async def test_trio_chat_passes_every_case(nursery: trio.Nursery) -> None:
    """trio-chat passes every case, KILL_SERVICE included, after which it has stopped."""
    stopped = trio.Event()

    async def run_server(task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
        config = Config(host="127.0.0.1", port=0)
        await serve(config, task_status=task_status)
        stopped.set()

    listeners = await nursery.start(run_server)
    port = listeners[0].socket.getsockname()[1]
    results = await run_checks("127.0.0.1", port, kill=True)
    assert [r.name for r in results] == case_names()
    assert failed(results) == set(), describe(results)
    with trio.fail_after(10):
        await stopped.wait()  # serve() returned: KILL_SERVICE stopped the server


async def test_the_mini_server_passes_every_case(nursery: trio.Nursery) -> None:
    """The independent mini server without faults passes every case: the checker is not
    tuned to trio-chat."""
    port = await start_mini(nursery)
    results = await run_checks("127.0.0.1", port, kill=True)
    assert failed(results) == set(), describe(results)


async def test_kill_is_skipped_without_the_flag(server_port: int) -> None:
    """Without `kill`, the KILL_SERVICE case is reported as skipped, not run."""
    results = await run_checks("127.0.0.1", server_port, only=["kill", "helo"])
    assert [(r.name, r.status) for r in results] == [("helo", "pass"), ("kill", "skip")]


# -- each fault is caught by its case and no other -------------------------------------------

FAULT_CASES = [
    # fault, the cases that must fail (the grader's sequence fails where it covers the
    # behaviour), extra heavy cases to run
    ("greet", {"grader", "connect_silence"}, ()),
    ("answer_unknown", {"grader", "unknown_lines"}, ()),
    ("no_self_leave", {"grader", "leave"}, ()),
    ("recv_holds_whole_requests", {"byte_by_byte"}, ()),
    ("joined_after_announcement", {"grader", "join"}, ()),
    ("no_crlf", {"crlf"}, ()),
    ("strict_spacing", {"spacing"}, ()),
    ("silent_stray_leave", {"leave_repeat"}, ()),
    ("lenient_integers", {"error_1"}, ()),
    ("error_3_for_unknown_room", {"error_2"}, ()),
    ("no_membership_check", {"error_3"}, ()),
    ("disconnect_in_join_order", {"disconnect"}, ()),
    ("serve_after_disconnect", {"grader", "disconnect"}, ()),
    ("silent_vanish", {"eof_reset"}, ()),
    ("wrong_helo_port", {"grader", "helo"}, ()),
    ("no_line_limit", {"error_4"}, ("error_4",)),
    ("no_room_limit", {"error_5"}, ("error_5",)),
    ("blocking_fanout", {"slow_reader"}, ("slow_reader",)),  # fails by flood_timeout
    ("unbounded_queue", {"slow_reader"}, ("slow_reader",)),
    ("ignore_kill", {"kill"}, ("kill",)),
]


# Whether this fault hits a case depends on how TCP happens to coalesce the checker's
# separate sends, except in the cases that pipeline on purpose: it has a test of its own.
UNEVEN_FAULTS = {"first_request_per_recv"}


def test_every_fault_has_a_test() -> None:
    """Each of the mini server's faults appears in the table of faults and cases."""
    tested = {fault for fault, _, _ in FAULT_CASES} | UNEVEN_FAULTS
    assert tested == {f.name for f in attrs.fields(Faults)}


@pytest.mark.parametrize(("fault", "expected", "heavy"), FAULT_CASES)
async def test_each_fault_fails_exactly_its_cases(
    nursery: trio.Nursery, fault: str, expected: set[str], heavy: tuple[str, ...]
) -> None:
    """A server with one fault fails the cases about that fault and passes every other."""
    port = await start_mini(nursery, Faults(**{fault: True}))
    settings = attrs.evolve(FAST, flood_timeout=2.0, kill_timeout=1.0)
    if fault == "recv_holds_whole_requests":  # keep the bytes in separate segments
        settings = attrs.evolve(settings, byte_pause=Settings().byte_pause)
    results = await run_checks(
        "127.0.0.1", port, settings, only=[*LIGHT, *heavy], kill="kill" in heavy
    )
    assert failed(results) == expected, describe(results)
    nursery.cancel_scope.cancel()


async def test_pipelining_catches_one_request_per_recv(nursery: trio.Nursery) -> None:
    """A server that takes one request from each recv fails pipelining and spacing, which
    send several requests at once (other cases only when TCP coalesces two sends)."""
    port = await start_mini(nursery, Faults(first_request_per_recv=True))
    results = await run_checks("127.0.0.1", port, FAST, only=["pipelining", "spacing"])
    assert failed(results) == {"pipelining", "spacing"}, describe(results)
    nursery.cancel_scope.cancel()


# -- the command -----------------------------------------------------------------------------


@pytest.fixture
async def faulty_port(nursery: trio.Nursery) -> AsyncIterator[int]:
    """A mini server that answers unknown lines."""
    yield await start_mini(nursery, Faults(answer_unknown=True))
    nursery.cancel_scope.cancel()


async def _check_command(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "trio_chat", "check", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_command_reports_pass_fail_and_exits_nonzero(faulty_port: int) -> None:
    """The text report shows PASS/FAIL lines, expected and arrived, a summary; exit 1."""
    result = await _check_command("127.0.0.1", str(faulty_port), "--only", "helo,unknown_lines")
    out = result.stdout.decode()
    assert result.returncode == 1, result.stderr
    lines = out.splitlines()
    assert lines[0].startswith("FAIL unknown_lines: ")
    assert "expected: ''" in lines[2]
    assert "ERROR_CODE: 1" in lines[3]
    assert lines[4].startswith("PASS helo: ")
    assert lines[-1] == "1 passed, 1 failed, 0 skipped: SOME CHECKS FAILED"


async def test_command_json_output(faulty_port: int) -> None:
    """--json prints one document with every case's status, step, expected and arrived."""
    result = await _check_command(
        "127.0.0.1", str(faulty_port), "--json", "--only", "unknown_lines", "--only", "crlf"
    )
    document = json.loads(result.stdout)
    assert result.returncode == 1
    assert document["ok"] is False
    cases = {case["name"]: case for case in document["cases"]}
    assert cases["crlf"]["status"] == "pass"
    assert cases["unknown_lines"]["status"] == "fail"
    assert cases["unknown_lines"]["expected"] == ""
    assert cases["unknown_lines"]["arrived"].startswith("ERROR_CODE: 1\n")


async def test_command_exits_zero_when_all_pass(server_port: int) -> None:
    """Against a correct server the command exits 0 with an all-passed summary."""
    result = await _check_command("127.0.0.1", str(server_port), "--only", "grader")
    assert result.returncode == 0, result.stdout
    assert (
        result.stdout.decode().splitlines()[-1]
        == "1 passed, 0 failed, 0 skipped: all checks passed"
    )


async def test_unreachable_server_fails_every_case() -> None:
    """With nothing listening, each case fails with a connection error instead of hanging."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        results = await run_checks("127.0.0.1", port, FAST, only=["helo", "crowd"])
    assert failed(results) == {"helo", "crowd"}
    assert all("cannot connect" in result.step for result in results)


def test_every_case_has_a_summary_and_a_timeout_setting() -> None:
    """Each case names a Settings field as its time limit and says what it checks."""
    for case in CASES:
        assert case.summary
        assert isinstance(getattr(Settings(), case.timeout), float)
        assert getattr(Settings(), case.timeout) < math.inf


async def test_command_lists_cases_and_refuses_unknown_ones() -> None:
    """--list prints every case; --only with a name that is not a case is a usage error."""
    listing = await _check_command("--list")
    assert [line.split()[0] for line in listing.stdout.decode().splitlines()] == case_names()
    refused = await _check_command("127.0.0.1", "9", "--only", "grader,nosuch")
    assert refused.returncode == 2
    assert "no such case: nosuch" in refused.stderr.decode()


async def test_an_advertised_address_is_checked_when_named(nursery: trio.Nursery) -> None:
    """A server reporting a configured IP fails the HELO checks unless the checker is told."""
    config = Config(host="127.0.0.1", port=0, advertise_ip="10.9.8.7")
    listeners = await nursery.start(serve, config)
    port = listeners[0].socket.getsockname()[1]
    only = ["grader", "helo", "pipelining"]
    plain = await run_checks("127.0.0.1", port, FAST, only=only)
    assert failed(plain) == {"grader", "helo"}
    told = await run_checks(
        "127.0.0.1", port, attrs.evolve(FAST, advertise_ip="10.9.8.7"), only=only
    )
    assert failed(told) == set(), describe(told)
    nursery.cancel_scope.cancel()
