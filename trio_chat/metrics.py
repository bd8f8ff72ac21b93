"""Numbers for an operator: what the server counts, and the HTTP endpoint that shows them.

The server counts into a `Counters` of plain numbers, an attribute add per request or per
connection. What fan-out does is counted where it is batched already: deliveries once per
room event (`Registry.deliveries`), bytes once per write (`Outbox.sent`), never per message
and member, so fan-out costs the same with or without metrics. Everything that is a state
rather than an event (open connections, rooms, memberships, bytes queued, Redis
availability) is not tracked at all: `ServerCollector` reads it from the server when
Prometheus scrapes.

`serve_metrics` answers ``GET /metrics`` (Prometheus text, or OpenMetrics if asked) and
``GET /healthz`` from the server's own trio run. A thread would have to read the server's
rooms and connection sets while the trio thread changes them; in the run, a scrape sees one
consistent state with no lock anywhere on the hot path, and it stops with the server.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import trio
from attrs import define, field
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from trio_chat.protocol import (
    Chat,
    Disconnect,
    Helo,
    Join,
    KillService,
    Leave,
    ProtocolError,
    Unknown,
)

log = logging.getLogger("trio_chat")

PREFIX = "trio_chat_"

# Request types as counted, in the protocol's own words (docs/protocol.md section 1); "unknown"
# is a line that names no request, "malformed" a request the parser refused (error 1 or 4).
# The reader counts by class (one dict lookup per request); names are given at scrape time.
REQUEST_NAMES: dict[type, str] = {
    Helo: "HELO",
    Join: "JOIN_CHATROOM",
    Leave: "LEAVE_CHATROOM",
    Chat: "CHAT",
    Disconnect: "DISCONNECT",
    KillService: "KILL_SERVICE",
    Unknown: "unknown",
    ProtocolError: "malformed",
}

# Bus round trips are milliseconds on one host and tens of them across a data centre.
ROUND_TRIP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@define
class Histogram:
    """Observations counted into cumulative buckets, as Prometheus histograms are."""

    bounds: Sequence[float] = ROUND_TRIP_BUCKETS
    counts: list[int] = field(init=False)
    sum: float = field(default=0.0, init=False)

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        """Count one observation of `value`."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by upper bound, +Inf last, as `HistogramMetricFamily` takes them."""
        result = []
        total = 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            total += count
            result.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return result


@define
class Counters:
    """Everything the server counts as it happens; read by `ServerCollector` at scrape time."""

    requests: dict[type, int] = field(factory=lambda: dict.fromkeys(REQUEST_NAMES, 0))
    """Requests read, by class (see `REQUEST_NAMES`)."""
    errors: dict[int, int] = field(factory=dict)
    """ERROR_CODE replies sent, by code."""
    slow_consumers: int = 0
    """Connections cut off because their outbound queue was full."""
    connections: dict[str, int] = field(factory=dict)
    """Connections accepted, by listener (plain, tls, ...)."""
    refused: dict[str, int] = field(factory=dict)
    """Connections refused by a limit, by the limit's name."""
    kill_refused: int = 0
    """KILL_SERVICE requests from addresses outside ``--kill-allow``."""
    tls_failures: int = 0
    """TLS handshakes that failed or timed out."""
    throttled_seconds: float = 0.0
    """Time readers waited for request tokens (flood control), all connections together."""
    bus_round_trip: Histogram = field(factory=Histogram)
    """Seconds from publishing a batch of events on the shared bus to receiving it back."""

    def refuse(self, limit: str) -> None:
        """Count one connection refused by `limit`."""
        self.refused[limit] = self.refused.get(limit, 0) + 1

    def error(self, code: int) -> None:
        """Count one ERROR_CODE reply."""
        self.errors[code] = self.errors.get(code, 0) + 1


