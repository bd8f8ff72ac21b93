"""The ``trio-chat`` command: argument parsing, logging setup and start-up errors, nothing else.

Every mistake on the command line, and every failure to start, ends in one or two lines on
stderr that name the option concerned: exit status 2 for a usage error, 1 for a failure at
run time. A traceback is printed only with ``--log-level DEBUG``.

`serve` defines the ``serve`` command and runs the server; `options` holds the option types.
Each tool (``client``, ``check``, ``bench``) defines its own command in its own package.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from trio_chat import __version__
from trio_chat.cli import serve
from trio_chat.cli.options import log_level
from trio_chat.cli.serve import StartupError

__all__ = ["build_parser", "main"]

# The tools' commands: name, the module whose ``add_parser`` defines the command, and the
# line ``trio-chat --help`` shows for it. A tool's module is imported only when its command
# is the one being run (``serve`` imports none of them).
TOOLS = {
    "client": ("trio_chat.tools.terminal", "chat from the terminal"),
    "check": (
        "trio_chat.tools.check",
        "check that a server (any implementation) follows the protocol",
    ),
    "bench": (
        "trio_chat.tools.bench",
        "measure fan-out against a running server, checking every delivery",
    ),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``trio-chat`` command.

    Given the command line `argv`, only the tool it runs is imported and given its full
    parser; the other tools are listed by name. Without `argv`, every tool's parser is built.
    """
    parser = argparse.ArgumentParser(
        prog="trio-chat",
        description="A chat-room server on trio, speaking the JOIN_CHATROOM line protocol, "
        "with a terminal client, a conformance checker and a fan-out benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_log_level(parser, default="INFO")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each command adds its own parser and sets ``run``: a function of the parsed arguments
    # that returns the exit status (and raises ValueError for a usage error).
    serve.add_parser(commands)
    wanted = set(TOOLS) if argv is None else {_command_in(argv)}
    for name, (module, help_text) in TOOLS.items():
        if name in wanted:
            importlib.import_module(module).add_parser(commands)
        else:
            commands.add_parser(name, help=help_text)
    # The log level may also follow the command: ``trio-chat serve --log-level DEBUG``.
    for command in commands.choices.values():
        _add_log_level(command, default=argparse.SUPPRESS)
    return parser


def _add_log_level(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level",
        type=log_level,
        default=default,
        metavar="LEVEL",
        help="logging threshold, one of DEBUG, INFO, WARNING, ERROR: INFO logs connects, "
        "joins, leaves and disconnects; DEBUG every request, and a traceback with every "
        "start-up error (default: INFO)",
    )


def _command_in(argv: Sequence[str]) -> str | None:
    """The command that `argv` runs: its first word that is not an option or option value."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trio-chat`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    command_parser = _subparser(parser, args.command)
    if unknown:  # reported by the command's parser, with the command's usage
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv
    _setup_logging(args.log_level, getattr(args, "worker_index", None))
    try:
        status: int = args.run(args)
    except ValueError as exc:  # settings that do not make sense, reported like bad options
        command_parser.error(str(exc))
    except StartupError as exc:
        _fail(command_parser, str(exc))
    return status


def _setup_logging(level: str, worker: int | None) -> None:
    who = "" if worker is None else f"worker {worker} "
    logging.basicConfig(
        level=level, stream=sys.stderr, format=f"%(asctime)s {who}%(levelname)s %(message)s"
    )
    # coredis reports each first use of a Lua script at INFO; only its problems matter here.
    logging.getLogger("coredis").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[command]
            return found
    return parser


def _fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Report a failure at run time, as ``PROG: error: MESSAGE``, and exit with status 1."""
    parser.exit(1, f"{parser.prog}: error: {message}\n")
