"""A node's shard-channel subscriptions: one connection per Redis master, kept alive.

Sharded pub/sub (``SSUBSCRIBE``) keeps a channel's messages on the shard that owns its slot,
so a node connects to the masters that own the slots of the rooms it serves and nowhere else;
a single Redis is one shard owning every slot. Any trouble (a connection lost or silent, a
``MOVED`` reply, a slot moved away under a subscription) ends every connection; the topology
is read again and every channel subscribed afresh. The owner hears of each channel that was
lost and of each subscription confirmed, and catches up from the room's log in between.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from trio_chat.redis.resp import SLOTS, RespError, RespReader, Value, encode_command, hash_slot

log = logging.getLogger("trio_chat.redis")

Address = tuple[str, int]


class SubscriberLost(Exception):
    """A subscriber connection failed or fell silent; it will be rebuilt."""


async def command(address: Address, *parts: str | bytes | int) -> Value:
    """Send one command on a short-lived connection and return its reply (callers bound
    the wait)."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(encode_command(*parts))
        reader = RespReader()
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise SubscriberLost(f"{address[0]}:{address[1]} closed the connection")
            values = reader.feed(data)
            if values:
                return values[0]


async def read_topology(seed: Address, *, cluster: bool) -> list[tuple[int, Address]]:
    """(last slot, master address) ranges in slot order; one range for a single Redis."""
    if not cluster:
        return [(SLOTS - 1, seed)]
    reply = await command(seed, "CLUSTER", "SLOTS")
    if not isinstance(reply, list):
        raise SubscriberLost(f"unexpected CLUSTER SLOTS reply {reply!r}")
    ranges: list[tuple[int, int, Address]] = []
    for entry in reply:
        match entry:
            case [int(first), int(last), [bytes(host), int(port), *_], *_]:
                # An empty host means "the address you reached me at".
                ranges.append((first, last, (host.decode() or seed[0], port)))
            case _:
                raise SubscriberLost(f"unexpected CLUSTER SLOTS entry {entry!r}")
    ranges.sort()
    return [(last, address) for _first, last, address in ranges]


@attrs.define(eq=False)
class _Shard:
    """One subscriber connection: commands queue in `outgoing` for its writer."""

    address: Address
    outgoing: list[bytes] = attrs.field(factory=list)
    wake: trio.Event = attrs.field(factory=trio.Event)
    pong: trio.Event = attrs.field(factory=trio.Event)

    def send(self, data: bytes) -> None:
        self.outgoing.append(data)
        self.wake.set()