class Observed(Protocol):
    """What `ServerCollector` reads from a server at scrape time."""

    counters: Counters

    def open_connections(self) -> Mapping[str, int]:
        """Connections open now, by listener."""
        ...

    def room_count(self) -> int:
        """Rooms that exist (rooms are never deleted)."""
        ...

    def membership_count(self) -> int:
        """Memberships of this process's connections, over all rooms."""
        ...

    def queued_bytes(self) -> int:
        """Bytes queued for clients and not yet sent, over all connections."""
        ...

    def sent_bytes(self) -> int:
        """Bytes written to clients so far."""
        ...

    def deliveries(self) -> int:
        """Messages handed to room members so far (per broadcast and member, and each JOINED)."""
        ...

    def bus_available(self) -> bool | None:
        """Whether the shared bus (Redis) is reachable; None without one."""
        ...

    def health(self) -> str | None:
        """Why this process cannot serve requests right now, or None when it can."""
        ...


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _labelled(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: Mapping[str, float] | Mapping[int, int],
) -> Metric:
    family = kind(PREFIX + name, doc, labels=[label])
    for key, value in sorted(values.items(), key=lambda item: str(item[0])):
        family.add_metric([str(key)], value)
    return family


@define(eq=False)
class ServerCollector:
    """A Prometheus collector of a server's counters and current state."""

    server: Observed

    def describe(self) -> Iterable[Metric]:
        """Nothing: the registry need not know the names before the first scrape."""
        return ()

    def collect(self) -> Iterator[Metric]:
        """Every metric, read from the server now."""
        server = self.server
        counts = server.counters
        yield _labelled(
            GaugeMetricFamily,
            "connections",
            "Client connections open now, by listener.",
            "listener",
            server.open_connections(),
        )
        yield _labelled(
            CounterMetricFamily,
            "connections_accepted_total",
            "Client connections accepted, by listener.",
            "listener",
            counts.connections,
        )
        yield _labelled(
            CounterMetricFamily,
            "connections_refused_total",
            "Connections refused by a limit, by limit.",
            "limit",
            counts.refused,
        )
        yield GaugeMetricFamily(PREFIX + "rooms", "Rooms in the service.", server.room_count())
        yield GaugeMetricFamily(
            PREFIX + "memberships",
            "Room memberships of this process's connections.",
            server.membership_count(),
        )
        yield _labelled(
            CounterMetricFamily,
            "requests_total",
            "Requests handled, by type.",
            "type",
            {REQUEST_NAMES[kind]: count for kind, count in counts.requests.items()},
        )
        yield _counter(
            "deliveries_total",
            "Messages queued for room members (one per broadcast and member, one per JOINED).",
            server.deliveries(),
        )
        yield _counter(
            "sent_bytes_total",
            "Bytes written to clients (replies and broadcasts).",
            server.sent_bytes(),
        )
        yield GaugeMetricFamily(
            PREFIX + "outbound_queued_bytes",
            "Bytes queued for clients and not yet sent.",
            server.queued_bytes(),
        )
        yield _labelled(
            CounterMetricFamily,
            "errors_total",
            "ERROR_CODE replies sent, by code.",
            "code",
            counts.errors,
        )
        yield _counter(
            "slow_consumer_disconnects_total",
            "Clients cut off because they did not read what their rooms sent.",
            counts.slow_consumers,
        )
        yield _counter(
            "kill_service_refused_total",
            "KILL_SERVICE requests ignored: from an address outside --kill-allow.",
            counts.kill_refused,
        )
        yield _counter(
            "tls_handshake_failures_total",
            "TLS connections closed because their handshake failed or timed out.",
            counts.tls_failures,
        )
        yield _counter(
            "request_throttle_seconds_total",
            "Seconds readers waited for flood control before handling requests.",
            counts.throttled_seconds,
        )
        available = server.bus_available()
        if available is not None:
            yield GaugeMetricFamily(
                PREFIX + "redis_available",
                "1 when Redis, the bus shared by the nodes, is reachable, else 0.",
                1.0 if available else 0.0,
            )
            histogram = counts.bus_round_trip
            yield HistogramMetricFamily(
                PREFIX + "bus_round_trip_seconds",
                "Seconds from publishing events on the bus to receiving them back.",
                buckets=histogram.buckets(),
                sum_value=histogram.sum,
            )


