"""How a node uses Redis: where it is, and every timeout and limit of the Redis broker."""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs

URL_FORM = "redis://HOST:PORT[/DB]"


def _check_url(instance: object, attribute: object, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"--redis must be a URL of the form {URL_FORM}, not {url!r}")
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        raise ValueError(f"--redis has a bad port: {url!r} (expected {URL_FORM})") from None


@attrs.frozen(kw_only=True)
class RedisSettings:
    """How a node uses Redis. Timeouts are in seconds."""

    url: str = attrs.field(validator=_check_url)
    """Where Redis is: ``redis://HOST:PORT/DB``, a single server or any node of a cluster."""
    prefix: str = "trio-chat"
    """Namespace of every key and channel, so several services can share one Redis."""
    command_timeout: float = 2.0
    """Longest wait for one Redis reply before Redis counts as down: long enough for a
    loaded Redis on a busy machine, short enough that a JOIN gets error 6 promptly."""
    connect_timeout: float = 1.0
    """Longest wait for a TCP connection to Redis, so that an unreachable Redis at start-up
    is reported within a second or two."""
    heartbeat_interval: float = 1.0
    """How often a node renews its heartbeat, looks for dead nodes and checks that its
    subscriber connections still answer (a stalled Redis is noticed within this plus
    `command_timeout`)."""
    heartbeat_ttl: float = 5.0
    """Expiry of the heartbeat key: a node silent this long is dead and its members are
    announced as left. Several intervals, so one slow heartbeat never buries a live node."""
    retry_initial: float = 0.1
    """First pause before reconnecting to an unreachable Redis; doubled after each failure."""
    retry_max: float = 2.0
    """Longest pause between reconnection attempts: service resumes at most this long after
    Redis comes back."""
    max_backlog: int = 10_000
    """Events queued for the bus at most; past it (Redis stalled), requests get error 6."""
    log_length: int = 1_000
    """Messages kept in each room's log for subscribers that lost their subscription or saw
    a gap; a node that fell further behind than this skips what was trimmed (logged)."""

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) of the URL."""
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 6379
