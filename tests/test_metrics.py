"""Metrics: what the collector reports from a server's counters and state, and the HTTP
endpoint that serves it (over a real socket on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_chat.metrics import Counters, Histogram, registry_for, serve_metrics


@attrs.define
class FakeServer:
    """What a server shows the collector, with values a test sets."""

    counters: Counters = attrs.field(factory=Counters)
    connections: dict[str, int] = attrs.field(factory=lambda: {"plain": 3, "tls": 1})
    rooms: int = 2
    memberships: int = 5
    queued: int = 1234
    available: bool | None = None
    problem: str | None = None

    def open_connections(self) -> Mapping[str, int]:
        return self.connections

    def room_count(self) -> int:
        return self.rooms

    def membership_count(self) -> int:
        return self.memberships

    def queued_bytes(self) -> int:
        return self.queued

    def bus_available(self) -> bool | None:
        return self.available

    def health(self) -> str | None:
        return self.problem


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(server: FakeServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples a scrape of `server` gives, through the exposition format."""
    from prometheus_client import generate_latest

    return samples(generate_latest(registry_for(server)).decode())


def test_collector_reads_state_at_scrape_time() -> None:
    """Gauges show the server's state when scraped, not when it changed."""
    server = FakeServer()
    first = scrape(server)
    assert first[("trio_chat_connections", (("listener", "plain"),))] == 3
    assert first[("trio_chat_connections", (("listener", "tls"),))] == 1
    assert first[("trio_chat_rooms", ())] == 2
    assert first[("trio_chat_memberships", ())] == 5
    assert first[("trio_chat_outbound_queued_bytes", ())] == 1234
    server.rooms = 7
    server.connections = {"plain": 0, "tls": 0}
    second = scrape(server)
    assert second[("trio_chat_rooms", ())] == 7
    assert second[("trio_chat_connections", (("listener", "plain"),))] == 0


def test_counters_are_exposed_with_prometheus_names() -> None:
    """Every counter ends in _total and carries its label; base units (bytes, seconds)."""
    server = FakeServer()
    counts = server.counters
    counts.requests["CHAT"] += 5
    counts.deliveries += 50
    counts.bytes_sent += 4000
    counts.error(5)
    counts.error(5)
    counts.slow_consumers += 1
    counts.connections["tls"] = 2
    counts.refuse("per_address")
    counts.kill_refused += 1
    counts.tls_failures += 3
    counts.throttled_seconds += 1.5
    got = scrape(server)
    assert got[("trio_chat_requests_total", (("type", "CHAT"),))] == 5
    assert got[("trio_chat_requests_total", (("type", "HELO"),))] == 0
    assert got[("trio_chat_deliveries_total", ())] == 50
    assert got[("trio_chat_sent_bytes_total", ())] == 4000
    assert got[("trio_chat_errors_total", (("code", "5"),))] == 2
    assert got[("trio_chat_slow_consumer_disconnects_total", ())] == 1
    assert got[("trio_chat_connections_accepted_total", (("listener", "tls"),))] == 2
    assert got[("trio_chat_connections_refused_total", (("limit", "per_address"),))] == 1
    assert got[("trio_chat_kill_service_refused_total", ())] == 1
    assert got[("trio_chat_tls_handshake_failures_total", ())] == 3
    assert got[("trio_chat_request_throttle_seconds_total", ())] == 1.5
    assert ("process_cpu_seconds_total", ()) in got


def test_redis_metrics_only_with_a_bus() -> None:
    """Without Redis there is no availability gauge; with it, a gauge and a histogram."""
    server = FakeServer()
    assert not any(name.startswith("trio_chat_redis") for name, _ in scrape(server))
    server.available = False
    server.counters.bus_round_trip.observe(0.003)
    server.counters.bus_round_trip.observe(0.2)
    got = scrape(server)
    assert got[("trio_chat_redis_available", ())] == 0
    bucket = "trio_chat_bus_round_trip_seconds_bucket"
    assert got[(bucket, (("le", "0.0025"),))] == 0
    assert got[(bucket, (("le", "0.005"),))] == 1
    assert got[(bucket, (("le", "+Inf"),))] == 2
    assert got[("trio_chat_bus_round_trip_seconds_count", ())] == 2
    assert got[("trio_chat_bus_round_trip_seconds_sum", ())] == pytest.approx(0.203)


def test_histogram_puts_a_value_on_a_bound_in_that_bucket() -> None:
    """Prometheus buckets are `le`: a value equal to a bound counts in that bound's bucket."""
    histogram = Histogram((1.0, 2.0))
    for value in (1.0, 1.5, 2.0, 3.0):
        histogram.observe(value)
    assert histogram.buckets() == [("1.0", 1.0), ("2.0", 3.0), ("+Inf", 4.0)]


# -- the HTTP endpoint -----------------------------------------------------------------------


async def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send a raw HTTP request; the status line, headers (lower-case names) and body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        response = b""
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                response += data
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    assert int(headers["content-length"]) == len(body) or request.startswith(b"HEAD")
    return status, headers, body


@pytest.fixture
async def endpoint(nursery: trio.Nursery) -> tuple[FakeServer, int]:
    """A FakeServer's metrics served on 127.0.0.1 and a free port."""
    server = FakeServer()
    listener = await nursery.start(
        lambda task_status: serve_metrics(
            server, "127.0.0.1", 0, request_timeout=5, max_clients=4, task_status=task_status
        )
    )
    return server, listener.socket.getsockname()[1]


async def test_metrics_over_http(endpoint: tuple[FakeServer, int]) -> None:
    """GET /metrics answers Prometheus text with the server's numbers."""
    server, port = endpoint
    server.counters.deliveries = 9
    status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert samples(body.decode())[("trio_chat_deliveries_total", ())] == 9


async def test_openmetrics_when_asked(endpoint: tuple[FakeServer, int]) -> None:
    """A scraper that accepts OpenMetrics gets it, ending with # EOF."""
    _, port = endpoint
    request = b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n"
    status, headers, body = await http(port, request)
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_healthz_ok_and_unavailable(endpoint: tuple[FakeServer, int]) -> None:
    """/healthz says 200 ok while the server can serve, 503 and why when it cannot."""
    server, port = endpoint
    assert await http(port, b"GET /healthz HTTP/1.0\r\n\r\n") == (
        "HTTP/1.1 200 OK",
        {
            "content-type": "text/plain; charset=utf-8",
            "content-length": "3",
            "connection": "close",
        },
        b"ok\n",
    )
    server.problem = "Redis unavailable"
    status, _, body = await http(port, b"GET /healthz HTTP/1.1\n\n")
    assert (status, body) == ("HTTP/1.1 503 Service Unavailable", b"Redis unavailable\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
        (b"HELO x\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"HEAD /healthz HTTP/1.1\r\n\r\n", "HTTP/1.1 200 OK"),
    ],
)
async def test_other_requests(
    endpoint: tuple[FakeServer, int], request_bytes: bytes, status: str
) -> None:
    """Other paths, methods and non-HTTP text get the usual HTTP answers; HEAD no body."""
    _, port = endpoint
    got_status, _, body = await http(port, request_bytes)
    assert got_status == status
    if request_bytes.startswith(b"HEAD"):
        assert body == b""


async def test_a_silent_client_does_not_block_scrapes(endpoint: tuple[FakeServer, int]) -> None:
    """A connection that sends nothing holds one slot only; scrapes beside it are answered."""
    _, port = endpoint
    async with await trio.open_tcp_stream("127.0.0.1", port):
        status, _, _ = await http(port, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