@attrs.define(eq=False)
class Subscriber:
    """Keeps `channels` subscribed; reports messages, confirmations and losses."""

    seed: Address
    cluster: bool
    on_message: Callable[[str, bytes], None]
    on_subscribed: Callable[[str], None]
    on_lost: Callable[[str], None]
    on_state: Callable[[bool, BaseException | None], None]
    timeout: float
    """Longest wait for a connection, a confirmation or a reply to PING."""
    ping_interval: float
    """How often an idle connection is checked, so a stalled Redis is noticed."""
    retry_initial: float
    retry_max: float
    channels: set[str] = attrs.field(factory=set)
    confirmed: set[str] = attrs.field(factory=set)
    _topology: list[tuple[int, Address]] = attrs.field(factory=list)
    _shards: dict[Address, _Shard] = attrs.field(factory=dict)
    _waiters: dict[str, trio.Event] = attrs.field(factory=dict)
    _unsubscribing: dict[str, int] = attrs.field(factory=dict)  # SUNSUBSCRIBEs unconfirmed
    _trouble: trio.Event = attrs.field(factory=trio.Event)

    def _shard_for(self, channel: str) -> _Shard | None:
        slot = hash_slot(channel)
        for last, address in self._topology:
            if slot <= last:
                return self._shards.get(address)
        return None

    async def subscribe(self, channel: str) -> None:
        """Subscribe to `channel` and wait for the confirmation (`trio.TooSlowError`)."""
        self.channels.add(channel)
        if channel in self.confirmed:
            return
        waiter = self._waiters.setdefault(channel, trio.Event())
        shard = self._shard_for(channel)
        if shard is not None:
            shard.send(encode_command("SSUBSCRIBE", channel))
        with trio.fail_after(self.timeout):
            await waiter.wait()

    def unsubscribe(self, channel: str) -> None:
        """Stop receiving `channel` (messages already on their way are dropped)."""
        self.channels.discard(channel)
        self.confirmed.discard(channel)
        shard = self._shard_for(channel)
        if shard is not None:
            self._unsubscribing[channel] = self._unsubscribing.get(channel, 0) + 1
            shard.send(encode_command("SUNSUBSCRIBE", channel))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, subscribe, and start over after any trouble, with backoff."""
        delay = self.retry_initial
        started = False
        while True:
            error: BaseException | None = None
            try:
                with trio.fail_after(self.timeout):
                    self._topology = await read_topology(self.seed, cluster=self.cluster)
                async with trio.open_nursery() as nursery:
                    for address in {address for _last, address in self._topology}:
                        await nursery.start(self._run_shard, address)
                    self.on_state(True, None)
                    if not started:
                        started = True
                        task_status.started()
                    delay = self.retry_initial
                    await self._trouble.wait()
                    nursery.cancel_scope.cancel()
            except* (OSError, trio.TooSlowError, SubscriberLost, RespError) as group:
                error = group.exceptions[0]
            self._trouble = trio.Event()
            self._shards.clear()
            self._unsubscribing.clear()
            lost = sorted(self.confirmed)
            self.confirmed.clear()
            for channel in lost:
                self.on_lost(channel)
            self.on_state(False, error)
            await trio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    async def _run_shard(self, address: Address, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.fail_after(self.timeout):
            stream = await trio.open_tcp_stream(*address)
        shard = self._shards[address] = _Shard(address)
        for channel in sorted(self.channels):
            if self._shard_for(channel) is shard:
                shard.send(encode_command("SSUBSCRIBE", channel))
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(self._write, shard, stream)
                nursery.start_soon(self._ping, shard)
                task_status.started()
                await self._read(shard, stream)
        except* (OSError, trio.BrokenResourceError, trio.TooSlowError, SubscriberLost) as group:
            log.debug("subscriber connection to %s:%d: %r", *address, group.exceptions[0])
            self._trouble.set()
            raise SubscriberLost(str(group.exceptions[0])) from None

    async def _write(self, shard: _Shard, stream: trio.SocketStream) -> None:
        while True:
            await shard.wake.wait()
            shard.wake = trio.Event()
            data, shard.outgoing = b"".join(shard.outgoing), []
            await stream.send_all(data)

    async def _ping(self, shard: _Shard) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            shard.pong = trio.Event()
            shard.send(encode_command("PING"))
            with trio.move_on_after(self.timeout):
                await shard.pong.wait()
            if not shard.pong.is_set():
                raise SubscriberLost("no answer to PING")

    async def _read(self, shard: _Shard, stream: trio.SocketStream) -> None:
        reader = RespReader()
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise SubscriberLost("connection closed by Redis")
            for value in reader.feed(data):
                self._dispatch(shard, value)

    def _dispatch(self, shard: _Shard, value: Value) -> None:
        if isinstance(value, RespError):
            log.info("Redis refused a subscription (%s); reading the topology again", value)
            self._trouble.set()
            return
        if value == b"PONG":  # a connection with only shard subscriptions answers plainly
            shard.pong.set()
            return
        if not isinstance(value, list) or len(value) < 2 or not isinstance(value[0], bytes):
            return
        kind = value[0].lower()
        if kind == b"pong":
            shard.pong.set()
            return
        channel_bytes = value[1]
        if not isinstance(channel_bytes, bytes):
            return
        channel = channel_bytes.decode()
        if kind == b"smessage":
            data = value[2]
            if channel in self.confirmed and isinstance(data, bytes):
                self.on_message(channel, data)
        elif kind == b"ssubscribe":
            if channel in self.channels and channel not in self.confirmed:
                self.confirmed.add(channel)
                waiter = self._waiters.pop(channel, None)
                if waiter is not None:
                    waiter.set()
                self.on_subscribed(channel)
        elif kind == b"sunsubscribe":
            pending = self._unsubscribing.get(channel, 0)
            if pending:
                if pending == 1:
                    del self._unsubscribing[channel]
                else:
                    self._unsubscribing[channel] = pending - 1
                self.confirmed.discard(channel)  # a SSUBSCRIBE sent since is still to come
            elif channel in self.channels:
                # Not asked for: the slot moved to another shard under the subscription.
                log.info("channel %s moved; reading the topology again", channel)
                self._trouble.set()
