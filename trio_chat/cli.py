"""The ``trio-chat`` command: argument parsing, logging setup and start-up errors, nothing else.

Every mistake on the command line, and every failure to start, ends in one or two lines on
stderr that name the option concerned: exit status 2 for a usage error, 1 for a failure at
run time. A traceback is printed only with ``--log-level DEBUG``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import trio

from trio_chat import __version__, tls
from trio_chat.config import Config
from trio_chat.limits import AddressSet
from trio_chat.server import ChatServer, ListenError
from trio_chat.web import WebListenError

if TYPE_CHECKING:
    from trio_chat.redis import RedisSettings

    # The subparsers object each command adds its parser to (argparse keeps the name private).
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

log = logging.getLogger("trio_chat")

E = TypeVar("E", bound=BaseException)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

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

EXTRA_HINT = "pip install 'trio-chat[redis]'"
"""How to install what ``--redis`` needs; named when it is missing."""


class StartupError(Exception):
    """The server could not start, for a reason the message names (exit status 1)."""


# -- option types: each names the problem; argparse adds the option's name -----------------


def port_number(text: str) -> int:
    """A TCP port: an integer from 0 to 65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, not {value}")
    return value


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An option type for a number of `kind` that must be greater than zero."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, not {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse calls the type in its own messages
    return parse


