"""The Redis broker: one node of a service whose rooms are shared through Redis.

Routing by interest: each room has its own shard channel, and a node subscribes to a room's
channel from the first JOIN of one of its connections until its last member there is gone, so
a node receives only the rooms it serves (see `subscriber.py`). Every event, this node's own
included, is applied when it comes back from the room's channel, so every member on every node
sees a room's events in the one order Redis gave them.

Exactly once: a node publishes a room's events in batches through a script that numbers them
and keeps them in the room's log (`scripts.ROOMS_APPEND`). A batch whose outcome is unknown
(a timeout) is sent again with the same batch number until Redis answers, and receivers drop
the second copy; the node never applies its own events except from the channel. A gap in the
numbers, or a subscription lost and renewed, is filled from the log.

Request order: a connection's own events are held back until its earlier events in other
rooms are applied, and its replies wait for them, so a client sees the effects of its requests
in request order across rooms. While Redis is down or a batch is in doubt, new requests get
error 6 and cause nothing.

Identifiers (ROOM_REF, JOIN_ID) come from counters in Redis; when Redis lost them (the ids
epoch changed) every node puts back the floors it knows, so none is ever handed out twice.
A heartbeat key per node lets the others announce a dead node's members as gone.
"""

from __future__ import annotations

import collections
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

from trio_chat import protocol
from trio_chat.protocol import Chat, ErrorCode, Join, Leave, ProtocolError
from trio_chat.redis import scripts
from trio_chat.redis.delivery import FAILURES, OwnEvent, describe, unavailable
from trio_chat.redis.feed import LEAVE, Feed, Frame
from trio_chat.redis.publishing import Publishing
from trio_chat.redis.settings import RedisSettings
from trio_chat.redis.subscriber import Subscriber, SubscriberLost, command
from trio_chat.rooms import Registry, Session

log = logging.getLogger("trio_chat.redis")


