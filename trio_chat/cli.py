"""The ``trio-chat`` command: argument parsing and logging setup, nothing else."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from trio_chat.config import Config
from trio_chat.server import serve

log = logging.getLogger("trio_chat")


Commands = argparse._SubParsersAction[argparse.ArgumentParser]  # argparse keeps the name private


def _serve_parser(commands: Commands) -> None:
    defaults = Config()
    parser = commands.add_parser("serve", help="run the chat server in the foreground")
    parser.set_defaults(run=_run_serve)
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    parser.add_argument("--host", default=None, help="address to listen on (default: all)")
    parser.add_argument(
        "--advertise-ip",
        default=None,
        help="IP reported by HELO and JOINED (default: the one each client connected to)",
    )
    parser.add_argument("--student-id", default=defaults.student_id, help="HELO's StudentID")
    limits = parser.add_argument_group("limits and timeouts (PROTOCOL.md section 6)")
    for name, help_text in _TUNABLES.items():
        value = getattr(defaults, name)
        limits.add_argument(
            "--" + name.replace("_", "-"),
            type=float if isinstance(value, float) or value is None else int,
            default=value,
            help=f"{help_text} (default: {value})",
        )


# Config fields that are also command-line options, with the option's help text.
_TUNABLES = {
    "max_line": "longest request line, bytes",
    "max_message": "longest CHAT message, bytes",
    "max_outbound": "unsent bytes queued for one client before it is cut off",
    "max_connections": "connections served at once; more wait in the backlog",
    "max_rooms_per_connection": "rooms one connection may be in",
    "receive_size": "most bytes read from a socket at once",
    "disconnect_grace": "seconds to flush and drain when a connection closes",
    "idle_timeout": "close connections silent this many seconds (default: never)",
    "accept_retry_delay": "seconds to pause when accept runs out of descriptors",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``trio-chat`` command."""
    parser = argparse.ArgumentParser(prog="trio-chat", description=__doc__)
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default: INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    # Each command adds its own parser and sets ``run``: a function of the parsed arguments
    # that returns the exit status.
    _serve_parser(commands)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The server settings named on the command line."""
    tunables = {name: getattr(args, name) for name in _TUNABLES}
    return Config(
        host=args.host,
        port=args.port,
        advertise_ip=args.advertise_ip,
        student_id=args.student_id,
        **tunables,
    )


async def run_server(config: Config) -> None:
    """Serve until KILL_SERVICE, SIGINT or SIGTERM; each ends the process cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("shutting down: %s", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            await serve(config)
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trio-chat`` command; returns the exit status."""
    parser = build_parser()
    # Accept the log level after the subcommand too: ``trio-chat serve --log-level DEBUG``.
    args, rest = parser.parse_known_args(argv)
    if rest:
        extra = argparse.ArgumentParser(add_help=False)
        extra.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        more, unknown = extra.parse_known_args(rest)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.log_level = more.log_level or args.log_level
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        status: int = args.run(args)
    except ValueError as exc:  # settings that do not make sense, reported like bad options
        parser.error(str(exc))
    return status


def _run_serve(args: argparse.Namespace) -> int:
    trio.run(run_server, config_from_args(args))
    return 0