def registry_for(server: Observed) -> CollectorRegistry:
    """A registry of `server`'s metrics and this process's CPU, memory and descriptors."""
    registry = CollectorRegistry()
    registry.register(ServerCollector(server))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


# -- the HTTP endpoint ---------------------------------------------------------------------

# The most bytes of a request head read; a scraper sends a few hundred.
MAX_HEAD = 8192


@define(frozen=True)
class _Response:
    status: str
    content_type: str
    body: bytes
    extra: tuple[tuple[str, str], ...] = ()


def _text(status: str, body: str, *extra: tuple[str, str]) -> _Response:
    return _Response(status, "text/plain; charset=utf-8", body.encode(), extra)


def respond(registry: CollectorRegistry, server: Observed, head: bytes) -> tuple[_Response, bool]:
    """The response to the request whose head is `head`, and whether to send its body."""
    lines = head.decode("latin-1").split("\r\n" if b"\r\n" in head else "\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _text("400 Bad Request", "bad request\n"), True
    method, target, _ = parts
    path = target.split("?", 1)[0]
    if path not in ("/metrics", "/healthz"):
        return _text("404 Not Found", "not found: try /metrics or /healthz\n"), True
    if method not in ("GET", "HEAD"):
        return _text("405 Method Not Allowed", "only GET\n", ("Allow", "GET, HEAD")), True
    if path == "/healthz":
        problem = server.health()
        if problem is None:
            return _text("200 OK", "ok\n"), method == "GET"
        return _text("503 Service Unavailable", problem + "\n"), method == "GET"
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encode, content_type = choose_encoder(accept)
    return _Response("200 OK", content_type, encode(registry)), method == "GET"


async def _answer(
    registry: CollectorRegistry,
    server: Observed,
    request_timeout: float,
    stream: trio.SocketStream,
) -> None:
    async with stream:
        head = bytearray()
        with trio.move_on_after(request_timeout):
            while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) <= MAX_HEAD:
                data = await stream.receive_some(MAX_HEAD)
                if not data:
                    break
                head += data
        if b"\n\n" not in head and b"\r\n\r\n" not in head:
            return  # timed out, too large or closed half-way: not worth an answer
        response, with_body = respond(registry, server, bytes(head))
        headers = [
            f"HTTP/1.1 {response.status}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: close",
            *(f"{name}: {value}" for name, value in response.extra),
        ]
        payload = ("\r\n".join(headers) + "\r\n\r\n").encode()
        if with_body:
            payload += response.body
        with trio.move_on_after(request_timeout):
            await stream.send_all(payload)
            await stream.send_eof()


async def open_metrics_listener(host: str, port: int) -> trio.SocketListener:
    """The listening socket of the metrics endpoint on `host`:`port`."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    for extra in listeners[1:]:  # one address family is enough for a scraper
        await extra.aclose()
    return listeners[0]


async def serve_metrics(
    server: Observed,
    listener: trio.SocketListener,
    *,
    request_timeout: float,
    max_clients: int,
) -> None:
    """Serve /metrics and /healthz on `listener` until cancelled; then close it.

    At most `max_clients` requests are answered at once (others wait in the backlog) and each
    gets `request_timeout` seconds to send its head and to take the answer.
    """
    registry = registry_for(server)
    slots = trio.Semaphore(max_clients)
    answer = functools.partial(_answer, registry, server, request_timeout)
    async with listener, trio.open_nursery() as nursery:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of descriptors: the chat server matters more
                slots.release()
                log.warning("metrics: accept failed (%s)", exc.strerror)
                await trio.sleep(request_timeout)
                continue
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(_release_after, answer, stream, slots)


async def _release_after(
    answer: Callable[[trio.SocketStream], Awaitable[None]],
    stream: trio.SocketStream,
    slots: trio.Semaphore,
) -> None:
    try:
        await answer(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the scraper went away
    finally:
        slots.release()
