"""Every setting of a trio-chat server: addresses, identity, limits and timeouts, with defaults."""

from __future__ import annotations

from attrs import Factory, field, frozen

from trio_chat.protocol import DEFAULT_MAX_NAME, MESSAGE_PREFIX

KIB = 1024
MIB = 1024 * KIB


def _positive(instance: object, attribute: object, value: float) -> None:
    if value <= 0:
        name = getattr(attribute, "name", "setting")
        raise ValueError(f"{name} must be positive, not {value!r}")


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
    """The settings of one server process; every limit of PROTOCOL.md section 6 is here."""

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
    web_max_message: int = field(default=256 * KIB, validator=_positive)
    """Longest WebSocket message from a client, in bytes (more: close code 1009). Text is fed
    to the request parser as it arrives, so this is not a buffer: it keeps one message within
    sight of the protocol's own limits while leaving room for the largest CHAT request (a
    `max_message` text plus its header lines) and a few small requests pipelined with it."""