@attrs.define(eq=False)
class RedisBroker(Publishing):
    """One node of a service whose rooms are shared through Redis (see the module docs)."""

    settings: RedisSettings
    client: coredis.Redis[bytes] | coredis.RedisCluster[bytes]
    cluster: bool
    registry: Registry = attrs.field(factory=Registry)
    on_kill: Callable[[str], None] = attrs.field(default=lambda reason: None)
    on_round_trip: Callable[[float], None] = attrs.field(default=lambda seconds: None)
    node_id: str = attrs.field(factory=lambda: secrets.token_hex(6))
    keys: scripts.Keys = attrs.field(init=False)
    subscriber: Subscriber = attrs.field(init=False)
    _subscribed: bool = False  # every subscriber connection is up
    _rejoined: bool = False  # identifiers and heartbeat checked since
    _ids_epoch: bytes = b""
    _dropped: BaseException | None = None  # why the subscriber was lost, not yet logged
    _outage: bool = False  # an outage was logged and its end is still to be
    _listed: bool = False  # in the set of live nodes since the last rejoin
    _healthy_since: float = math.inf  # when Redis last began answering this node
    _floor_room_ref: int = 0  # one past the highest ROOM_REF seen
    _floor_join_id: int = 0  # one past the highest JOIN_ID seen
    _feeds: dict[int, Feed] = attrs.field(factory=dict)
    _by_channel: dict[str, Feed] = attrs.field(factory=dict)
    _opening: dict[int, trio.Event] = attrs.field(factory=dict)
    _held: set[Feed] = attrs.field(factory=set)  # feeds waiting for an own event's turn
    _session_ids: dict[Session, int] = attrs.field(factory=dict)
    _next_session: int = 1
    _next_token: int = 1
    _own: dict[int, OwnEvent] = attrs.field(factory=dict)
    _pending: dict[Session, collections.deque[int]] = attrs.field(factory=dict)
    _deferred: dict[Session, list[tuple[int, Callable[[], None]]]] = attrs.field(factory=dict)
    _released: set[Session] = attrs.field(factory=set)
    _batch_numbers: dict[int, int] = attrs.field(factory=dict)  # per room, batches published
    _backlog: list[OwnEvent] = attrs.field(factory=list)
    _backlog_ready: trio.Event = attrs.field(factory=trio.Event)
    _in_doubt: bool = False  # a batch timed out and is being sent again
    _availability_changed: trio.Event = attrs.field(factory=trio.Event)
    _nursery: trio.Nursery | None = None
    _scripts: dict[str, Any] = attrs.field(factory=dict)
    messages_received: int = 0
    """Messages taken from room channels: the share of the bus this node processes."""
    events_applied: int = 0
    """Room events applied here (each delivered to this node's members of the room)."""

    def __attrs_post_init__(self) -> None:
        self.keys = scripts.Keys(self.settings.prefix)
        settings = self.settings
        self.subscriber = Subscriber(
            settings.address,
            self.cluster,
            on_message=self._on_message,
            on_subscribed=self._on_subscribed,
            on_lost=self._on_lost,
            on_state=self._on_subscriber_state,
            timeout=settings.command_timeout,
            ping_interval=settings.heartbeat_interval,
            retry_initial=settings.retry_initial,
            retry_max=settings.retry_max,
        )
        self.subscriber.channels.add(self.keys.control)
        for name in ("ROOMS_APPEND", "ROOM_REAP", "ROOM_REF", "JOIN_ID", "RESTORE"):
            self._scripts[name] = self.client.register_script(getattr(scripts, name))

    # -- running ---------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, settings: RedisSettings, registry: Registry | None = None
    ) -> AsyncIterator[RedisBroker]:
        """Run a node for the duration of the context.

        Waits until Redis has been reached once (saying so at once if it cannot be, and how
        often it retries), so a node never serves clients it cannot give identifiers to; after
        that, outages are survived. A single Redis or a cluster node: detected.
        """
        cluster = await _wait_for_redis(settings)
        host, port = settings.address
        options: dict[str, Any] = {
            "decode_responses": False,
            "retry_policy": NoRetryPolicy(),
            "connect_timeout": settings.connect_timeout,
            "stream_timeout": settings.command_timeout,
        }
        client: coredis.Redis[bytes] | coredis.RedisCluster[bytes]
        if cluster:
            client = coredis.RedisCluster(host, port, **options)
        else:
            client = coredis.Redis.from_url(settings.url, **options)
        broker = cls(settings, client, cluster, registry or Registry())
        try:
            async with client, trio.open_nursery() as nursery:
                broker._nursery = nursery
                await nursery.start(broker.subscriber.run)
                nursery.start_soon(broker._keep_alive)
                nursery.start_soon(broker._publish_backlog)
                with trio.fail_after(settings.command_timeout * 4):
                    await broker.wait_available(True)
                    # Serve only once a KILL_SERVICE from another node can reach this one.
                    await broker.subscriber.subscribe(broker.keys.control)
                try:
                    yield broker
                finally:
                    log.info(
                        "this node took %d messages (%d events) from its rooms' channels",
                        broker.messages_received,
                        broker.events_applied,
                    )
                    nursery.cancel_scope.cancel()
                    with trio.move_on_after(settings.command_timeout) as cleanup:
                        cleanup.shield = True
                        await broker._leave_cluster()
        except* (anyio.ClosedResourceError, anyio.BrokenResourceError):
            log.debug("Redis connection closed during shutdown")

    @property
    def available(self) -> bool:
        """Whether requests that need Redis can be served now."""
        return self._subscribed and self._rejoined and not self._in_doubt

    async def wait_available(self, available: bool) -> None:
        """Return once `available` has the given value."""
        while self.available != available:
            await self._availability_changed.wait()

    def _changed(self) -> None:
        self._availability_changed.set()
        self._availability_changed = trio.Event()

    def _mark_down(self, error: BaseException, *, quietly: bool = False) -> None:
        """Redis failed: requests get error 6 until the node has rejoined.

        A subscriber connection that Redis closed is often back at the first retry (a
        ``CLIENT KILL``, an output buffer limit): `quietly` leaves the log line to the
        reconnection, so a routine reconnect is one line."""
        self._healthy_since = math.inf
        if quietly and self._rejoined:
            self._dropped = error
        elif self._rejoined or self._dropped is not None:
            log.warning(
                "Redis unavailable (%s); requests get error 6 until it is back",
                describe(self._dropped or error),
            )
            self._dropped = None
            self._outage = True
        self._rejoined = False
        self._changed()

    async def _command(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Run one Redis call; a failure marks Redis unavailable and becomes error 6."""
        try:
            with trio.fail_after(self.settings.command_timeout):
                return await call()
        except FAILURES as error:
            self._mark_down(error)
            raise unavailable() from None

    def _on_subscriber_state(self, up: bool, error: BaseException | None) -> None:
        self._subscribed = up
        if up:
            if self._nursery is not None:
                self._nursery.start_soon(self._rejoin)
        elif error is not None:
            self._mark_down(error, quietly=True)
        self._changed()

    async def _rejoin(self) -> None:
        """After (re)connecting: check the identifiers' epoch, restore them, heartbeat."""
        try:
            with trio.fail_after(self.settings.command_timeout):
                epoch = await self.client.get(self.keys.ids_epoch)
                if epoch is None or epoch != self._ids_epoch:
                    if self._ids_epoch:
                        log.warning("Redis lost its data; restoring what this node knows")
                    self._ids_epoch = await self._restore()
                    self._listed = False  # not listed in a Redis that starts afresh
                    await self._record_memberships()
                await self._heartbeat()
        except FAILURES as error:
            log.debug("rejoining failed: %r", error)
            return  # the subscriber notices and reconnects; or the next heartbeat retries
        if not self._rejoined:
            self._rejoined = True
            self._healthy_since = trio.current_time()
            if self._dropped is not None:
                log.warning(
                    "Redis closed a subscriber connection (%s); resubscribed and caught up",
                    describe(self._dropped),
                )
            elif self._outage:
                log.info("Redis available again")
            else:
                log.info("Redis available; this node is %s", self.node_id)
            self._dropped, self._outage = None, False
            self._changed()

    async def _restore(self) -> bytes:
        pairs: list[str | int] = []
        for name, ref in self.registry.room_names():
            pairs += [name, ref]
        keys = self.keys
        epoch: bytes = await self._scripts["RESTORE"](
            keys=[keys.room_counter, keys.join_counter, keys.ids_epoch, keys.room_refs],
            args=[secrets.token_hex(8), self._floor_room_ref, self._floor_join_id, *pairs],
        )
        return epoch

    async def _record_memberships(self) -> None:
        """Write this node's membership records afresh, so they are announced if it dies."""
        for session, session_id in self._session_ids.items():
            for ref, name in session.rooms.items():
                leave = Frame(
                    LEAVE, session_id, 0, "", protocol.encode_left_announcement(ref, name)
                )
                field = f"{self.node_id}:{session_id}"
                await self.client.hset(self.keys.room(ref)[2], {field: leave.encode()})
                await self.client.sadd(self.keys.node_rooms(self.node_id), [str(ref)])

    async def _heartbeat(self) -> None:
        # The heartbeat key first: a node listed without one may be reaped as dead.
        ttl_ms = int(self.settings.heartbeat_ttl * 1000)
        await self.client.set(self.keys.heartbeat(self.node_id), b"1", px=ttl_ms)
        added = await self.client.sadd(self.keys.nodes, [self.node_id])
        # Listed before, gone now, in the same Redis: another node took this one for dead (it
        # was cut off or stalled past the node timeout) and announced its members' departures.
        if added and self._listed and await self.client.get(self.keys.ids_epoch) == self._ids_epoch:
            self.evict_all()
        self._listed = True
        # Rooms allocated anywhere: a CHAT to one this node never served is error 3, not 2.
        rooms = await self.client.get(self.keys.room_counter)
        self._floor_room_ref = max(self._floor_room_ref, int(rooms or 0))

    async def _keep_alive(self) -> None:
        """Renew the heartbeat and announce the departures of nodes whose heartbeat expired."""
        while True:
            await trio.sleep(self.settings.heartbeat_interval)
            if not self._subscribed:
                continue
            if not self._rejoined:
                await self._rejoin()
                continue
            try:
                await self._command(self._heartbeat)
                # A node whose heartbeat expired while Redis itself was stalled or out of
                # reach is not dead: every node gets one full node timeout of working Redis
                # to renew its heartbeat before any is taken for dead.
                if trio.current_time() - self._healthy_since >= self.settings.heartbeat_ttl:
                    await self._command(self._reap_dead_nodes)
            except ProtocolError:
                pass  # marked down; the next beat rejoins

    async def _reap_dead_nodes(self) -> None:
        keys, client = self.keys, self.client
        for node_bytes in sorted(await client.smembers(keys.nodes)):
            node = node_bytes.decode()
            if node == self.node_id or await client.exists([keys.heartbeat(node)]):
                continue
            if not await client.srem(keys.nodes, [node]):
                continue  # another node claimed it
            rooms = await client.smembers(keys.node_rooms(node))
            log.warning("node %s is gone; announcing its members' departures", node)
            for ref in sorted(int(room) for room in rooms):
                await self._scripts["ROOM_REAP"](
                    keys=keys.room(ref), args=[*self._room_args(ref), node]
                )
            await client.delete([keys.node_rooms(node)])

    async def _leave_cluster(self) -> None:
        """On a clean stop: publish what is queued, then let the others announce the rest."""
        if not self.available:
            return
        try:
            batch, self._backlog = self._backlog, []
            await self._publish_batch(batch, retry=False)
            await self.client.delete([self.keys.heartbeat(self.node_id)])
        except* FAILURES:
            log.warning("Redis unavailable while leaving; other nodes will notice the expiry")

    # -- requests --------------------------------------------------------------------------

    def _check_available(self) -> None:
        if not self.available or len(self._backlog) >= self.settings.max_backlog:
            raise unavailable()

    async def join(
        self, session: Session, request: Join, *, server_ip: str, server_port: int
    ) -> None:
        """Join with identifiers from Redis (or known here), subscribed to the room first."""
        self._check_available()
        registry = self.registry
        registry.check_room_limit(session, request.room_name)
        room_ref = registry.room_ref_for(request.room_name)
        if room_ref is None:
            room_ref = await self._allocate(
                "ROOM_REF",
                [self.keys.room_refs, self.keys.room_counter, self.keys.ids_epoch],
                lambda epoch: [request.room_name, epoch, self._floor_room_ref],
            )
            registry.add_room(room_ref, request.room_name)
            self._floor_room_ref = max(self._floor_room_ref, room_ref + 1)
        if session.join_id is None:
            join_id = await self._allocate(
                "JOIN_ID",
                [self.keys.join_counter, self.keys.ids_epoch],
                lambda epoch: [epoch, self._floor_join_id],
            )
            session.join_id = join_id
            self._floor_join_id = max(self._floor_join_id, join_id + 1)
        feed = await self._open_feed(room_ref)  # held open until the join's event holds it
        try:
            self._check_available()
            outcome = registry.join(
                session, room_ref, request.client_name, server_ip=server_ip, server_port=server_port
            )
            self._publish(outcome.events)
        finally:
            feed.interest -= 1
            self._maybe_close(feed)

    async def _allocate(
        self, name: str, keys: list[str], args: Callable[[bytes], list[Any]]
    ) -> int:
        script = self._scripts[name]
        for _ in range(2):
            value = await self._command(lambda: script(keys=keys, args=args(self._ids_epoch)))
            if value != -1:
                return int(value)
            log.warning("Redis lost the identifiers; restoring those this node knows")
            self._ids_epoch = await self._command(self._restore)
        raise unavailable()

    def leave(self, session: Session, request: Leave) -> None:
        """Reply LEFT_CHATROOM, then announce the departure through the room's channel."""
        self._check_available()
        outcome = self.registry.leave(
            session, request.room_ref, request.join_id, written=request.written
        )
        if outcome.reply is not None:
            self.reply(session, outcome.reply)
        self._publish(outcome.events)

    def chat(self, session: Session, request: Chat) -> None:
        """Publish on the room's channel; a member that knows the room has its feed open."""
        ref = request.room_ref
        if self.registry.room(ref) is None and 0 <= ref < self._floor_room_ref:
            # A room allocated elsewhere that this node never served.
            raise ProtocolError(ErrorCode.NOT_A_MEMBER, f"not a member of room {ref}")
        self._check_available()
        outcome = self.registry.chat(
            session, request.room_ref, request.client_name, request.message
        )
        self._publish(outcome.events)

    def disconnect(self, session: Session) -> None:
        """Announce each departure, in ascending ROOM_REF order (even with Redis down: the
        events wait in the backlog, and the heartbeat's expiry covers a node that dies)."""
        self._publish(self.registry.disconnect(session).events)

    def kill_service(self, reason: str) -> None:
        """Have every node of the service stop."""
        if self._nursery is not None:
            message = f"K {self.node_id} {reason}".encode()
            self._nursery.start_soon(self._publish_control, message)

    async def _publish_control(self, message: bytes) -> None:
        with trio.move_on_after(self.settings.command_timeout):
            try:
                await self.client.spublish(self.keys.control, message)
            except FAILURES as error:
                log.warning("could not tell the other nodes to stop: %s", describe(error))

    # -- receiving -------------------------------------------------------------------------

    async def _open_feed(self, ref: int) -> Feed:
        """The room's feed, subscribing (and reading where its sequence stands) if new.

        The feed's `interest` is raised by one for the caller, to lower when done."""
        while (opening := self._opening.get(ref)) is not None:
            await opening.wait()
        feed = self._feeds.get(ref)
        if feed is not None:
            feed.interest += 1
            return feed
        channel = self.keys.channel(ref)
        feed = self._feeds[ref] = self._by_channel[channel] = Feed(ref, channel)
        self._opening[ref] = opening = trio.Event()
        feed.interest += 1  # the caller's, who must take it back
        try:
            await self._command(lambda: self.subscriber.subscribe(channel))
            seq_key = self.keys.room(ref)[0]
            epoch, seq = await self._command(lambda: self.client.hmget(seq_key, ["epoch", "seq"]))
            feed.epoch, feed.seq, feed.synced = epoch, int(seq or 0), True
        except BaseException:
            self._close_feed(feed)
            raise
        finally:
            del self._opening[ref]
            opening.set()
        self._drain_received(feed)
        return feed


async def _wait_for_redis(settings: RedisSettings) -> bool:
    """Wait until Redis answers; True if it is a cluster node. Reports trouble once, at once."""
    reported = False
    while True:
        try:
            with trio.fail_after(settings.connect_timeout):
                info = await command(settings.address, "INFO", "cluster")
        except (OSError, trio.TooSlowError, SubscriberLost) as error:
            if not reported:
                log.warning(
                    "Redis at %s is not reachable (%s); retrying every %g s",
                    settings.url,
                    describe(error),
                    settings.retry_max,
                )
                reported = True
            await trio.sleep(settings.retry_max)
            continue
        if reported:
            log.info("Redis at %s reached", settings.url)
        return isinstance(info, bytes) and b"cluster_enabled:1" in info
