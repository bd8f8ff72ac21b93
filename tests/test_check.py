"""Tests for ``trio-chat check``: it passes correct servers and names each fault once.

Besides trio-chat itself, the checker runs against the zoo of `tests/faulty_servers.py`:
`MiniServer`, a small separate implementation of the protocol, with one deliberate mistake
at a time, each a mistake real servers for this protocol make.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from tests.faulty_servers import Faults, start_mini
from trio_chat.config import Config
from trio_chat.server import serve
from trio_chat.tools.check import CASES, Report, Settings, case_names, run_checks, templates
from trio_chat.tools.check.profile import Profile

# Faulty servers fail some cases by not sending what is awaited: a short wait keeps the
# suite fast, and is still hundreds of times what a local server needs to answer. Bytes sent
# one at a time go without pauses except where the pause matters (see below). The quiet
# period only decides when nothing more is coming from a server: a correct one is never
# failed by a short one, since what is expected is always awaited in full.
FAST = Settings(reply_timeout=2.0, optional_wait=0.2, quiet_period=0.02, byte_pause=0.0)
# Correct servers are never kept waiting for by a timeout: the default one leaves room for a
# loaded machine in the cases with hundreds of connections.
SOUND = attrs.evolve(FAST, reply_timeout=Settings().reply_timeout)

# Cases that take longer (many connections, many rooms, megabytes) run against a faulty
# server only when they are the ones meant to catch its fault.
HEAVY = {"slow_reader", "crowd", "error_5", "error_4", "kill", "many_connections"}
LIGHT = [name for name in case_names() if name not in HEAVY]


def describe(report: Report) -> str:
    """The failures, for an assertion message."""
    return "\n".join(
        f"{r.name} ({r.status}): {r.step}\n  expected {r.expected!r}\n  arrived  {r.arrived!r}"
        for r in report.results
        if r.status in ("fail", "not run")
    )


async def start_trio_chat(nursery: trio.Nursery) -> int:
    """Start trio-chat on 127.0.0.1 in `nursery`; its port."""
    listeners = await nursery.start(serve, Config(host="127.0.0.1", port=0))
    port: int = listeners[0].socket.getsockname()[1]
    return port


# -- correct servers -------------------------------------------------------------------------


async def test_trio_chat_passes_every_case(nursery: trio.Nursery) -> None:
    """trio-chat passes every case, KILL_SERVICE included, after which it has stopped; the
    preamble finds nothing to report."""
    stopped = trio.Event()

    async def run_server(task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
        config = Config(host="127.0.0.1", port=0)
        await serve(config, task_status=task_status)
        stopped.set()

    listeners = await nursery.start(run_server)
    port = listeners[0].socket.getsockname()[1]
    report = await run_checks("127.0.0.1", port, kill=True)
    assert [r.name for r in report.results] == case_names()
    assert report.failed() == set(), describe(report)
    assert report.root_causes() == []
    assert report.exit_status == 0
    with trio.fail_after(10):
        await stopped.wait()  # serve() returned: KILL_SERVICE stopped the server


async def test_trio_chat_passes_every_case_paced(nursery: trio.Nursery) -> None:
    """In paced mode too, trio-chat passes every case (all but KILL_SERVICE: the other test
    covers it) and the report says the mode."""
    port = await start_trio_chat(nursery)
    report = await run_checks("127.0.0.1", port, SOUND, paced=True)
    assert report.mode == "paced"
    assert report.failed() == set(), describe(report)
    assert [r.name for r in report.results if r.status == "skip"] == ["kill"]
    assert report.root_causes() == []
    nursery.cancel_scope.cancel()


async def test_the_mini_server_passes_every_case(nursery: trio.Nursery) -> None:
    """The independent mini server without faults passes every case: the checker is not
    tuned to trio-chat."""
    port = await start_mini(nursery)
    report = await run_checks("127.0.0.1", port, SOUND, kill=True)
    assert report.failed() == set(), describe(report)
    assert report.exit_status == 0


async def test_kill_is_skipped_without_the_flag(server_port: int) -> None:
    """Without `kill`, the KILL_SERVICE case is reported as skipped, not run."""
    report = await run_checks("127.0.0.1", server_port, FAST, only=["kill", "helo"])
    statuses = [(r.name, r.status) for r in report.results]
    assert statuses == [("helo", "pass"), ("kill", "skip")]


# -- the zoo: one fault each, named once, the other cases unharmed ---------------------------


@attrs.frozen
class Specimen:
    """A faulty server of the zoo, the root cause the report must name, and the cases whose
    subject is that fault in each mode (the others must pass)."""

    faults: Faults
    cause: str
    strict: frozenset[str]
    paced: frozenset[str] | None = None
    """Cases about the fault in paced mode, where every other one must pass (so for every
    framing fault, and for a wording the lab's grader accepted); None: not run paced."""
    heavy: tuple[str, ...] = ()


ZOO = {
    "wording: has joined the chat room.": Specimen(
        Faults(wording="chat room"),
        "wording",
        frozenset({"grader", "broadcasts"}),
        paced=frozenset({"broadcasts"}),
    ),
    # With kill: a working KILL_SERVICE passes whatever the announcements say.
    "wording: no final period": Specimen(
        Faults(wording="no period"),
        "wording",
        frozenset({"grader", "broadcasts"}),
        heavy=("kill",),
    ),
    # With error_5: its 1001 JOINED replies and announcements are all counted.
    "CHAT ended by one newline": Specimen(
        Faults(single_newline_chat=True),
        "chat-end",
        frozenset({"grader", "broadcasts"}),
        paced=frozenset({"broadcasts"}),
        heavy=("error_5",),
    ),
    "HELO without its final newline": Specimen(
        Faults(helo_no_newline=True),
        "helo-newline",
        frozenset({"grader", "helo"}),
        paced=frozenset({"helo"}),
    ),
    # byte_by_byte fails too when TCP happens to put the end of one request and the start of
    # the next in one segment.
    "one request per recv": Specimen(
        Faults(first_request_per_recv=True),
        "pipelining",
        frozenset({"pipelining", "byte_by_byte"}),
        paced=frozenset({"pipelining", "byte_by_byte"}),
        heavy=("error_5",),
    ),
    "state keyed by client name": Specimen(
        Faults(state_by_name=True), "same_name", frozenset({"same_name"})
    ),
    "a cap of 16 connections": Specimen(
        Faults(connection_cap=16),
        "many_connections",
        frozenset({"many_connections", "crowd"}),
        heavy=("many_connections", "crowd"),
    ),
    "replies to unknown lines": Specimen(
        Faults(answer_unknown=True), "answers-unknown", frozenset({"grader", "unknown_lines"})
    ),
}


def unrelated(report: Report, related: frozenset[str]) -> list[str]:
    """The cases that ran or should have, other than `related`."""
    return [r.name for r in report.results if r.name not in related and r.status != "skip"]


def named_once(report: Report, cause: str, related: frozenset[str]) -> None:
    """The report's summary names `cause` once, with each related case that did not pass,
    and names no other root cause."""
    roots = report.root_causes()
    assert [root.key for root in roots] == [cause], describe(report)
    (root,) = roots
    assert set(root.failed) | set(root.not_run) == {
        r.name for r in report.results if r.status in ("fail", "not run")
    }
    assert set(root.failed) | set(root.not_run) <= related


@pytest.mark.parametrize("specimen", ZOO.values(), ids=ZOO.keys())
async def test_zoo_strict(nursery: trio.Nursery, specimen: Specimen) -> None:
    """Against a server with one fault (strict mode), the summary names the fault once and
    at least 80% of the cases unrelated to it pass (here: all of them)."""
    port = await start_mini(nursery, specimen.faults)
    only = [*LIGHT, *specimen.heavy]
    kill = "kill" in specimen.heavy
    report = await run_checks("127.0.0.1", port, FAST, only=only, kill=kill)
    named_once(report, specimen.cause, specimen.strict)
    others = unrelated(report, specimen.strict)
    passed = [name for name in others if report.status(name) == "pass"]
    assert len(passed) >= 0.8 * len(others), describe(report)
    assert passed == others, describe(report)
    assert report.exit_status == 1
    nursery.cancel_scope.cancel()


PACED = {name: specimen for name, specimen in ZOO.items() if specimen.paced is not None}


@pytest.mark.parametrize("specimen", PACED.values(), ids=PACED.keys())
async def test_zoo_paced(nursery: trio.Nursery, specimen: Specimen) -> None:
    """Against a server whose one fault is a framing one (or a wording), paced mode names it
    and passes every other case, the grader's sequence included (the lab's grader gave such
    servers full marks)."""
    assert specimen.paced is not None
    port = await start_mini(nursery, specimen.faults)
    report = await run_checks("127.0.0.1", port, FAST, only=LIGHT, paced=True)
    named_once(report, specimen.cause, specimen.paced)
    others = unrelated(report, specimen.paced)
    assert "grader" in others
    assert [name for name in others if report.status(name) == "pass"] == others
    nursery.cancel_scope.cancel()


async def test_a_dead_server_is_reported_once(nursery: trio.Nursery) -> None:
    """A server that stops at one request (here: where error 2 is due) fails the case that
    sent it, with the cause `down`, and every later case is NOT RUN for that cause."""
    port = await start_mini(nursery, Faults(crash_on_error=2))
    report = await run_checks("127.0.0.1", port, FAST, only=LIGHT)
    names = [r.name for r in report.results]
    crash = names.index("error_2")
    assert all(r.status == "pass" for r in report.results[:crash]), describe(report)
    assert report.results[crash].status == "fail"
    assert all(r.status == "not run" and r.causes == ("down",) for r in report.results[crash + 1 :])
    (root,) = report.root_causes()
    assert root.key == "down"
    assert "`error_2`" in root.text
    assert root.failed == ("error_2",)
    assert root.not_run == tuple(names[crash + 1 :])
    assert report.exit_status == 1


async def test_an_unreachable_server_runs_nothing() -> None:
    """With nothing listening, the preamble says so once, no case runs, and the exit status
    is 2; no message has empty parentheses."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        report = await run_checks("127.0.0.1", port, FAST, only=["helo", "crowd"])
    assert [r.status for r in report.results] == ["not run", "not run"]
    assert report.exit_status == 2
    (root,) = report.root_causes()
    assert root.key == "unreachable"
    assert root.not_run == ("helo", "crowd")
    assert "cannot connect" in root.text
    assert "()" not in root.text


# -- each fault of the mini server is caught by its case and no other ------------------------

FAULT_CASES = [
    # fault, the cases that must fail (the grader's sequence fails where it covers the
    # behaviour), extra heavy cases to run
    ("greet", {"grader", "connect_silence"}, ()),
    ("no_self_leave", {"grader", "leave"}, ()),
    ("recv_holds_whole_requests", {"byte_by_byte"}, ()),
    ("joined_after_announcement", {"grader", "join"}, ()),
    ("no_crlf", {"crlf"}, ()),
    ("strict_spacing", {"spacing"}, ()),
    ("silent_stray_leave", {"grader", "leave_repeat", "integers"}, ()),
    ("lenient_integers", {"error_1", "missing_field", "integers"}, ()),
    ("error_3_for_unknown_room", {"error_2", "integers"}, ()),
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
ZOO_FAULTS = {
    "wording",
    "single_newline_chat",
    "helo_no_newline",
    "first_request_per_recv",
    "state_by_name",
    "connection_cap",
    "crash_on_error",
    "answer_unknown",
}


def test_every_fault_has_a_test() -> None:
    """Each of the mini server's faults appears in the zoo or in the table of faults."""
    tested = {fault for fault, _, _ in FAULT_CASES} | ZOO_FAULTS
    assert tested == {f.name for f in attrs.fields(Faults)}


@pytest.mark.parametrize(("fault", "expected", "heavy"), FAULT_CASES)
async def test_each_fault_fails_exactly_its_cases(
    nursery: trio.Nursery, fault: str, expected: set[str], heavy: tuple[str, ...]
) -> None:
    """A server with one fault fails the cases about that fault and passes every other."""
    faults: dict[str, Any] = {fault: True}
    port = await start_mini(nursery, Faults(**faults))
    # Only light cases run besides the one meant to fail: a 1 s wait for what never comes.
    settings = attrs.evolve(FAST, reply_timeout=1.0, flood_timeout=2.0, kill_timeout=1.0)
    if fault == "recv_holds_whole_requests":  # keep the bytes in separate segments
        settings = attrs.evolve(settings, byte_pause=Settings().byte_pause)
    report = await run_checks(
        "127.0.0.1", port, settings, only=[*LIGHT, *heavy], kill="kill" in heavy
    )
    assert report.failed() == expected, describe(report)
    nursery.cancel_scope.cancel()


# -- the checker's own expectations -----------------------------------------------------------


def test_templates_are_the_protocol_documents_bytes() -> None:
    """The checker's templates write the bytes of the protocol document, independently of
    the server's encoders."""
    assert templates.joined("lobby", "10.0.0.1", 8000, 3, 7) == (
        b"JOINED_CHATROOM: lobby\nSERVER_IP: 10.0.0.1\nPORT: 8000\nROOM_REF: 3\nJOIN_ID: 7\n"
    )
    assert templates.left(3, 7) == b"LEFT_CHATROOM: 3\nJOIN_ID: 7\n"
    assert templates.joined_announcement(3, "ann") == (
        b"CHAT: 3\nCLIENT_NAME: ann\nMESSAGE: ann has joined this chatroom.\n\n"
    )
    assert templates.left_announcement(3, "ann") == (
        b"CHAT: 3\nCLIENT_NAME: ann\nMESSAGE: ann has left this chatroom.\n\n"
    )
    assert (
        templates.helo_head("hi", "10.0.0.1", 8000)
        == b"HELO hi\nIP:10.0.0.1\nPort:8000\nStudentID:"
    )


def test_a_profile_renders_the_servers_dialect() -> None:
    """What a profile learned rewrites announcements and CHAT ends, and says which deviation
    each rewrite used."""
    profile = Profile(joined_message="\x00 joined", chat_end=b"\n")
    canonical = templates.joined_announcement(1, "ann") + templates.chat(1, "ann", "two\nlines")
    assert profile.render(canonical) == (
        b"CHAT: 1\nCLIENT_NAME: ann\nMESSAGE: ann joined\n"
        b"CHAT: 1\nCLIENT_NAME: ann\nMESSAGE: two\nlines\n",
        frozenset({"wording", "chat-end"}),
    )
    assert Profile().render(canonical) == (canonical, frozenset())


# -- the command -----------------------------------------------------------------------------


@pytest.fixture
async def faulty_port(nursery: trio.Nursery) -> AsyncIterator[int]:
    """A mini server that answers unknown lines."""
    yield await start_mini(nursery, Faults(answer_unknown=True))
    nursery.cancel_scope.cancel()


async def _check_command(*args: str) -> subprocess.CompletedProcess[bytes]:
    fast = ["--reply-timeout", "1", "--quiet-period", "0.02"] if len(args) > 1 else []
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "trio_chat", "check", *args, *fast],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_command_reports_root_causes_first_and_exits_one(faulty_port: int) -> None:
    """The text report gives the mode, then each root cause once with the cases it failed,
    then a line per case (a failure with its step, expected, arrived and cause), then the
    counts; exit status 1."""
    result = await _check_command(
        "127.0.0.1", str(faulty_port), "--only", "helo,unknown_lines,grader"
    )
    out = result.stdout.decode()
    assert result.returncode == 1, result.stderr
    lines = out.splitlines()
    assert lines[0].startswith(f"trio-chat check 127.0.0.1:{faulty_port}, strict mode")
    assert lines[2] == "Root causes, each once:"
    assert lines[3].startswith("  1. [answers-unknown] replies to a line that starts no request")
    assert lines[4] == "       failed: grader, unknown_lines"
    assert lines[5] == ""
    assert lines[6].startswith("FAIL grader: ")
    failure = lines[lines.index(next(line for line in lines if line.startswith("FAIL unknown"))) :]
    assert failure[1].startswith("     step:     a: unknown line")
    assert failure[2] == "     expected: ''"
    assert "ERROR_CODE: 1" in failure[3]
    assert failure[4] == "     cause:    answers-unknown"
    assert any(line.startswith("PASS helo: ") for line in lines)
    assert lines[-1] == "1 passed, 2 failed, 0 not run, 0 skipped: NOT CONFORMING"


