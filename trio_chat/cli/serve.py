"""``trio-chat serve``: its options, the settings they make, and running the server until it
stops, with every failure to start reported in one line that names the option concerned."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import attrs
import trio

from trio_chat import tls
from trio_chat.cli.options import networks, not_negative, port_number, positive
from trio_chat.config import Config
from trio_chat.server import ChatServer, ListenError
from trio_chat.web import WebListenError

if TYPE_CHECKING:
    from trio_chat.redis import RedisSettings

    # The subparsers object each command adds its parser to (argparse keeps the name private).
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

log = logging.getLogger("trio_chat")

E = TypeVar("E", bound=BaseException)

EXTRA_HINT = "pip install 'trio-chat[redis]'"
"""How to install what ``--redis`` needs; named when it is missing."""


class StartupError(Exception):
    """The server could not start, for a reason the message names (exit status 1)."""


def add_parser(commands: Commands) -> None:
    """Add the ``serve`` command to the ``trio-chat`` command line."""
    parser = commands.add_parser(
        "serve",
        usage="%(prog)s --port PORT [options]",
        help="run the chat server in the foreground",
        description="Run the chat server in the foreground until KILL_SERVICE, SIGINT or "
        "SIGTERM; logs go to stderr. The protocol is described in docs/protocol.md.",
    )
    parser.set_defaults(run=run)
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
        help="serve /metrics (Prometheus) and /healthz over HTTP on this port; with --workers, "
        "worker N on PORT + N - 1 (default: off)",
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


def run(args: argparse.Namespace) -> int:
    """Run ``trio-chat serve``; returns the exit status (0 after a clean shutdown)."""
    config = config_from_args(args)
    if args.worker_index is not None and config.metrics_port:
        # Each worker is scraped on a port of its own: worker N on --metrics-port + N - 1.
        config = attrs.evolve(config, metrics_port=config.metrics_port + args.worker_index - 1)
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
        if config.metrics_port and config.metrics_port + args.workers - 1 > 65535:
            raise ValueError(
                f"--metrics-port: worker N serves metrics on --metrics-port + N - 1, and "
                f"{config.metrics_port} + {args.workers - 1} is past 65535"
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