def not_negative(kind: type[int] | type[float]) -> Callable[[str], float]:
    """An option type for a number of `kind` that may be zero (which turns a limit off)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def networks(text: str) -> AddressSet:
    """A list of IP networks, ``CIDR[,CIDR...]``, or ``none``."""
    try:
        return AddressSet.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def log_level(text: str) -> str:
    """A logging threshold, in either case."""
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return text.upper()


# -- the parser -------------------------------------------------------------------------------


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
    _serve_parser(commands)
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


def _serve_parser(commands: Commands) -> None:
    parser = commands.add_parser(
        "serve",
        usage="%(prog)s --port PORT [options]",
        help="run the chat server in the foreground",
        description="Run the chat server in the foreground until KILL_SERVICE, SIGINT or "
        "SIGTERM; logs go to stderr. The protocol is described in docs/protocol.md.",
    )
    parser.set_defaults(run=_run_serve)
    _listen_options(parser.add_argument_group("where it listens"))
    _identity_options(parser.add_argument_group("what it says about itself"))
    _cluster_options(parser.add_argument_group("several processes as one service"))
    _web_options(parser.add_argument_group("chat from a browser (docs/web.md)"))
    _open_options(
        parser.add_argument_group(
            "running it in the open (the defaults keep the lab's behaviour; see the README)"
        )
    )
    _limit_options(
        parser.add_argument_group(
            "limits and timeouts (docs/protocol.md, Limits; trio_chat/config.py says why)"
        )
    )


ArgumentGroup = argparse._ArgumentGroup


def _listen_options(group: ArgumentGroup) -> None:
    group.add_argument(
        "--port", type=port_number, required=True, help="TCP port, 0-65535 (0: any free port)"
    )
    group.add_argument("--host", default=None, help="address to listen on (default: all)")
    group.add_argument(
        "--reuse-port",
        action="store_true",
        help="listen with SO_REUSEPORT (set for each worker by --workers)",
    )
    # Set by ``--workers`` on each worker's command line: its number, shown in its logs.
    group.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)


def _identity_options(group: ArgumentGroup) -> None:
    group.add_argument(
        "--advertise-ip",
        default=None,
        help="IP reported by HELO and JOINED (default: the one each client connected to)",
    )
    group.add_argument("--student-id", default=Config().student_id, help="HELO's StudentID")


def _cluster_options(group: ArgumentGroup) -> None:
    group.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="share rooms with other nodes through Redis at URL (redis://HOST:PORT/DB); "
        f"needs the redis extra: {EXTRA_HINT}",
    )
    group.add_argument(
        "--workers",
        type=positive(int),
        default=1,
        metavar="N",
        help="run N processes on the port, sharing rooms through --redis (default: 1)",
    )
    group.add_argument(
        "--node-timeout",
        type=positive(float),
        default=None,
        metavar="SECONDS",
        help="seconds after which a silent node's members are announced as left (default: 5)",
    )


def _web_options(group: ArgumentGroup) -> None:
    group.add_argument(
        "--web-port",
        type=port_number,
        default=None,
        help="serve the chat page at http://HOST:PORT/ and its WebSocket at /ws (0: any free "
        "port; default: no web door)",
    )
    group.add_argument(
        "--web-host", default=None, help="address the web door listens on (default: --host)"
    )
    group.add_argument(
        "--web-origins",
        metavar="ORIGIN[,ORIGIN...]",
        default="",
        help="other sites' pages (scheme://host[:port]) that may open the WebSocket, or '*' "
        "for any; the server's own page always may (default: only it)",
    )
    group.add_argument(
        "--web-tls",
        action="store_true",
        help="serve the page and its WebSocket over TLS (https://, wss://) with --tls-cert",
    )


def _open_options(group: ArgumentGroup) -> None:
    defaults = Config()
    group.add_argument(
        "--tls-port",
        type=port_number,
        metavar="PORT",
        help="also serve the protocol over TLS on this port (needs --tls-cert)",
    )
    group.add_argument("--tls-cert", type=Path, metavar="FILE", help="PEM certificate chain")
    group.add_argument(
        "--tls-key", type=Path, metavar="FILE", help="PEM private key (default: in --tls-cert)"
    )
    group.add_argument(
        "--kill-allow",
        type=networks,
        metavar="CIDR[,CIDR...]",
        default=defaults.kill_allow,
        help="only clients from these networks may stop the service with KILL_SERVICE "
        "('none': no client; default: every address)",
    )
    group.add_argument(
        "--limit-exempt",
        type=networks,
        metavar="CIDR[,CIDR...]",
        default=defaults.limit_exempt,
        help="networks exempt from --max-connections-per-ip and flood control "
        f"('none': no one; default: {defaults.limit_exempt})",
    )
    group.add_argument(
        "--request-rate",
        type=positive(float),
        metavar="R",
        help="requests per second per connection; a faster client is slowed down, never "
        "dropped (default: off)",
    )
    group.add_argument(
        "--request-burst",
        type=positive(float),
        metavar="B",
        help="requests at once before --request-rate paces them (default: one second's worth)",
    )
    group.add_argument(
        "--metrics-port",
        type=port_number,
        metavar="PORT",
        help="serve /metrics (Prometheus) and /healthz over HTTP on this port (default: off)",
    )
    group.add_argument(
        "--metrics-host",
        metavar="HOST",
        default=defaults.metrics_host,
        help=f"address of the metrics endpoint (default: {defaults.metrics_host})",
    )


# Config fields that are also command-line options, with the option's help text.
_TUNABLES = {
    "max_line": "longest request line, bytes",
    "max_message": "longest CHAT message, bytes",
    "max_outbound": "unsent bytes queued for one client before it is cut off",
    "max_connections": "connections served at once; more wait in the backlog",
    "max_connections_per_ip": "connections at once from one address outside --limit-exempt "
    "(IPv6: one /64); 0: no limit",
    "max_rooms_per_connection": "rooms one connection may be in",
    "max_rooms": "rooms in the whole service (rooms are never deleted)",
    "max_name": "longest room or client name, bytes",
    "receive_size": "most bytes read from a socket at once",
    "disconnect_grace": "seconds to flush and drain when a connection closes",
    "idle_timeout": "close connections silent this many seconds; off unless set",
    "accept_retry_delay": "seconds to pause when accept runs out of descriptors",
    "web_request_timeout": "seconds a web connection has to send each HTTP request head",
    "web_max_request_head": "longest HTTP request head, bytes",
    "web_max_message": "longest WebSocket message from a client, bytes",
}


# Tunables for which 0 means "no limit".
_ZERO_TURNS_OFF = {"max_connections_per_ip"}


def _limit_options(group: ArgumentGroup) -> None:
    defaults = Config()
    for name, help_text in _TUNABLES.items():
        value = getattr(defaults, name)
        kind = float if isinstance(value, float) or value is None else int
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=not_negative(kind) if name in _ZERO_TURNS_OFF else positive(kind),
            default=None,  # unset: Config's default, which may follow other settings
            metavar="N" if kind is int else "SECONDS",
            help=f"{help_text} (default: {'off' if value is None else value})",
        )


# -- running -----------------------------------------------------------------------------------


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


def _run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    redis = redis_settings_from_args(args)
    if config.tls_cert is not None:  # a bad certificate fails here, before anything starts
        try:
            tls.server_context(config.tls_cert, config.tls_key)
        except tls.TLSSetupError as exc:
            raise StartupError(str(exc)) from None
    if args.workers > 1 and args.worker_index is None:  # a worker never starts workers
        if redis is None:
            raise ValueError("--workers needs --redis: the workers share their rooms through it")
        if config.port == 0:
            raise ValueError("--workers needs a fixed --port: every worker listens on it")
        if config.metrics_port is not None:
            raise ValueError(
                "--metrics-port serves one process: with --workers, run one node per process "
                "instead, each with its own --metrics-port, sharing --redis"
            )
        from trio_chat.workers import supervise

        return trio.run(supervise, args.argv, args.workers)
    try:
        trio.run(run_server, config, redis)
    except BaseExceptionGroup as group:
        failure = only(group, StartupError)
        if failure is None:
            raise
        raise failure from None
    return 0


def only(exc: BaseException, kind: type[E]) -> E | None:
    """`exc` if it is a `kind`, or the first of a group made of nothing else; else None."""
    if isinstance(exc, BaseExceptionGroup):
        matched, others = exc.split(kind)
        if matched is None or others is not None:
            return None
        leaf: BaseException = matched
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        exc = leaf
    return exc if isinstance(exc, kind) else None


def describe_listen_error(config: Config, error: OSError) -> str:
    """One line saying why the server could not listen, naming the option to change."""
    host, port, options = config.host, config.port, ("--host", "--port")
    if isinstance(error, WebListenError):  # the web door's address, not the chat port's
        host = config.web_host if config.web_host is not None else config.host
        port, options = config.web_port or 0, ("--web-host", "--web-port")
        error = error.error
    if isinstance(error, ListenError):  # the TLS or metrics listener, not the chat port
        host, port = error.host, error.port
        options = (error.host_option, error.port_option)
        error = error.error
    host_option, port_option = options
    where = f"{host or 'every address'} port {port}"
    if isinstance(error, socket.gaierror):
        return f"{host_option} {host}: no such host or address ({error.strerror})"
    if error.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the port is in use (choose another {port_option})"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {host_option} {host} is not an address of this machine"
    if error.errno == errno.EACCES:
        return (
            f"cannot listen on {where}: permission denied ({port_option} below 1024 needs "
            "privileges)"
        )
    return f"cannot listen on {where} ({host_option}, {port_option}): {error.strerror or error}"


def config_from_args(args: argparse.Namespace) -> Config:
    """The server settings named on the command line."""
    tunables = {name: getattr(args, name) for name in _TUNABLES if getattr(args, name) is not None}
    return Config(
        host=args.host,
        port=args.port,
        reuse_port=args.reuse_port,
        advertise_ip=args.advertise_ip,
        student_id=args.student_id,
        web_port=args.web_port,
        web_host=args.web_host,
        web_origins=tuple(o.strip() for o in args.web_origins.split(",") if o.strip()),
        web_tls=args.web_tls,
        tls_port=args.tls_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        kill_allow=args.kill_allow,
        limit_exempt=args.limit_exempt,
        request_rate=args.request_rate,
        request_burst=args.request_burst,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        **tunables,
    )


def redis_settings_from_args(args: argparse.Namespace) -> RedisSettings | None:
    """The Redis settings named on the command line, or None for a single process."""
    if args.redis is None:
        return None
    try:
        from trio_chat.redis import RedisSettings
    except ModuleNotFoundError as exc:  # the "redis" extra is not installed
        raise StartupError(
            f"--redis needs the redis extra, which is not installed (no module {exc.name!r}); "
            f"install it with: {EXTRA_HINT}"
        ) from None
    if args.node_timeout is None:
        return RedisSettings(url=args.redis)
    interval = min(RedisSettings(url=args.redis).heartbeat_interval, args.node_timeout / 3)
    return RedisSettings(
        url=args.redis, heartbeat_ttl=args.node_timeout, heartbeat_interval=interval
    )


async def run_server(config: Config, redis: RedisSettings | None = None) -> None:
    """Serve until KILL_SERVICE, SIGINT or SIGTERM; each ends the process cleanly, a signal
    even while the server is still starting (connecting to Redis, say)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            serving: list[ChatServer] = []  # the server, once it listens

            async def stop_on_signal() -> None:
                # A signal stops this process the way KILL_SERVICE does, not the other nodes.
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if serving:
                        serving[0].shutdown(name, everywhere=False)
                    else:
                        log.info("shutting down: %s while starting", name)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            if redis is None:
                await _serve(ChatServer(config), serving)
            else:
                from trio_chat.broker import registry_for
                from trio_chat.redis import RedisBroker

                async with RedisBroker.connect(redis, registry_for(config)) as broker:
                    await _serve(ChatServer(config, broker), serving)
            nursery.cancel_scope.cancel()


async def _serve(server: ChatServer, serving: list[ChatServer]) -> None:
    """Run `server` until it stops; a failure to listen becomes a `StartupError`."""
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(server.serve)
        except (OSError, BaseExceptionGroup) as exc:
            error = only(exc, OSError)
            if error is None:
                raise
            log.debug("the server could not listen", exc_info=error)
            raise StartupError(describe_listen_error(server.config, error)) from None
        serving.append(server)
