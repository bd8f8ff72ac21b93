"""Operator policies: address lists, per-address counts and token buckets as units, then
--kill-allow, --max-connections-per-ip, --limit-exempt and flood control in a running server."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.chatclient import (
    Client,
    chat_broadcast,
    chat_request,
    disconnect_request,
    helo_reply,
    join_request,
    joined_announcement,
    joined_reply,
)
from tests.conftest import connect_from, open_memory_connection, running_server
from tests.redisserver import RedisProcess
from tests.test_cli import assert_usage_error, trio_chat_command
from tests.test_redis import settings as redis_settings
from trio_chat.cli import build_parser
from trio_chat.cli.serve import config_from_args
from trio_chat.config import Config
from trio_chat.limits import (
    EVERY_ADDRESS,
    LOCAL_ADDRESSES,
    AddressCounter,
    AddressSet,
    TokenBucket,
    address_key,
)
from trio_chat.redis import RedisBroker
from trio_chat.server import ChatServer

# -- AddressSet ---------------------------------------------------------------------------


def test_parse_takes_networks_and_bare_addresses() -> None:
    """A list mixes IPv4 and IPv6 networks and single addresses, with spaces around items."""
    allowed = AddressSet.parse("10.0.0.0/8, 192.0.2.7 ,2001:db8::/32")
    assert "10.200.1.1" in allowed
    assert "192.0.2.7" in allowed
    assert "192.0.2.8" not in allowed
    assert "2001:db8::5" in allowed
    assert "2001:db9::5" not in allowed
    assert str(allowed) == "10.0.0.0/8,192.0.2.7/32,2001:db8::/32"


def test_ipv4_mapped_addresses_match_ipv4_networks() -> None:
    """A dual-stack socket reports ::ffff:127.0.0.2; it is 127.0.0.2 for every list."""
    assert "::ffff:127.0.0.2" in LOCAL_ADDRESSES
    assert "::ffff:192.0.2.1" not in LOCAL_ADDRESSES
    assert "::1" in LOCAL_ADDRESSES


def test_zone_ids_are_ignored() -> None:
    """A link-local address with a zone (fe80::1%eth0) is matched by its address."""
    assert "fe80::1%eth0" in AddressSet.parse("fe80::/10")


def test_none_is_the_empty_set() -> None:
    """'none' names no address at all: nothing is in it, everything is outside it."""
    nobody = AddressSet.parse("none")
    assert "127.0.0.1" not in nobody
    assert str(nobody) == "none"


def test_every_address_is_in_the_default_kill_allow() -> None:
    """The default of --kill-allow admits IPv4 and IPv6 alike."""
    assert "203.0.113.9" in EVERY_ADDRESS
    assert "2001:db8::1" in EVERY_ADDRESS


def test_things_that_are_not_addresses_are_in_no_set() -> None:
    """A peer that is not an IP address (an in-memory test stream) matches nothing."""
    assert "memory" not in EVERY_ADDRESS
    assert 7 not in EVERY_ADDRESS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10.0.0.0/33", "'10.0.0.0/33' is not an IP address or network"),
        ("localhost", "'localhost' is not an IP address or network"),
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8?"),
        ("10.0.0.0/8,,::1", "empty entry in '10.0.0.0/8,,::1'"),
        ("", "empty entry in ''"),
    ],
)
def test_parse_errors_are_one_line_naming_the_option(text: str, message: str) -> None:
    """A bad list is a one-line error that names the option and the offending item."""
    with pytest.raises(ValueError, match=r"^--kill-allow: ") as info:
        AddressSet.parse(text, "--kill-allow")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# -- address_key and AddressCounter ---------------------------------------------------------


def test_ipv4_addresses_are_counted_each_on_its_own() -> None:
    """Two IPv4 addresses, or an address and its IPv4-mapped form, are told apart correctly."""
    assert address_key("127.0.0.1") != address_key("127.0.0.2")
    assert address_key("::ffff:127.0.0.1") == address_key("127.0.0.1") == "127.0.0.1"


def test_ipv6_addresses_are_counted_per_64() -> None:
    """Every address of one IPv6 /64 counts as one host; another /64 is another host."""
    assert address_key("2001:db8:0:1::5") == address_key("2001:db8:0:1:ffff::9")
    assert address_key("2001:db8:0:1::5") == "2001:db8:0:1::/64"
    assert address_key("2001:db8:0:2::5") != address_key("2001:db8:0:1::5")


def test_counter_refuses_past_the_limit_per_address() -> None:
    """At the limit one address is refused while another is still admitted."""
    counter = AddressCounter(2)
    assert counter.try_add("a")
    assert counter.try_add("a")
    assert not counter.try_add("a")
    assert counter.try_add("b")
    assert counter.count("a") == 2


def test_counter_forgets_addresses_with_nothing_open() -> None:
    """An ended connection frees its slot, and an address with none open is not kept."""
    counter = AddressCounter(1)
    assert counter.try_add("a")
    counter.remove("a")
    assert list(counter.addresses()) == []
    assert counter.try_add("a")


def test_counter_with_limit_zero_counts_without_limit() -> None:
    """Limit 0 turns the limit off; connections are still counted."""
    counter = AddressCounter(0)
    for _ in range(1000):
        assert counter.try_add("a")
    assert counter.count("a") == 1000


# -- TokenBucket -----------------------------------------------------------------------------


def test_bucket_lets_a_burst_through_then_paces() -> None:
    """`burst` requests pass at once; each one after waits another 1/rate seconds."""
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(10.0) == pytest.approx(0.5)
    assert bucket.take(10.0) == pytest.approx(1.0)


def test_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    """Idle time earns tokens at `rate` per second, never more than `burst` of them."""
    bucket = TokenBucket(rate=2.0, burst=3)
    for _ in range(3):
        bucket.take(0.0)
    assert bucket.take(1.0) == 0.0  # two tokens earned, one used
    assert bucket.take(1.0) == 0.0
    assert bucket.take(1.0) > 0.0
    assert [bucket.take(1000.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(1000.0) > 0.0


def test_bucket_paced_requests_keep_a_steady_rate() -> None:
    """A client that waits as told gets exactly `rate` requests per second in the long run."""
    bucket = TokenBucket(rate=5.0, burst=1)
    now = 0.0
    for _ in range(101):
        now += bucket.take(now)
    assert now == pytest.approx(20.0)


def test_bucket_takes_several_tokens_at_once() -> None:
    """A request may cost more than one token."""
    bucket = TokenBucket(rate=1.0, burst=4)
    assert bucket.take(0.0, 4) == 0.0
    assert bucket.take(0.0, 2) == pytest.approx(2.0)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (float("inf"), 1), (1.0, 0)])
def test_bucket_rejects_settings_that_cannot_pace(rate: float, burst: float) -> None:
    """A rate that is not a positive finite number, or a burst below one, is an error."""
    with pytest.raises(ValueError, match="request"):
        TokenBucket(rate=rate, burst=burst)


# -- the policies in a running server (real sockets) -------------------------------------------

# A range no test client comes from: tests of the limits take the local exemption away.
NOT_LOCAL = AddressSet.parse("192.0.2.0/24")


def local_config(**settings: Any) -> Config:
    """Settings of a server on 127.0.0.1 and a free port."""
    return Config(host="127.0.0.1", port=0, student_id="limits", **settings)


async def test_kill_service_from_anywhere_stops_the_lab_server() -> None:
    """By default any address may stop the service, as the lab's grader must (127.0.0.2)."""
    async with trio.open_nursery() as nursery:
        server = ChatServer(local_config())
        await nursery.start(server.serve)
        async with await connect_from(server.ports["plain"], "127.0.0.2") as client:
            await client.send("KILL_SERVICE\n")
            await client.expect_eof()
    assert server.shutdown_scope.cancel_called


