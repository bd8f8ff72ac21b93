"""Metrics: what the collector reports from a server's counters and state, and the HTTP
endpoint that serves it (over a real socket on 127.0.0.1)."""

from __future__ import annotations

import functools
import socket
from collections.abc import Mapping
from pathlib import Path

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.chatclient import (
    RECEIVE_TIMEOUT,
    Client,
    chat_broadcast,
    chat_request,
    free_port,
    helo_reply,
    join_request,
)
from tests.conftest import TLSFiles, connect_from, connect_tls, running_server
from tests.redisserver import RedisProcess
from tests.test_cli import (
    assert_runtime_error,
    trio_chat_command,
    two_workers,
)
from tests.test_redis import settings as redis_settings
from trio_chat.config import KIB, Config
from trio_chat.limits import AddressSet
from trio_chat.metrics import (
    Counters,
    Histogram,
    open_metrics_listener,
    registry_for,
    serve_metrics,
)
from trio_chat.protocol import Chat
from trio_chat.redis import RedisBroker
from trio_chat.server import ChatServer


@attrs.define
class FakeServer:
    """What a server shows the collector, with values a test sets."""

    counters: Counters = attrs.field(factory=Counters)
    connections: dict[str, int] = attrs.field(factory=lambda: {"plain": 3, "tls": 1})
    rooms: int = 2
    memberships: int = 5
    queued: int = 1234
    sent: int = 0
    delivered: int = 0
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

    def sent_bytes(self) -> int:
        return self.sent

    def deliveries(self) -> int:
        return self.delivered

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
    counts.requests[Chat] += 5
    server.delivered = 50
    server.sent = 4000
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
    listener = await open_metrics_listener("127.0.0.1", 0)
    nursery.start_soon(
        functools.partial(serve_metrics, server, listener, request_timeout=5, max_clients=4)
    )
    return server, listener.socket.getsockname()[1]


async def test_metrics_over_http(endpoint: tuple[FakeServer, int]) -> None:
    """GET /metrics answers Prometheus text with the server's numbers."""
    server, port = endpoint
    server.delivered = 9
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