async def test_command_json_output(faulty_port: int) -> None:
    """--json prints one document: the mode, the root causes, every case's status, step,
    expected, arrived and causes."""
    result = await _check_command(
        "127.0.0.1", str(faulty_port), "--json", "--paced", "--only", "unknown_lines,crlf"
    )
    document = json.loads(result.stdout)
    assert result.returncode == 1
    assert document["ok"] is False
    assert document["mode"] == "paced"
    assert document["exit_status"] == 1
    assert [root["key"] for root in document["root_causes"]] == ["answers-unknown"]
    assert document["root_causes"][0]["failed"] == ["unknown_lines"]
    cases = {case["name"]: case for case in document["cases"]}
    assert cases["crlf"]["status"] == "pass"
    assert cases["unknown_lines"]["status"] == "fail"
    assert cases["unknown_lines"]["expected"] == ""
    assert cases["unknown_lines"]["arrived"].startswith("ERROR_CODE: 1\n")
    assert cases["unknown_lines"]["causes"] == ["answers-unknown"]


async def test_command_exits_zero_when_all_pass(server_port: int) -> None:
    """Against a correct server the command exits 0 with a conforming summary."""
    result = await _check_command("127.0.0.1", str(server_port), "--only", "grader")
    assert result.returncode == 0, result.stdout
    lines = result.stdout.decode().splitlines()
    assert "Root causes" not in result.stdout.decode()
    assert lines[-1] == "1 passed, 0 failed, 0 not run, 0 skipped: conforming"


async def test_command_exits_two_when_unreachable() -> None:
    """With nothing listening, the command says so once and exits 2."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = await _check_command("127.0.0.1", str(port))
    out = result.stdout.decode()
    assert result.returncode == 2, out
    assert out.count("cannot connect") == 1
    assert "()" not in out
    counts = f"0 passed, 0 failed, {len(CASES) - 1} not run, 1 skipped: UNREACHABLE"
    assert out.splitlines()[-1] == counts


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
    assert plain.failed() == {"grader", "helo"}
    told = await run_checks(
        "127.0.0.1", port, attrs.evolve(FAST, advertise_ip="10.9.8.7"), only=only
    )
    assert told.failed() == set(), describe(told)
    nursery.cancel_scope.cancel()
