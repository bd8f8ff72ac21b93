"""Running the preamble and the cases against a server, and the ``check`` command."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import traceback
from collections.abc import Callable, Sequence

import trio
from attrs import evolve

from trio_chat.tools.check.cases import CASES
from trio_chat.tools.check.context import Case, Context
from trio_chat.tools.check.preamble import probe
from trio_chat.tools.check.profile import Cause, Profile
from trio_chat.tools.check.report import CaseResult, Report, excerpts, write, write_result
from trio_chat.tools.check.settings import Settings
from trio_chat.tools.check.wire import CaseFailed


def case_names() -> list[str]:
    """The names of every case, in the order they run."""
    return [case.name for case in CASES]


async def run_checks(
    host: str,
    port: int,
    settings: Settings | None = None,
    *,
    only: Sequence[str] = (),
    kill: bool = False,
    paced: bool = False,
    report: Callable[[CaseResult], None] | None = None,
) -> Report:
    """Probe the basics, then run the cases (those named in `only`, or all) in order.

    KILL_SERVICE is sent only with `kill`, and last. `paced` waits for each reply and a quiet
    period instead of sending a HELO barrier. `report` is called with each result as soon as
    it is known.
    """
    settings = settings or Settings()
    unknown = set(only) - set(case_names())
    if unknown:
        raise ValueError(f"no such case: {', '.join(sorted(unknown))}")
    run_id = secrets.token_hex(3)
    profile = Profile(paced=paced)
    await probe(Context(host, port, settings, profile, f"{run_id}p"))
    results: list[CaseResult] = []
    for number, case in enumerate(CASES):
        if only and case.name not in only:
            continue
        tag = f"{run_id}{number}"
        if case.needs_kill and not kill:
            result = CaseResult(
                case.name, "skip", case.summary, step="sends KILL_SERVICE: run with --kill"
            )
        else:
            result = await _decide(case, results, host, port, settings, profile, tag)
        results.append(result)
        if report is not None:
            report(result)
    return Report(f"{host}:{port}", profile.mode, tuple(profile.causes.values()), tuple(results))


async def _decide(
    case: Case,
    earlier: list[CaseResult],
    host: str,
    port: int,
    settings: Settings,
    profile: Profile,
    tag: str,
) -> CaseResult:
    """Run `case`, unless something it needs is missing."""
    blocking = profile.blocked(case.needs)
    if blocking is not None:
        return CaseResult(
            case.name, "not run", case.summary, step=blocking.text, causes=(blocking.key,)
        )
    for result in earlier:
        if result.name in case.needs and result.status in ("fail", "not run"):
            return CaseResult(
                case.name,
                "not run",
                case.summary,
                step=f"needs what `{result.name}` found missing: {result.step}",
                causes=result.causes or (result.name,),
            )
    result = await _run_case(case, host, port, settings, profile, tag)
    if result.status == "fail" and not result.causes:
        about = tuple(key for key, cause in profile.causes.items() if case.name in cause.subject)
        result = evolve(result, causes=about)
    if result.status == "fail" and not await _alive(host, port, settings, profile):
        profile.add(
            Cause(
                "down",
                f"the server stopped answering (no HELO reply on a new connection) during "
                f"`{case.name}`, at: {result.step}",
                blocking=True,
            )
        )
        result = evolve(result, causes=(*result.causes, "down"))
    return result


async def _alive(host: str, port: int, settings: Settings, profile: Profile) -> bool:
    """Whether a new connection still gets a reply to HELO (or, from a server that never
    answers HELO, is accepted)."""
    try:
        with trio.fail_after(settings.connect_timeout + settings.reply_timeout):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                if "helo" in profile.causes:
                    return True
                await stream.send_all(b"HELO alive\n")
                received = bytearray()
                while b"HELO alive\n" not in received:
                    data = await stream.receive_some(65536)
                    if not data:
                        return False
                    received += data
                return True
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        return False


async def _run_case(
    case: Case, host: str, port: int, settings: Settings, profile: Profile, tag: str
) -> CaseResult:
    context = Context(host, port, settings, profile, tag)
    timeout: float = getattr(settings, case.timeout)
    started = trio.current_time()
    failure: CaseFailed | None = None
    try:
        with trio.move_on_after(timeout) as scope:
            await case.run(context)
        if scope.cancelled_caught:
            failure = CaseFailed(f"the case did not finish within {timeout:g} s ({case.timeout})")
    except CaseFailed as exc:
        failure = exc
    except BaseExceptionGroup as group:  # from cases that run connections concurrently
        failed, _ = group.split(CaseFailed)
        if failed is None:
            raise
        failure = _first_leaf(failed)
    except Exception:
        failure = CaseFailed("the checker itself failed:\n" + traceback.format_exc())
    finally:
        await context.aclose()
    seconds = round(trio.current_time() - started, 3)
    tolerated = tuple(sorted(context.tolerated))
    if failure is None:
        return CaseResult(case.name, "pass", case.summary, seconds, tolerated=tolerated)
    expected, arrived = excerpts(failure.expected, failure.arrived)
    return CaseResult(
        case.name,
        "fail",
        case.summary,
        seconds,
        failure.step,
        expected,
        arrived,
        tuple(sorted(failure.causes)),
        tolerated,
    )


def _first_leaf(group: BaseExceptionGroup[CaseFailed]) -> CaseFailed:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


# -- the command -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run ``trio-chat check``; exit status 0 if the server conforms, 1 if it does not, 2 if
    it cannot be reached."""
    if args.list:
        for case in CASES:
            sys.stdout.write(f"{case.name:16} {case.summary}\n")
        return 0
    if not args.port:
        raise ValueError("HOST and PORT are required (the server to check)")
    settings = Settings(
        reply_timeout=args.reply_timeout,
        quiet_period=args.quiet_period,
        max_line=args.max_line,
        room_limit=args.room_limit,
        advertise_ip=args.advertise_ip,
        advertise_port=args.advertise_port,
    )
    only = [name for value in args.only or () for name in value.split(",") if name]
    progress = None
    if not args.json and sys.stderr.isatty():
        progress = lambda result: write_result(result, sys.stderr)  # noqa: E731
    report = trio.run(
        lambda: run_checks(
            args.host,
            args.port,
            settings,
            only=only,
            kill=args.kill,
            paced=args.paced,
            report=progress,
        )
    )
    if args.json:
        json.dump(report.document(), sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        write(report, sys.stdout)
    return report.exit_status


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``check`` command to the ``trio-chat`` command line."""
    defaults = Settings()
    parser = commands.add_parser(
        "check",
        help="check that a server (any implementation) follows the protocol",
        description=(
            "Probe the basics of the server at HOST PORT over TCP, then run each case of the "
            "protocol against it, and report each root cause once, then PASS, FAIL or NOT RUN "
            "for each case. Exit status: 0 conforming, 1 not conforming, 2 unreachable."
        ),
    )
    parser.set_defaults(run=run)
    parser.add_argument("host", nargs="?", default="127.0.0.1", help="the server's address")
    parser.add_argument("port", nargs="?", type=int, default=0, help="the server's port")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--only",
        action="append",
        metavar="CASE",
        help="run only this case (repeat, or separate with commas); --list names them",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--kill", action="store_true", help="finally send KILL_SERVICE and check the shutdown"
    )
    parser.add_argument(
        "--paced",
        action="store_true",
        help=(
            "wait for each reply and a quiet period instead of sending a HELO barrier behind "
            "each step, as the lab's grader did"
        ),
    )
    parser.add_argument(
        "--reply-timeout",
        type=float,
        default=defaults.reply_timeout,
        help=f"seconds to wait for each expected reply (default: {defaults.reply_timeout:g})",
    )
    parser.add_argument(
        "--quiet-period",
        type=float,
        default=defaults.quiet_period,
        help=(
            "seconds of silence taken to mean nothing more is coming "
            f"(default: {defaults.quiet_period:g})"
        ),
    )
    parser.add_argument(
        "--max-line",
        type=int,
        default=defaults.max_line,
        help=f"the server's request line limit in bytes (default: {defaults.max_line})",
    )
    parser.add_argument(
        "--room-limit",
        type=int,
        default=defaults.room_limit,
        help=f"the server's rooms-per-connection limit (default: {defaults.room_limit})",
    )
    parser.add_argument(
        "--advertise-ip",
        default=None,
        help="the IP the server is configured to report (default: the address connected to)",
    )
    parser.add_argument(
        "--advertise-port",
        type=int,
        default=None,
        help="the port the server reports, if not PORT (behind a port mapping)",
    )