# -- a running server, after real traffic ------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape_http(port: int) -> Samples:
    """The samples a GET /metrics on 127.0.0.1:`port` gives."""
    status, _, body = await http(port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    return samples(body.decode())


def value(got: Samples, name: str, **labels: str) -> float:
    """One sample's value; absent is a failure, not zero."""
    return got[(name, tuple(sorted(labels.items())))]


async def test_every_metric_after_real_traffic(tls_files: TLSFiles) -> None:
    """Plain and TLS clients chat, fail, flood, try to stop the service, pass a limit and
    stop reading; /metrics shows each of those, and /healthz says ok."""
    config = Config(
        host="127.0.0.1",
        port=0,
        tls_port=0,
        tls_cert=tls_files.cert,
        tls_key=tls_files.key,
        metrics_port=0,
        student_id="m",
        kill_allow=AddressSet.parse("127.0.0.1/32"),
        max_connections_per_ip=1,
        limit_exempt=AddressSet.parse("192.0.2.0/24"),
        request_rate=1000.0,
        request_burst=5,
        max_outbound=64 * KIB,
    )
    async with running_server(config) as server:
        plain, tls, metrics = (server.ports[door] for door in ("plain", "tls", "metrics"))
        alice = await connect_from(plain, "127.0.0.1")
        bob = await connect_tls(tls, tls_files, local_address="127.0.0.2")
        await alice.send(join_request("lobby", "alice"))
        await alice.receive_until(b"alice has joined this chatroom.\n\n")
        await bob.send(join_request("lobby", "bob"))
        for client in (alice, bob):
            await client.receive_until(b"bob has joined this chatroom.\n\n")
        got = await scrape_http(metrics)
        assert value(got, "trio_chat_connections", listener="plain") == 1
        assert value(got, "trio_chat_connections", listener="tls") == 1
        assert value(got, "trio_chat_rooms") == 1
        assert value(got, "trio_chat_memberships") == 2
        assert value(got, "trio_chat_requests_total", type="JOIN_CHATROOM") == 2

        # Deliveries are counted per event, bytes per write: one CHAT in a room of two.
        before = got
        await alice.send(chat_request(0, 0, "alice", "hello"))
        message = chat_broadcast(0, "alice", "hello").encode()
        for client in (alice, bob):
            assert await client.receive_exactly(len(message)) == message
            await client.barrier()  # its writer has finished (and counted) the send
        got = await scrape_http(metrics)
        deliveries = "trio_chat_deliveries_total"
        assert value(got, deliveries) - value(before, deliveries) == 2
        helos = [helo_reply("barrier", "127.0.0.1", port, "m") for port in (plain, tls)]
        sent = value(got, "trio_chat_sent_bytes_total") - value(
            before, "trio_chat_sent_bytes_total"
        )
        assert sent == 2 * len(message) + sum(len(helo) for helo in helos)

        # An error, a refused KILL_SERVICE, a refused connection, a failed handshake, a flood.
        await alice.send(chat_request(99, 0, "alice", "nowhere"))
        await alice.expect_error(2)
        await bob.send("KILL_SERVICE\n")
        await bob.barrier()
        async with await connect_from(plain, "127.0.0.1") as second:
            await second.expect_error(5)
        async with await Client.connect(tls) as clear:
            await clear.send("HELO in clear text\n")
            await clear.expect_eof()
        await alice.send("".join(f"HELO {i}\n" for i in range(20)))
        for _ in range(20):
            await alice.receive_until(b"StudentID:m\n")

        # A member that stops reading: bytes pile up for it, then it is cut off.
        slow = trio.socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await slow.bind(("127.0.0.3", 0))
        await slow.connect(("127.0.0.1", plain))
        async with Client(trio.SocketStream(slow)) as stalled:
            await stalled.send(join_request("lobby", "slow"))
            queued: list[float] = []
            big = "x" * (8 * KIB)
            for _ in range(200):
                await alice.send(chat_request(0, 0, "alice", big))
                await alice.receive_until(b"\n\n")
                await bob.receive_until(b"\n\n")
                got = await scrape_http(metrics)
                queued.append(value(got, "trio_chat_outbound_queued_bytes"))
                if value(got, "trio_chat_slow_consumer_disconnects_total"):
                    break
            assert max(queued) > 0
            assert value(got, "trio_chat_slow_consumer_disconnects_total") == 1

        assert value(got, "trio_chat_errors_total", code="2") == 1
        assert value(got, "trio_chat_errors_total", code="5") == 1
        assert value(got, "trio_chat_kill_service_refused_total") == 1
        assert value(got, "trio_chat_requests_total", type="KILL_SERVICE") == 1
        assert value(got, "trio_chat_requests_total", type="HELO") >= 20
        assert value(got, "trio_chat_requests_total", type="CHAT") >= 3
        assert value(got, "trio_chat_connections_refused_total", limit="per_address") == 1
        assert value(got, "trio_chat_tls_handshake_failures_total") == 1
        assert value(got, "trio_chat_request_throttle_seconds_total") > 0
        assert value(got, "trio_chat_connections_accepted_total", listener="plain") == 2
        assert value(got, "trio_chat_connections_accepted_total", listener="tls") == 1
        assert value(got, "process_open_fds") > 0
        assert await http(metrics, b"GET /healthz HTTP/1.1\r\n\r\n") == (
            "HTTP/1.1 200 OK",
            {
                "content-type": "text/plain; charset=utf-8",
                "content-length": "3",
                "connection": "close",
            },
            b"ok\n",
        )
        for client in (alice, bob):
            await client.aclose()


def test_metrics_port_in_use_names_the_metrics_port(busy_port: int) -> None:
    """When the metrics port is taken, the one-line error names --metrics-port."""
    result = trio_chat_command(
        "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(busy_port)
    )
    assert_runtime_error(result, f"port {busy_port}", "in use", "--metrics-port")


async def test_each_worker_serves_metrics_on_a_port_of_its_own(tmp_path: Path) -> None:
    """serve --workers 2 --metrics-port P: worker 1 answers on P, worker 2 on P + 1."""
    metrics = consecutive_free_ports()
    async with two_workers(tmp_path, "--metrics-port", str(metrics)) as workers:
        await workers.wait_for(b"metrics on http://")
        for worker_metrics in (metrics, metrics + 1):
            got = await scrape_http(worker_metrics)
            assert value(got, "trio_chat_redis_available") == 1
        await workers.kill_service()
    text = workers.log.decode()
    for number, worker_metrics in ((1, metrics), (2, metrics + 1)):
        assert f" worker {number} INFO metrics on http://127.0.0.1:{worker_metrics}/" in text


def consecutive_free_ports() -> int:
    """A port P such that P and P + 1 are both free on 127.0.0.1 right now."""
    while True:
        first = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", first + 1))
            except OSError:
                continue
        return first


# -- with Redis ------------------------------------------------------------------------------


async def test_redis_metrics_and_health(tmp_path: Path) -> None:
    """With --redis, /metrics shows Redis as available and the bus round trip of the events
    this node published; while Redis is away, the gauge is 0 and /healthz says 503."""
    redis = RedisProcess(tmp_path)
    redis.start()
    try:
        async with RedisBroker.connect(redis_settings(redis)) as broker:
            server = ChatServer(
                Config(host="127.0.0.1", port=0, metrics_port=0, student_id="r"), broker
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                metrics = server.ports["metrics"]
                async with await Client.connect(server.ports["plain"]) as alice:
                    await alice.send(join_request("lobby", "alice"))
                    await alice.receive_until(b"alice has joined this chatroom.\n\n")
                    for i in range(3):
                        await alice.send(chat_request(0, 0, "alice", f"m{i}"))
                        await alice.receive_until(f"MESSAGE: m{i}\n\n".encode())
                    got = await scrape_http(metrics)
                    assert value(got, "trio_chat_redis_available") == 1
                    count = value(got, "trio_chat_bus_round_trip_seconds_count")
                    assert count == 4  # the JOIN and three CHATs came back through Redis
                    assert value(got, "trio_chat_bus_round_trip_seconds_sum") > 0
                    assert value(got, "trio_chat_bus_round_trip_seconds_bucket", le="+Inf") == 4
                    redis.stop()
                    with trio.fail_after(RECEIVE_TIMEOUT):
                        await broker.wait_available(False)
                    got = await scrape_http(metrics)
                    assert value(got, "trio_chat_redis_available") == 0
                    status, _, body = await http(metrics, b"GET /healthz HTTP/1.1\r\n\r\n")
                    assert status == "HTTP/1.1 503 Service Unavailable"
                    assert b"Redis" in body
                    redis.start()  # and back: leaving a node with Redis down is another test
                    with trio.fail_after(RECEIVE_TIMEOUT):
                        await broker.wait_available(True)
                    got = await scrape_http(metrics)
                    assert value(got, "trio_chat_redis_available") == 1
                server.shutdown("test over")
    finally:
        redis.stop()
