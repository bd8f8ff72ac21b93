"""Every setting of a trio-chat server: addresses, identity, limits and timeouts, with defaults."""

from __future__ import annotations

from pathlib import Path

from attrs import Factory, field, frozen

from trio_chat.limits import EVERY_ADDRESS, LOCAL_ADDRESSES, AddressSet
from trio_chat.protocol import DEFAULT_MAX_NAME, MESSAGE_PREFIX

KIB = 1024
MIB = 1024 * KIB


def _positive(instance: object, attribute: object, value: float) -> None:
    if value <= 0:
        name = getattr(attribute, "name", "setting")
        raise ValueError(f"{name} must be positive, not {value!r}")


def _not_negative(instance: object, attribute: object, value: int) -> None:
    if value < 0:
        name = getattr(attribute, "name", "setting")
        raise ValueError(f"{name} must be 0 or more, not {value!r}")


def _positive_or_none(instance: object, attribute: object, value: float | None) -> None:
    if value is not None:
        _positive(instance, attribute, value)


def _origins(instance: object, attribute: object, value: tuple[str, ...]) -> None:
    for origin in value:
        scheme, _, rest = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not rest or "/" in rest):
            raise ValueError(f"web origin {origin!r} is not '*' or scheme://host[:port]")


@frozen(kw_only=True)
class Config:
    """The settings of one server process; every limit of docs/protocol.md section 6 is here."""

    # -- where it listens and what it says about itself ------------------------------------
    host: str | None = None
    """Address to listen on; None listens on every address (IPv4 and IPv6)."""
    port: int = 0
    """TCP port to listen on; 0 picks a free one (reported through `serve`'s task_status)."""
    reuse_port: bool = False
    """Listen with SO_REUSEPORT, so several processes share the port and the kernel spreads
    connections among them (``--workers``). IPv4 only when no host is given."""
    advertise_ip: str | None = None
    """IP reported in HELO and JOINED; None reports the address each client connected to."""
    student_id: str = "trio-chat"
    """The StudentID line of the HELO reply."""

    # -- input limits ------------------------------------------------------------------------
    max_message: int = field(default=64 * KIB, validator=_positive)
    """Longest CHAT message text in bytes, all its lines together; longer: error 4, close."""
    max_line: int = field(
        default=Factory(lambda config: config.max_message + MESSAGE_PREFIX, takes_self=True),
        validator=_positive,
    )
    """Longest request line in bytes; a longer one gets error 4 and the connection closes.
    By default `max_message` plus the ``MESSAGE: `` before it, so that every message the
    settings allow can be sent on one line (64 KiB + 9)."""
    receive_size: int = field(default=64 * KIB, validator=_positive)
    """Most bytes taken from a socket in one receive: large enough to take a burst of
    pipelined requests in one call, small enough to bound a connection's transient memory."""

    # -- output and resource limits ------------------------------------------------------------
    max_outbound: int = field(default=1 * MIB, validator=_positive)
    """Bytes queued for one client but not yet sent. A client that stops reading while its
    rooms are busy is disconnected when its queue would exceed this: it never slows the room."""
    direct_writes: bool = True
    """Write queued output straight to a plain TCP socket from one flusher task (batched,
    no task woken per client: the fan-out fast path, see outbox.py) rather than through each
    connection's writer task. Off only to measure or to rule the fast path out."""
    max_connections: int = field(default=10_000, validator=_positive)
    """Connections served at once; further clients wait in the listen backlog until one ends."""
    max_rooms_per_connection: int = field(default=1_000, validator=_positive)
    """Rooms one connection may be in at once; one more JOIN gets error 5."""
    max_rooms: int = field(default=100_000, validator=_positive)
    """Rooms in the whole service. Rooms are never deleted (a ROOM_REF is never reused), so
    without this a client joining ever-new names would grow memory for ever; a JOIN that
    would create one more gets error 5. With `max_name`, rooms take at most about 60 MiB."""
    max_name: int = field(default=DEFAULT_MAX_NAME, validator=_positive)
    """Longest room or client name in bytes (error 1): names live as long as their room or
    membership, so they are held far below the line limit."""

    # -- timeouts (seconds) --------------------------------------------------------------------
    disconnect_grace: float = field(default=2.0, validator=_positive)
    """After DISCONNECT (or the client's end of stream), how long the server keeps flushing
    output and draining input before closing. Closing with unread input makes the peer see a
    reset and lose its last messages; two seconds covers any sane client on any network."""
    idle_timeout: float | None = field(default=None, validator=_positive_or_none)
    """Close a connection that sends nothing for this long. Off by default: graders and people
    hold quiet connections open for a long time, and a quiet client costs almost nothing."""
    accept_retry_delay: float = field(default=0.1, validator=_positive)
    """Pause before accepting again after the process ran out of file descriptors or memory,
    so a full table does not turn the accept loop into a busy spin."""

    # -- the web door: HTTP and WebSocket (docs/web.md) -------------------------------------------
    web_port: int | None = None
    """TCP port of the web door (the chat page at ``/`` and the WebSocket at ``/ws``); None
    opens no web door, 0 picks a free port."""
    web_host: str | None = None
    """Address the web door listens on; None listens where `host` says."""
    web_tls: bool = False
    """Serve the web door over TLS (``https://`` and ``wss://``) with the certificate of
    `tls_cert` and `tls_key`; browsers warn about plain HTTP pages on any other host."""
    web_origins: tuple[str, ...] = field(default=(), validator=_origins)
    """Origins (``scheme://host[:port]``) of other sites' pages that may open the WebSocket,
    besides the server's own page, which always may; ``*`` allows any page. The check keeps
    other sites from chatting through their visitors' browsers; clients that are not
    browsers send no Origin and are not checked."""
    web_request_timeout: float = field(default=10.0, validator=_positive)
    """Time a web connection has to deliver each complete HTTP request head, from connecting
    or from the previous response: a page load takes milliseconds, and a connection that
    trickles its headers (or idles between requests) must not hold a slot for ever."""
    web_max_request_head: int = field(default=16 * KIB, validator=_positive)
    """Most bytes of an HTTP request head (request line and headers) held while it is still
    incomplete (more: 431). Browsers send a few hundred bytes to this server, which sets no
    cookies."""
    web_max_message: int = field(
        default=Factory(lambda config: 4 * config.max_line, takes_self=True),
        validator=_positive,
    )
    """Longest WebSocket message from a client, in bytes (more: close code 1009). Text is fed
    to the request parser as it arrives, so this is not a buffer: it keeps one message within
    sight of the protocol's own limits. By default four request lines (256 KiB + 36): the
    largest CHAT request (a `max_message` text plus its short header lines) with room for
    requests pipelined beside it, whatever `max_message` is set to."""

    # -- TLS (docs/protocol.md section 7) ----------------------------------------------------------
    tls_port: int | None = None
    """TCP port for the same protocol over TLS, beside `port` (same host, same rooms); None:
    no TLS. 0 picks a free one."""
    tls_cert: Path | None = None
    """PEM file of the server's certificate chain (and its key, when `tls_key` is None)."""
    tls_key: Path | None = None
    """PEM file of the certificate's private key."""
    tls_handshake_timeout: float = field(default=10.0, validator=_positive)
    """Seconds a TLS client has to complete its handshake. The handshake runs in the
    connection's own task, never in the accept loop, but a client that connects and says
    nothing would otherwise hold a connection slot for ever; ten seconds is ample for a
    handshake across any network."""

    # -- operator policies (docs/protocol.md section 7) -------------------------------------------
    kill_allow: AddressSet = EVERY_ADDRESS
    """Addresses from which KILL_SERVICE stops the service; from any other, it is ignored
    like an unknown line and logged. Every address by default: the lab's grader stops the
    server this way. A client that is not on an IP network (an in-process stream) may."""
    max_connections_per_ip: int = field(default=256, validator=_not_negative)
    """Connections open at once from one address (IPv6: one /64), outside `limit_exempt`;
    the one beyond gets error 5 and is closed. 0: no limit. 256 lets a classroom behind one
    NAT address and the lab's own tests through, and keeps one host from taking every slot
    of `max_connections`."""
    limit_exempt: AddressSet = LOCAL_ADDRESSES
    """Addresses exempt from `max_connections_per_ip` and from flood control: this host by
    default, so local tools, benchmarks with thousands of clients and a TLS-terminating proxy
    on the same host are not throttled. In-process streams are exempt too."""
    request_rate: float | None = field(default=None, validator=_positive_or_none)
    """Requests per second one connection may make in the long run (flood control); a
    connection over it has its requests wait, in order, none dropped. None: no flood control
    (the lab's tests pipeline hundreds of requests at once)."""
    request_burst: float | None = field(default=None, validator=_positive_or_none)
    """Requests a connection may make at once before `request_rate` paces it; None: one
    second's worth (`request_rate`, at least 1)."""

    # -- metrics ------------------------------------------------------------------------------
    metrics_port: int | None = None
    """TCP port of the HTTP endpoint serving /metrics (Prometheus) and /healthz; None: none.
    0 picks a free one."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics endpoint: this host only by default, since what it tells
    (clients, rooms, load) is for the operator and not for the public."""
    metrics_request_timeout: float = field(default=5.0, validator=_positive)
    """Seconds a metrics client has to send its request and to take the answer; a scraper
    needs milliseconds, and a silent connection must not hold a slot for long."""
    metrics_max_clients: int = field(default=8, validator=_positive)
    """Metrics requests answered at once; more wait in the backlog. One Prometheus server
    scrapes with one connection at a time."""

    def __attrs_post_init__(self) -> None:
        if self.tls_port is not None and self.tls_cert is None:
            raise ValueError("a TLS port needs a certificate (--tls-cert)")
        uses_tls = self.tls_port is not None or self.web_tls
        if not uses_tls and (self.tls_cert is not None or self.tls_key is not None):
            raise ValueError("a TLS certificate or key needs --tls-port or --web-tls")
        if self.web_tls and (self.web_port is None or self.tls_cert is None):
            raise ValueError("--web-tls needs --web-port and a certificate (--tls-cert)")
        if self.request_burst is not None and self.request_rate is None:
            raise ValueError("a request burst needs a request rate (--request-rate)")
        if self.request_burst is not None and self.request_burst < 1:
            raise ValueError(f"request_burst must be at least 1, not {self.request_burst!r}")

    @property
    def burst(self) -> float:
        """The request burst in force (see `request_burst`); meaningless without a rate."""
        if self.request_burst is not None:
            return self.request_burst
        return max(1.0, self.request_rate or 1.0)
