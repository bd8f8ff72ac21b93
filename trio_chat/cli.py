"""The ``trio-chat`` command: argument parsing and logging setup, nothing else."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from trio_chat.config import Config
from trio_chat.server import ChatServer
from trio_chat.tools import bench, check, terminal

if TYPE_CHECKING:
    from trio_chat.redis_broker import RedisSettings

    # The subparsers object each command adds its parser to (argparse keeps the name private).
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

log = logging.getLogger("trio_chat")

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


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
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="logging threshold: INFO logs connects, joins, leaves and disconnects; DEBUG "
        "every request (default: INFO)",
    )
    cluster = parser.add_argument_group("several processes as one service")
    cluster.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="share rooms with other nodes through Redis at URL (redis://HOST:PORT/DB)",
    )
    cluster.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run N processes on the port, sharing rooms through --redis (default: 1)",
    )
    cluster.add_argument(
        "--reuse-port",
        action="store_true",
        help="listen with SO_REUSEPORT (set for each worker by --workers)",
    )
    cluster.add_argument(
        "--node-timeout",
        type=float,
        default=None,
        help="seconds after which a silent node's members are announced as left (default: 5)",
    )
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
    "max_rooms": "rooms in the whole service (rooms are never deleted)",
    "max_name": "longest room or client name, bytes",
    "receive_size": "most bytes read from a socket at once",
    "disconnect_grace": "seconds to flush and drain when a connection closes",
    "idle_timeout": "close connections silent this many seconds; off unless set",
    "accept_retry_delay": "seconds to pause when accept runs out of descriptors",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``trio-chat`` command."""
    parser = argparse.ArgumentParser(
        prog="trio-chat",
        description="A chat-room server on trio, speaking the JOIN_CHATROOM line protocol, "
        "with a terminal client, a conformance checker and a fan-out benchmark.",
    )
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
    terminal.add_parser(commands)
    check.add_parser(commands)
    bench.add_parser(commands)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The server settings named on the command line."""
    tunables = {name: getattr(args, name) for name in _TUNABLES}
    return Config(
        host=args.host,
        port=args.port,
        reuse_port=args.reuse_port,
        advertise_ip=args.advertise_ip,
        student_id=args.student_id,
        **tunables,
    )


async def run_server(config: Config, redis: RedisSettings | None = None) -> None:
    """Serve until KILL_SERVICE, SIGINT or SIGTERM; each ends the process cleanly."""
    if redis is None:
        await _serve_until_signalled(ChatServer(config))
    else:
        from trio_chat.redis_broker import RedisBroker  # needs the "redis" extra

        async with RedisBroker.connect(redis) as broker:
            await _serve_until_signalled(ChatServer(config, broker))


async def _serve_until_signalled(server: ChatServer) -> None:
    # A signal stops this process the way KILL_SERVICE does, but not the other nodes.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    server.shutdown(signal.Signals(signum).name, everywhere=False)

            nursery.start_soon(stop_on_signal)
            await server.serve()
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trio-chat`` command; returns the exit status."""
    parser = build_parser()
    # Accept the log level after the subcommand too: ``trio-chat serve --log-level DEBUG``.
    args, rest = parser.parse_known_args(argv)
    if rest:
        extra = argparse.ArgumentParser(add_help=False)
        extra.add_argument("--log-level", choices=LOG_LEVELS)
        more, unknown = extra.parse_known_args(rest)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.log_level = more.log_level or args.log_level
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    # coredis reports each first use of a Lua script at INFO; only its problems matter here.
    logging.getLogger("coredis").setLevel(
        max(logging.WARNING, logging.getLevelName(args.log_level))
    )
    try:
        status: int = args.run(args)
    except ValueError as exc:  # settings that do not make sense, reported like bad options
        parser.error(str(exc))
    return status


def _run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    if args.workers > 1:
        if args.redis is None:
            raise ValueError("--workers needs --redis: the workers share their rooms through it")
        if config.port == 0:
            raise ValueError("--workers needs a fixed --port: every worker listens on it")
        from trio_chat.workers import supervise

        return trio.run(supervise, sys.argv[1:], args.workers)
    trio.run(run_server, config, redis_settings_from_args(args))
    return 0


def redis_settings_from_args(args: argparse.Namespace) -> RedisSettings | None:
    """The Redis settings named on the command line, or None for a single process."""
    if args.redis is None:
        return None
    from trio_chat.redis_broker import RedisSettings

    if args.node_timeout is None:
        return RedisSettings(url=args.redis)
    if args.node_timeout <= 0:
        raise ValueError("--node-timeout must be positive")
    interval = min(RedisSettings(url=args.redis).heartbeat_interval, args.node_timeout / 3)
    return RedisSettings(
        url=args.redis, heartbeat_ttl=args.node_timeout, heartbeat_interval=interval
    )
