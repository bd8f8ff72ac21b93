"""The operator policies' building blocks: address lists, per-address counts, token buckets."""

from __future__ import annotations

import pytest

from trio_chat.limits import (
    EVERY_ADDRESS,
    LOCAL_ADDRESSES,
    AddressCounter,
    AddressSet,
    TokenBucket,
    address_key,
)

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
