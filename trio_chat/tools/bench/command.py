"""``trio-chat bench``: its options, the loads they name, and the report of each run."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from attrs import evolve

from trio_chat.tools.bench.load import SCENARIOS, BenchError, Load
from trio_chat.tools.bench.run import IDLE_TIMEOUT, RUN_TIMEOUT, run_load
from trio_chat.tools.bench.setup import SETUP_TIMEOUT
from trio_chat.tools.bench.statistics import format_table, progress_printer

if TYPE_CHECKING:
    # The subparsers object of the ``trio-chat`` command (argparse keeps the name private).
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

DESCRIPTION = """\
R rooms of M member connections each; the last S members of every room are senders, each
sending N CHAT messages, as fast as a window of unacknowledged messages allows or at a fixed
rate. Every member must receive every message of its room's other members exactly once and,
per sender, in order. The figures are deliveries per second (a delivery is one message
reaching one member other than its sender) and delivery latency."""


def add_parser(commands: Commands) -> None:
    """Register ``trio-chat bench``."""
    parser = commands.add_parser(
        "bench",
        usage="%(prog)s HOST PORT [SCENARIO ...] [options]",
        help="measure fan-out against a running server, checking every delivery",
        description=DESCRIPTION,
    )
    parser.set_defaults(run=_run_bench)
    parser.add_argument("host", help="server address")
    parser.add_argument("port", type=int, help="server port")
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"named loads ({', '.join(SCENARIOS)}); default: all of them, or one custom "
        "load if any load option is given",
    )
    shape = parser.add_argument_group(
        "load (each overrides the scenario's value; defaults for a custom load in brackets)"
    )
    custom = Load()
    for name, kind, text in (
        ("rooms", int, "rooms"),
        ("members", int, "member connections per room, senders included"),
        ("senders", int, "senders per room (the last members)"),
        ("messages", int, "messages per sender"),
        ("size", int, "bytes of message text"),
        ("rate", float, "messages/s per sender; 0: as fast as the window allows"),
        ("window", int, "unacknowledged messages per sender; 0: no limit"),
    ):
        shape.add_argument(f"--{name}", type=kind, help=f"{text} [{getattr(custom, name):g}]")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per run")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="show progress on stderr even when it is not a terminal",
    )
    parser.add_argument(
        "--setup-timeout", type=float, default=SETUP_TIMEOUT, help="seconds to join everyone"
    )
    parser.add_argument(
        "--timeout", type=float, default=RUN_TIMEOUT, help="seconds for the measured phase"
    )
    parser.add_argument(
        "--idle", type=float, default=IDLE_TIMEOUT, help="give up after this long with no delivery"
    )


_LOAD_OPTIONS = ("rooms", "members", "senders", "messages", "size", "rate", "window")


def loads_from_args(args: argparse.Namespace) -> list[tuple[str, Load]]:
    """The (scenario name, load) pairs the command line asks for."""
    overrides = {k: getattr(args, k) for k in _LOAD_OPTIONS if getattr(args, k) is not None}
    names = args.scenarios or ([] if overrides else list(SCENARIOS))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r} (known: {', '.join(SCENARIOS)})")
    loads = [(n, evolve(SCENARIOS[n], **overrides)) for n in names]
    loads = loads or [("custom", Load(**overrides))]
    for name, load in loads:
        problem = load.problem()
        if problem is not None:
            raise ValueError(f"{name}: {problem}")
    return loads


def _run_bench(args: argparse.Namespace) -> int:
    loads = loads_from_args(args)
    tty = sys.stderr.isatty()
    progress = progress_printer(sys.stderr, tty=tty) if tty or args.progress else None
    results = []
    for name, load in loads:
        try:
            result = run_load(
                args.host,
                args.port,
                load,
                scenario=name,
                progress=progress,
                setup_timeout=args.setup_timeout,
                run_timeout=args.timeout,
                idle_timeout=args.idle,
            )
        except (BenchError, OSError) as error:
            if progress is not None and tty:
                sys.stderr.write("\n")
            print(f"trio-chat bench: {name}: {error}", file=sys.stderr)
            return 1  # the run could not be set up: a failure at run time
        finally:
            if progress is not None and tty:
                sys.stderr.write("\r\x1b[K")
        results.append(result)
        if args.json:
            print(json.dumps(result.as_json()), flush=True)
    if not args.json:
        print(format_table(results))
    return 0 if all(r.ok for r in results) else 1
