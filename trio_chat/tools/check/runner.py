"""Running the cases against a server and reporting PASS or FAIL for each."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TextIO

import trio
from attrs import asdict, frozen

from trio_chat.tools.check.cases import CASES, Case, Context
from trio_chat.tools.check.settings import Settings
from trio_chat.tools.check.wire import CaseFailed

# Expected and arrived bytes are shown around their first difference, this many characters
# either side, so a 16 MiB flood or a 70 KiB line still gives a readable report.
EXCERPT = 160


@frozen
class CaseResult:
    """How one case went. `status` is "pass", "fail" or "skip"."""

    name: str
    status: str
    summary: str
    seconds: float = 0.0
    step: str = ""
    expected: str = ""
    arrived: str = ""


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
    report: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run the cases (those named in `only`, or all) against `host`:`port`, in order.

    KILL_SERVICE is sent only with `kill`, and last. `report` is called with each result as
    soon as it is known.
    """
    settings = settings or Settings()
    unknown = set(only) - set(case_names())
    if unknown:
        raise ValueError(f"no such case: {', '.join(sorted(unknown))}")
    run_id = secrets.token_hex(4)
    results = []
    for case in CASES:
        if only and case.name not in only:
            continue
        if case.needs_kill and not kill:
            result = CaseResult(case.name, "skip", "sends KILL_SERVICE: run with --kill")
        else:
            result = await _run_case(case, host, port, settings, f"check-{run_id}-{case.name}")
        results.append(result)
        if report is not None:
            report(result)
    return results


async def _run_case(
    case: Case, host: str, port: int, settings: Settings, prefix: str
) -> CaseResult:
    context = Context(host, port, settings, prefix)
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
    if failure is None:
        return CaseResult(case.name, "pass", case.summary, seconds)
    expected, arrived = _excerpts(failure.expected, failure.arrived)
    return CaseResult(case.name, "fail", case.summary, seconds, failure.step, expected, arrived)


def _first_leaf(group: BaseExceptionGroup[CaseFailed]) -> CaseFailed:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _excerpts(expected: str, arrived: str) -> tuple[str, str]:
    """Both texts cut to the neighbourhood of their first difference."""
    if len(expected) <= 2 * EXCERPT and len(arrived) <= 2 * EXCERPT:
        return expected, arrived
    same = 0
    for a, b in zip(expected, arrived, strict=False):
        if a != b:
            break
        same += 1
    start = max(0, same - EXCERPT)

    def cut(text: str) -> str:
        head = f"[{start} characters as expected]…" if start else ""
        tail = (
            f"…[{len(text) - start - 2 * EXCERPT} more]" if len(text) > start + 2 * EXCERPT else ""
        )
        return head + text[start : start + 2 * EXCERPT] + tail

    return cut(expected), cut(arrived)


# -- the command -----------------------------------------------------------------------------


def print_result(result: CaseResult, out: TextIO) -> None:
    """One PASS/FAIL/SKIP line, and for a failure the step and what was expected and arrived."""
    label = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP"}[result.status]
    timing = f" ({result.seconds:.2f} s)" if result.status != "skip" else ""
    out.write(f"{label} {result.name}: {result.summary}{timing}\n")
    if result.status == "fail":
        out.write(f"     step:     {result.step}\n")
        if result.expected or result.arrived:
            out.write(f"     expected: {result.expected!r}\n")
            out.write(f"     arrived:  {result.arrived!r}\n")
    out.flush()


def summary(results: Sequence[CaseResult]) -> str:
    """The last line of a report."""
    counts = {
        status: sum(r.status == status for r in results) for status in ("pass", "fail", "skip")
    }
    verdict = "all checks passed" if not counts["fail"] else "SOME CHECKS FAILED"
    return f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped: {verdict}"


def run(args: argparse.Namespace) -> int:
    """Run ``trio-chat check``; exit status 0 only if every case that ran passed."""
    if args.list:
        for case in CASES:
            sys.stdout.write(f"{case.name:14} {case.summary}\n")
        return 0
    if not args.port:
        raise ValueError("HOST and PORT are required (the server to check)")
    settings = Settings(
        reply_timeout=args.reply_timeout,
        max_line=args.max_line,
        room_limit=args.room_limit,
        advertise_ip=args.advertise_ip,
        advertise_port=args.advertise_port,
    )
    only = [name for value in args.only or () for name in value.split(",") if name]
    report = None if args.json else (lambda result: print_result(result, sys.stdout))
    results = trio.run(
        lambda: run_checks(args.host, args.port, settings, only=only, kill=args.kill, report=report)
    )
    failed = any(result.status == "fail" for result in results)
    if args.json:
        document = {
            "server": f"{args.host}:{args.port}",
            "ok": not failed,
            "summary": summary(results),
            "cases": [asdict(result) for result in results],
        }
        json.dump(document, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(summary(results) + "\n")
    return 1 if failed else 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``check`` command to the ``trio-chat`` command line."""
    defaults = Settings()
    parser = commands.add_parser(
        "check",
        help="check that a server (any implementation) follows the protocol",
        description=(
            "Run PROTOCOL.md's behaviour against the server at HOST PORT over TCP and print "
            "PASS or FAIL for each case, then a summary. Exit status 0 only if all pass."
        ),
    )
    parser.set_defaults(run=run)
    parser.add_argument("host", nargs="?", default="127.0.0.1", help="the server's address")
    parser.add_argument("port", nargs="?", type=int, default=0, help="the server's port")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
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
        "--reply-timeout",
        type=float,
        default=defaults.reply_timeout,
        help=f"seconds to wait for each expected reply (default: {defaults.reply_timeout:g})",
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
