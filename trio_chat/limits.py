"""Operator policies about who may do what, and how much: address lists, per-address
connection counts and request rates (docs/protocol.md section 7).

Nothing here touches a socket. `AddressSet` answers whether an address is in a list of
networks (``--kill-allow``, ``--limit-exempt``); `AddressCounter` counts open connections per
address (``--max-connections-per-ip``); `TokenBucket` paces one connection's requests
(``--request-rate``, ``--request-burst``) on whatever clock it is given: the server gives it
trio's, so tests drive it with a virtual one.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable

from attrs import define, field, frozen

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# One IPv6 host is routinely given a whole /64, so counting connections per IPv6 address
# would let it open as many as it likes: IPv6 addresses are counted per /64 network.
IPV6_PREFIX_COUNTED = 64


def parse_address(text: str) -> Address | None:
    """The address `text` names (an IPv4-mapped IPv6 address as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@frozen
class AddressSet:
    """A set of IP networks; an address is in it when it is in one of the networks."""

    networks: tuple[Network, ...]

    @classmethod
    def parse(cls, text: str, option: str = "") -> AddressSet:
        """Networks from ``CIDR[,CIDR...]`` (a bare address is one host; ``none``: no address).

        Raises `ValueError` with a one-line message naming the bad item (after `option`).
        """
        prefix = f"{option}: " if option else ""
        if text.strip().lower() == "none":
            return cls(())
        networks = []
        for item in text.split(","):
            item = item.strip()
            if not item:
                raise ValueError(
                    f"{prefix}empty entry in {text!r}; write networks as CIDR[,CIDR...], "
                    "or 'none' for no address"
                )
            try:
                networks.append(ipaddress.ip_network(item))
            except ValueError:
                try:
                    loose = ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(
                        f"{prefix}{item!r} is not an IP address or network "
                        "(CIDR such as 10.0.0.0/8 or 2001:db8::/32)"
                    ) from None
                raise ValueError(
                    f"{prefix}{item!r} has host bits set; did you mean {loose}?"
                ) from None
        return cls(tuple(networks))

    @classmethod
    def everything(cls) -> AddressSet:
        """Every IPv4 and IPv6 address."""
        return cls((ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))

    def __contains__(self, ip: object) -> bool:
        """Whether the address written `ip` is in one of the networks (False if no address)."""
        if not isinstance(ip, str):
            return False
        address = parse_address(ip)
        if address is None:
            return False
        return any(address in network for network in self.networks)

    def __str__(self) -> str:
        return ",".join(str(network) for network in self.networks) or "none"


# The defaults of the command line, as docs/protocol.md section 7 and the options' help give them.
EVERY_ADDRESS = AddressSet.everything()
LOCAL_ADDRESSES = AddressSet.parse("127.0.0.0/8,::1/128")


def address_key(ip: str) -> str:
    """What connections are counted by: the IPv4 address, or the IPv6 address's /64."""
    address = parse_address(ip)
    if address is None:
        return ip  # not an IP address (a test's memory stream): counted as it is written
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX_COUNTED), strict=False))
    return str(address)


@define
class AddressCounter:
    """Open connections per address, at most `limit` for each (0: no limit)."""

    limit: int
    _counts: dict[str, int] = field(factory=dict, init=False)

    def try_add(self, key: str) -> bool:
        """Count one more connection from `key` unless that would pass the limit."""
        count = self._counts.get(key, 0)
        if self.limit and count >= self.limit:
            return False
        self._counts[key] = count + 1
        return True

    def remove(self, key: str) -> None:
        """One connection counted by `try_add` has ended."""
        count = self._counts[key] - 1
        if count:
            self._counts[key] = count
        else:
            del self._counts[key]  # forgotten: memory holds only addresses now connected

    def count(self, key: str) -> int:
        """Connections from `key` open now."""
        return self._counts.get(key, 0)

    def addresses(self) -> Iterable[str]:
        """Every address with a connection open now."""
        return self._counts.keys()


@define
class TokenBucket:
    """Requests allowed to one connection: `burst` at once, then `rate` per second.

    Each request takes a token; the bucket refills at `rate` tokens per second up to `burst`.
    A request that finds no token waits until one has accrued (what IRC servers call
    fakelag): the connection is slowed down, never refused, and its requests keep their order.
    """

    rate: float
    burst: float
    _tokens: float = field(init=False)
    _updated: float = field(default=-math.inf, init=False)

    def __attrs_post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"request rate must be a positive number, not {self.rate!r}")
        if not (self.burst >= 1 and math.isfinite(self.burst)):
            raise ValueError(f"request burst must be at least 1, not {self.burst!r}")
        self._tokens = self.burst

    def take(self, now: float, count: int = 1) -> float:
        """Take `count` tokens at time `now`; return how long to wait before going on (0 if
        none). Tokens may go into debt, so requests taken in a row wait one after another."""
        tokens = self._tokens
        if now != self._updated:
            tokens = min(self.burst, tokens + (now - self._updated) * self.rate)
            self._updated = now
        tokens -= count
        self._tokens = tokens
        return 0.0 if tokens >= 0 else -tokens / self.rate