async def test_kill_service_from_outside_kill_allow_is_an_unknown_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """From 127.0.0.2, outside --kill-allow 127.0.0.1/32, KILL_SERVICE gets no reply, leaves
    the connection open, is logged at WARNING with the address and counted; from 127.0.0.1 it
    stops the service."""
    caplog.set_level(logging.INFO, logger="trio_chat")
    config = local_config(kill_allow=AddressSet.parse("127.0.0.1/32"))
    async with trio.open_nursery() as nursery:
        server = ChatServer(config)
        await nursery.start(server.serve)
        port = server.ports["plain"]
        async with await connect_from(port, "127.0.0.2") as outsider:
            await outsider.send(join_request("lobby", "eve"))
            await outsider.expect(joined_reply("lobby", "127.0.0.1", port, 0, 0))
            await outsider.expect(joined_announcement(0, "eve"))
            await outsider.send("KILL_SERVICE\n")
            await outsider.expect_nothing()  # no reply, still served
            await outsider.send(chat_request(0, 0, "eve", "still on"))
            await outsider.expect(chat_broadcast(0, "eve", "still on"))
            assert not server.shutdown_scope.cancel_called
            [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert "KILL_SERVICE from 127.0.0.2, outside --kill-allow" in warning.getMessage()
            assert server.counters.kill_refused == 1
            async with await Client.connect(port) as admin:
                await admin.send("KILL_SERVICE\n")
                await admin.expect_eof()
            await outsider.expect_eof()
    assert server.shutdown_scope.cancel_called


async def test_kill_service_while_closing_from_outside_kill_allow_is_ignored() -> None:
    """A refused KILL_SERVICE pipelined after DISCONNECT (read during the grace) is still
    refused: the connection closes as DISCONNECT says and the service goes on."""
    config = local_config(kill_allow=AddressSet.parse("none"))
    async with running_server(config) as server:
        port = server.ports["plain"]
        async with await Client.connect(port) as client:
            await client.send(disconnect_request("x") + "KILL_SERVICE\n")
            await client.expect_eof()
        async with await Client.connect(port) as other:
            await other.barrier()
        assert server.counters.kill_refused == 1


async def test_connection_past_the_per_address_limit_gets_error_5(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With --max-connections-per-ip 2, the third connection from 127.0.0.1 gets error 5
    naming the limit and is closed; 127.0.0.2 and the first two are served as before, and a
    slot freed is a slot taken again."""
    caplog.set_level(logging.INFO, logger="trio_chat")
    config = local_config(max_connections_per_ip=2, limit_exempt=NOT_LOCAL)
    async with running_server(config) as server:
        port = server.ports["plain"]
        first, second = await Client.connect(port), await Client.connect(port)
        for client in (first, second):
            await client.barrier()
        async with await Client.connect(port) as third:
            await third.send("HELO pipelined before the refusal is read\n")
            description = await third.expect_error(5)
            assert "at most 2" in description
            assert "127.0.0.1" in description
            await third.expect_eof()
        async with await Client.connect(port) as fourth:
            await fourth.expect_error(5)
            await fourth.expect_eof()
        async with await connect_from(port, "127.0.0.2") as elsewhere:
            await elsewhere.barrier()
        for client in (first, second):
            await client.barrier()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # once per episode, not once per refused connection
        assert "refused: too many connections from 127.0.0.1" in warnings[0]
        assert server.counters.refused == {"per_address": 2}
        for client in (first, second):
            await client.aclose()


async def test_a_slot_freed_is_a_slot_taken_again() -> None:
    """Once a connection from an address at its limit has ended, the next one is served."""
    server = ChatServer(Config(max_connections_per_ip=1))
    peer = "198.51.100.7:4000"
    async with trio.open_nursery() as nursery:
        first, first_done = open_memory_connection(server, nursery, peer=peer)
        await first.barrier()
        refused, _ = open_memory_connection(server, nursery, peer="198.51.100.7:4001")
        await refused.expect_error(5)
        await first.aclose()
        await first_done.wait()
        again, _ = open_memory_connection(server, nursery, peer="198.51.100.7:4002")
        await again.barrier()
        nursery.cancel_scope.cancel()


async def test_exempt_addresses_are_not_limited() -> None:
    """Clients from --limit-exempt (127.0.0.0/8 by default) pass the per-address limit."""
    async with running_server(local_config(max_connections_per_ip=1)) as server:
        port = server.ports["plain"]
        clients = [await Client.connect(port) for _ in range(3)]
        for client in clients:
            await client.barrier()
            await client.aclose()


async def test_limit_zero_turns_the_limit_off() -> None:
    """--max-connections-per-ip 0 lets any number through, exempt or not."""
    config = local_config(max_connections_per_ip=0, limit_exempt=NOT_LOCAL)
    async with running_server(config) as server:
        clients = [await Client.connect(server.ports["plain"]) for _ in range(5)]
        for client in clients:
            await client.barrier()
            await client.aclose()


# -- flood control -------------------------------------------------------------------------


async def test_flooding_connection_is_slowed_beside_a_normal_one() -> None:
    """A client pipelining 100 requests at 200/s (burst 20) gets every reply, in order, no
    sooner than the rate allows; a client beside it is answered at once meanwhile."""
    config = local_config(request_rate=200.0, request_burst=20, limit_exempt=NOT_LOCAL)
    async with running_server(config) as server:
        port = server.ports["plain"]
        async with await Client.connect(port) as flooder, await Client.connect(port) as normal:
            start = trio.current_time()
            await flooder.send("".join(f"HELO {i}\n" for i in range(100)))
            await flooder.expect(helo_reply("0", "127.0.0.1", port, "limits"))
            await normal.barrier()
            assert server.counters.throttled_seconds > 0  # the flooder is being held back
            for i in range(1, 100):
                await flooder.expect(helo_reply(str(i), "127.0.0.1", port, "limits"))
            assert trio.current_time() - start >= (100 - 20) / 200
            await flooder.expect_nothing()


async def test_exempt_connections_are_not_paced() -> None:
    """From --limit-exempt, flood control does not apply."""
    config = local_config(request_rate=1.0, request_burst=1)
    async with (
        running_server(config) as server,
        await Client.connect(server.ports["plain"]) as client,
    ):
        await client.send("HELO a\nHELO b\nHELO c\n")
        for _ in range(3):
            await client.receive_until(b"StudentID:limits\n")
        assert server.counters.throttled_seconds == 0


async def test_fakelag_paces_requests_in_virtual_time(autojump_clock: trio.abc.Clock) -> None:
    """At rate 2/s and burst 1, pipelined requests are answered 0.5 s apart, in order; a
    plain CHAT counts as one request."""
    config = Config(request_rate=2.0, request_burst=1)
    server = ChatServer(config)
    async with trio.open_nursery() as nursery:
        client, _ = open_memory_connection(server, nursery, peer="198.51.100.7:4000")
        start = trio.current_time()
        await client.send(join_request("r", "n") + chat_request(0, 0, "n", "a"))
        await client.send(chat_request(0, 0, "n", "b") + "HELO x\n")
        await client.receive_until(b"JOIN_ID: 0\n")
        await client.receive_until(b"has joined this chatroom.\n\n")
        times = [trio.current_time() - start]
        for marker in (b"MESSAGE: a\n\n", b"MESSAGE: b\n\n", b"StudentID:"):
            await client.receive_until(marker)
            times.append(trio.current_time() - start)
        assert times == pytest.approx([0.0, 0.5, 1.0, 1.5])
        nursery.cancel_scope.cancel()


# -- the command line -------------------------------------------------------------------------


def test_bad_network_is_a_usage_error_naming_the_option() -> None:
    """A malformed --kill-allow is the usage line and one line naming the option and item."""
    result = trio_chat_command("serve", "--port", "0", "--kill-allow", "10.0.0.1/8")
    assert_usage_error(result, "--kill-allow", "10.0.0.1/8", "did you mean 10.0.0.0/8?")


def test_options_reach_the_settings() -> None:
    """Every option of the policies ends up in Config, 0 turning the address limit off."""
    argv = [
        "serve",
        "--port",
        "0",
        "--kill-allow",
        "10.0.0.0/8,::1",
        "--limit-exempt",
        "none",
        "--max-connections-per-ip",
        "0",
        "--request-rate",
        "2.5",
        "--request-burst",
        "4",
    ]
    config = config_from_args(build_parser(argv).parse_args(argv))
    assert str(config.kill_allow) == "10.0.0.0/8,::1/128"
    assert str(config.limit_exempt) == "none"
    assert config.max_connections_per_ip == 0
    assert (config.request_rate, config.burst) == (2.5, 4)
    defaults = config_from_args(build_parser(argv[:3]).parse_args(argv[:3]))
    assert defaults.kill_allow == EVERY_ADDRESS
    assert defaults.limit_exempt == LOCAL_ADDRESSES
    assert defaults.max_connections_per_ip == 256
    assert defaults.request_rate is None


async def test_only_a_kill_its_node_accepted_reaches_the_other_nodes(tmp_path: Path) -> None:
    """Two nodes through Redis: KILL_SERVICE from outside the first node's --kill-allow stops
    neither node; one it accepts stops both."""
    redis = RedisProcess(tmp_path)
    redis.start()
    try:
        async with (
            RedisBroker.connect(redis_settings(redis)) as broker_a,
            RedisBroker.connect(redis_settings(redis)) as broker_b,
            trio.open_nursery() as nursery,
        ):
            strict = local_config(kill_allow=AddressSet.parse("127.0.0.1/32"))
            node_a, node_b = ChatServer(strict, broker_a), ChatServer(local_config(), broker_b)
            for node in (node_a, node_b):
                await nursery.start(node.serve)
            async with (
                await connect_from(node_a.ports["plain"], "127.0.0.2") as outsider,
                await Client.connect(node_b.ports["plain"]) as elsewhere,
            ):
                await outsider.send("KILL_SERVICE\n")
                await outsider.barrier()
                await elsewhere.barrier()
                assert not node_b.shutdown_scope.cancel_called
                async with await Client.connect(node_a.ports["plain"]) as admin:
                    await admin.send("KILL_SERVICE\n")
                    await admin.expect_eof()
                await elsewhere.expect_eof()  # the other node stopped too
                await outsider.expect_eof()
        assert node_a.shutdown_scope.cancel_called
        assert node_b.shutdown_scope.cancel_called
    finally:
        redis.stop()


async def test_refused_kill_service_cannot_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """A client repeating a refused KILL_SERVICE gets a few WARNING lines, then DEBUG ones."""
    caplog.set_level(logging.DEBUG, logger="trio_chat")
    server = ChatServer(Config(kill_allow=AddressSet.parse("none")))
    async with trio.open_nursery() as nursery:
        client, _ = open_memory_connection(server, nursery, peer="198.51.100.7:4000")
        await client.send("KILL_SERVICE\n" * 50)
        await client.barrier()
        refused = [r for r in caplog.records if "outside --kill-allow" in r.getMessage()]
        assert len(refused) == 50
        assert sum(r.levelno == logging.WARNING for r in refused) == 10
        assert server.counters.kill_refused == 50
        assert not server.shutdown_scope.cancel_called
        nursery.cancel_scope.cancel()
