"""The Redis broker: several trio-chat processes serving one set of rooms.

Redis is the shared bus and the counter store, in the manner of Socket.IO's Redis adapter:
every node publishes its rooms' events on one channel and applies every event it receives in
the order Redis delivers them. Redis delivers a channel's messages to every subscriber in one
order, so every member on every node sees each room's broadcasts in the same order; a node's
own events take the same path, so they are ordered with everyone else's.

Identifiers: a room's ROOM_REF and a connection's JOIN_ID come from atomic Lua scripts over
Redis counters. Every node also learns every room from the join events on the bus, so a room
name it knows costs no round trip, and after a Redis restart that lost the counters (detected
by the epoch key changing) the nodes put back what they know and never reuse an identifier.

Failure: while Redis cannot be reached, requests that need it get error 6 and the subscriber
reconnects with backoff. Each node renews a heartbeat key with an expiry and keeps a hash of its
memberships; when a node's heartbeat expires, another node announces its members' departures.
"""

from __future__ import annotations

import collections
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

from trio_chat import protocol
from trio_chat.protocol import ErrorCode, ProtocolError
from trio_chat.rooms import Outcome, Registry, RoomEvent, Session

log = logging.getLogger("trio_chat.redis")

# What a failed Redis call raises: the client's errors, the socket's, our own deadline, and
# anyio's stream errors when a connection is closed under the client (as on shutdown).
_REDIS_FAILURES = (
    coredis.exceptions.RedisError,
    OSError,
    trio.TooSlowError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)


@attrs.frozen(kw_only=True)
class RedisSettings:
    """How a node uses Redis. Timeouts are in seconds."""

    url: str
    """Where Redis is: ``redis://HOST:PORT/DB``."""
    prefix: str = "trio-chat"
    """Namespace of every key and of the channel, so services can share one Redis."""
    command_timeout: float = 2.0
    """Longest wait for one Redis reply before Redis counts as down: long enough for a
    loaded Redis on a busy machine, short enough that a JOIN gets error 6 promptly."""
    heartbeat_interval: float = 1.0
    """How often a node renews its heartbeat key and looks for dead nodes."""
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


# The ROOM_REF of a room name, allocated on first use. ARGV: name, epoch, the lowest ROOM_REF
# this node may be given (one past the highest it has seen). -1 when the epoch is not the
# node's: Redis lost its data and the node must restore what it knows first.
_ROOM_REF_SCRIPT = """
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return -1 end
local ref = redis.call('HGET', KEYS[1], ARGV[1])
if ref then return tonumber(ref) end
ref = redis.call('INCR', KEYS[2]) - 1
if ref < tonumber(ARGV[3]) then
  ref = tonumber(ARGV[3])
  redis.call('SET', KEYS[2], ref + 1)
end
redis.call('HSET', KEYS[1], ARGV[1], ref)
return ref
"""

# A new JOIN_ID, never below ARGV[2]; -1 on an epoch mismatch as above.
_JOIN_ID_SCRIPT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local id = redis.call('INCR', KEYS[1]) - 1
if id < tonumber(ARGV[2]) then
  id = tonumber(ARGV[2])
  redis.call('SET', KEYS[1], id + 1)
end
return id
"""

# Restores a Redis that lost its data (or starts a new one): the epoch, the counters' floors,
# then the room names (ARGV[4..], name/ref pairs). Every node runs it with what it knows.
_RESTORE_SCRIPT = """
redis.call('SET', KEYS[3], ARGV[1], 'NX')
for i = 1, 2 do
  local floor = tonumber(ARGV[1 + i])
  if tonumber(redis.call('GET', KEYS[i]) or '0') < floor then
    redis.call('SET', KEYS[i], floor)
  end
end
for i = 4, #ARGV, 2 do redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[i + 1]) end
return redis.call('GET', KEYS[3])
"""

# Publishes a batch of events (ARGV[2]) on the channel (ARGV[1]) and updates this node's
# membership records (KEYS[1]) to match: ARGV[3] values of field/name pairs to set, then the
# fields to delete. Atomic, so the records never disagree with what the bus has carried.
_PUBLISH_SCRIPT = """
local n = tonumber(ARGV[3])
for i = 4, 3 + n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 4 + n, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"""

# Claims a dead node: only the node whose SREM succeeds announces the departures.
_REAP_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return false end
local members = redis.call('HGETALL', KEYS[3])
redis.call('DEL', KEYS[3])
return members
"""

_JOIN, _LEAVE, _CHAT, _KILL = b"J", b"L", b"C", b"K"


@attrs.frozen
class _Frame:
    """One event on the bus. `session` is the origin node's own number for the connection;
    `name` is the room's name in a join (so every node learns every room), else a note."""

    kind: bytes
    origin: bytes
    session: int
    room_ref: int
    join_id: int
    name: str
    data: bytes

    def encode(self) -> bytes:
        """A header line of numbers and sizes, then the name and the data."""
        name = self.name.encode()
        header = b"%s %s %d %d %d %d %d\n" % (
            self.kind,
            self.origin,
            self.session,
            self.room_ref,
            self.join_id,
            len(name),
            len(self.data),
        )
        return header + name + self.data


def _decode_frames(payload: bytes) -> Iterator[_Frame]:
    start = 0
    while start < len(payload):
        end = payload.index(b"\n", start)
        kind, origin, session, ref, join_id, name_size, data_size = payload[start:end].split(b" ")
        name_end = end + 1 + int(name_size)
        data_end = name_end + int(data_size)
        name = payload[end + 1 : name_end].decode()
        data = payload[name_end:data_end]
        yield _Frame(kind, origin, int(session), int(ref), int(join_id), name, data)
        start = data_end


@attrs.frozen
class _Outgoing:
    """An event waiting for the bus, with the membership record it sets or deletes."""

    frame: bytes
    record: tuple[str, str] | None = None
    forget: str | None = None


def _unavailable() -> ProtocolError:
    return ProtocolError(ErrorCode.UNAVAILABLE, "service temporarily unavailable, try again")


@attrs.define(eq=False)
class RedisBroker:
    """One node of a service whose rooms are shared through Redis (see the module docs)."""

    settings: RedisSettings
    client: coredis.Redis[bytes]
    registry: Registry = attrs.field(factory=Registry)
    on_kill: Callable[[str], None] = attrs.field(default=lambda reason: None)
    """Called when any node of the service receives KILL_SERVICE."""
    node_id: bytes = attrs.field(factory=lambda: secrets.token_hex(6).encode())
    available: bool = False
    _epoch: bytes = b""
    _sessions: dict[int, Session] = attrs.field(factory=dict)
    _session_ids: dict[Session, int] = attrs.field(factory=dict)
    _next_session: int = 0
    # Per session: events published and events back from the bus (applied), and the replies
    # waiting for the events published before them: (events that must be applied, reply).
    _published: dict[int, int] = attrs.field(factory=dict)
    _applied: dict[int, int] = attrs.field(factory=dict)
    _deferred: dict[int, list[tuple[int, Callable[[], None]]]] = attrs.field(factory=dict)
    # JOINED replies of own joins on their way through the bus, in publishing order.
    _welcomes: dict[int, collections.deque[bytes | None]] = attrs.field(factory=dict)
    _released: set[int] = attrs.field(factory=set)  # sessions whose connection has ended
    _floor_room_ref: int = 0  # one past the highest ROOM_REF seen
    _floor_join_id: int = 0  # one past the highest JOIN_ID seen
    _backlog: list[_Outgoing] = attrs.field(factory=list)
    _backlog_ready: trio.Event = attrs.field(factory=trio.Event)
    _lost: trio.Event = attrs.field(factory=trio.Event)  # set when Redis stops answering
    _availability_changed: trio.Event = attrs.field(factory=trio.Event)

    def _key(self, *parts: str | bytes) -> str:
        names = (part.decode() if isinstance(part, bytes) else part for part in parts)
        return ":".join([self.settings.prefix, *names])

    @property
    def channel(self) -> str:
        """The one channel every node publishes to and subscribes to."""
        return self._key("events")

    # -- running ---------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(cls, settings: RedisSettings) -> AsyncIterator[RedisBroker]:
        """Run a node for the duration of the context: subscribe, heartbeat, publish.

        Waits until Redis has been reached once, so a node never starts serving clients it
        cannot give identifiers to; after that, outages are survived and retried.
        """
        client: coredis.Redis[bytes] = coredis.Redis.from_url(
            settings.url,
            decode_responses=False,
            retry_policy=NoRetryPolicy(),
            connect_timeout=settings.command_timeout,
            stream_timeout=settings.command_timeout,
        )
        broker = cls(settings, client)
        try:
            async with client, trio.open_nursery() as nursery:
                await nursery.start(broker._subscribe)
                nursery.start_soon(broker._keep_alive)
                nursery.start_soon(broker._publish_backlog)
                try:
                    yield broker
                finally:
                    nursery.cancel_scope.cancel()
                    with trio.move_on_after(settings.command_timeout) as cleanup:
                        cleanup.shield = True
                        await broker._leave_cluster()
        except* (anyio.ClosedResourceError, anyio.BrokenResourceError):
            # When the process is cancelled as a whole (a signal), coredis may still try to
            # unsubscribe on the connection it has just closed. Nothing is left to clean up.
            log.debug("Redis connection closed during shutdown")

    async def _command(self, call: Callable[[], Any]) -> Any:
        """Run one Redis call; a failure marks Redis unavailable and becomes error 6."""
        if not self.available:
            raise _unavailable()
        try:
            with trio.fail_after(self.settings.command_timeout):
                return await call()
        except _REDIS_FAILURES as exc:
            self._mark_unavailable(exc)
            raise _unavailable() from exc

    def _mark_unavailable(self, exc: BaseException) -> None:
        if self.available:
            log.warning("Redis unavailable (%s); retrying", str(exc) or type(exc).__name__)
            self._set_available(False)
        self._lost.set()

    def _set_available(self, available: bool) -> None:
        self.available = available
        self._availability_changed.set()
        self._availability_changed = trio.Event()

    async def wait_available(self, available: bool = True) -> None:
        """Return once Redis is (or, with False, is not) available to this node."""
        while self.available != available:
            await self._availability_changed.wait()

    async def _subscribe(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Apply every event from the bus, in order; reconnect with backoff when Redis fails."""
        delay = self.settings.retry_initial
        while True:
            try:
                pubsub_context = self.client.pubsub(
                    channels=[self.channel], retry_policy=NoRetryPolicy()
                )
                async with pubsub_context as pubsub:
                    with trio.CancelScope() as connection_scope:
                        await self._rejoin_cluster()
                        delay = self.settings.retry_initial
                        task_status.started()
                        task_status = trio.TASK_STATUS_IGNORED
                        self._lost = trio.Event()
                        async with trio.open_nursery() as watch:
                            watch.start_soon(self._cancel_when_lost, connection_scope)
                            async for message in pubsub:
                                data = message["data"]
                                if message["type"] == "message" and isinstance(data, bytes):
                                    self._receive(data)
            except* _REDIS_FAILURES as group:
                self._mark_unavailable(group.exceptions[0])
            self._mark_unavailable(ConnectionError("subscription lost"))
            await trio.sleep(delay)
            delay = min(delay * 2, self.settings.retry_max)

    async def _cancel_when_lost(self, scope: trio.CancelScope) -> None:
        # A failed command elsewhere means the subscription is likely dead too: start over, so
        # the node rejoins (and checks the epoch) as soon as Redis answers again.
        await self._lost.wait()
        scope.cancel()

    async def _rejoin_cluster(self) -> None:
        """After (re)connecting: check the epoch, restore Redis if it lost its data, register."""
        client = self.client
        with trio.fail_after(self.settings.command_timeout):
            epoch = await client.get(self._key("epoch"))
            if epoch is None or epoch != self._epoch:
                if self._epoch:
                    log.warning("Redis lost its data; restoring the identifiers this node knows")
                epoch = await self._restore()
            self._epoch = epoch
            await self._heartbeat()
            await self._record_memberships()
        self._set_available(True)
        log.info("Redis available; this node is %s", self.node_id.decode())

    async def _restore(self) -> bytes:
        pairs: list[str | int] = []
        for name, ref in self.registry.room_names():
            pairs += [name, ref]
        script = self.client.register_script(_RESTORE_SCRIPT)
        epoch: bytes = await script(
            keys=[
                self._key("room-ref"),
                self._key("join-id"),
                self._key("epoch"),
                self._key("rooms"),
            ],
            args=[secrets.token_hex(8), self._floor_room_ref, self._floor_join_id, *pairs],
        )
        assert isinstance(epoch, bytes)
        return epoch

    async def _record_memberships(self) -> None:
        """Write this node's memberships afresh, so they are announced if the node dies."""
        key = self._key("members", self.node_id)
        memberships = {
            f"{session_id}:{ref}": name
            for session, session_id in self._session_ids.items()
            for ref, name in session.rooms.items()
        }
        await self.client.delete([key])
        if memberships:
            await self.client.hset(key, memberships)

    async def _heartbeat(self) -> None:
        # The heartbeat key first: a node listed without one may be reaped as dead. Listing
        # it on every beat puts it back if it was reaped while cut off from Redis.
        ttl_ms = int(self.settings.heartbeat_ttl * 1000)
        await self.client.set(self._key("node", self.node_id), b"1", px=ttl_ms)
        await self.client.sadd(self._key("nodes"), [self.node_id])

    async def _keep_alive(self) -> None:
        """Renew the heartbeat and announce the departures of nodes whose heartbeat expired."""
        while True:
            await trio.sleep(self.settings.heartbeat_interval)
            if not self.available:
                continue
            try:
                await self._command(self._heartbeat)
                await self._command(self._reap_dead_nodes)
            except ProtocolError:
                pass  # marked unavailable: the subscriber reconnects and rejoins

    async def _reap_dead_nodes(self) -> None:
        nodes = await self.client.smembers(self._key("nodes"))
        script = self.client.register_script(_REAP_SCRIPT)
        for node in sorted(nodes):
            if node == self.node_id:
                continue
            claimed: list[bytes] | None = await script(
                keys=[self._key("nodes"), self._key("node", node), self._key("members", node)],
                args=[node],
            )
            if not claimed:
                continue
            departures: list[tuple[int, int, str]] = []
            for field, name in zip(claimed[::2], claimed[1::2], strict=True):
                session, ref = field.split(b":")
                departures.append((int(session), int(ref), name.decode()))
            departures.sort()
            log.warning("node %s is gone; announcing %d departures", node.decode(), len(departures))
            frames = b"".join(
                _Frame(
                    _LEAVE, node, session, ref, -1, "", protocol.encode_left_announcement(ref, name)
                ).encode()
                for session, ref, name in departures
            )
            if frames:
                await self.client.publish(self.channel, frames)

    async def _leave_cluster(self) -> None:
        """On a clean stop: publish what is queued, then remove this node from Redis."""
        if not self.available:
            return
        try:
            frames = b"".join(item.frame for item in self._backlog)
            self._backlog.clear()
            if frames:
                await self.client.publish(self.channel, frames)
            await self.client.srem(self._key("nodes"), [self.node_id])
            await self.client.delete(
                [self._key("node", self.node_id), self._key("members", self.node_id)]
            )
        except _REDIS_FAILURES:
            log.warning("Redis unavailable while leaving; other nodes will notice the expiry")

    # -- the Broker interface --------------------------------------------------------------

    def check_available(self) -> None:
        """Raise error 6 unless requests that need Redis can be served now."""
        if not self.available or len(self._backlog) >= self.settings.max_backlog:
            raise _unavailable()

    async def join(
        self,
        session: Session,
        room_name: str,
        client_name: str,
        *,
        server_ip: str,
        server_port: int,
    ) -> Outcome:
        """Join `room_name` with identifiers from Redis (or those the node already knows)."""
        self.check_available()
        self.registry.check_room_limit(session, room_name)
        room_ref = self.registry.room_ref_for(room_name)
        if room_ref is None:
            room_ref = await self._allocate(
                _ROOM_REF_SCRIPT,
                [self._key("rooms"), self._key("room-ref"), self._key("epoch")],
                lambda epoch: [room_name, epoch, self._floor_room_ref],
            )
            self.registry.add_room(room_ref, room_name)
            self._floor_room_ref = max(self._floor_room_ref, room_ref + 1)
        if session.join_id is None:
            join_id = await self._allocate(
                _JOIN_ID_SCRIPT,
                [self._key("join-id"), self._key("epoch")],
                lambda epoch: [epoch, self._floor_join_id],
            )
            session.join_id = join_id
            self._floor_join_id = max(self._floor_join_id, join_id + 1)
        return self.registry.join(
            session, room_ref, client_name, server_ip=server_ip, server_port=server_port
        )

    async def _allocate(
        self, source: str, keys: list[str], args: Callable[[bytes], list[Any]]
    ) -> int:
        script = self.client.register_script(source)
        for _ in range(2):
            value = await self._command(lambda: script(keys=keys, args=args(self._epoch)))
            if value != -1:
                return int(value)
            log.warning("Redis lost its data; restoring the identifiers this node knows")
            self._epoch = await self._command(self._restore)
        raise _unavailable()

    def publish(self, events: Iterable[RoomEvent]) -> None:
        """Queue `events` for the bus; they are applied here when they come back from it."""
        node, backlog = self.node_id, self._backlog
        for event in events:
            ref = event.room_ref
            session = event.joining or event.leaving or event.sender
            session_id = -1 if session is None else self._session_id(session)
            if session_id >= 0:
                self._published[session_id] = self._published.get(session_id, 0) + 1
            field = f"{session_id}:{ref}"
            if session is None or event.sender is not None:
                frame = _Frame(_CHAT, node, session_id, ref, -1, "", event.data)
                backlog.append(_Outgoing(frame.encode()))
            elif event.joining is not None:
                self._welcomes.setdefault(session_id, collections.deque()).append(event.welcome)
                join_id = -1 if session.join_id is None else session.join_id
                room_name = self.registry.room_name(ref)
                frame = _Frame(_JOIN, node, session_id, ref, join_id, room_name, event.data)
                backlog.append(_Outgoing(frame.encode(), record=(field, session.rooms[ref])))
            else:
                frame = _Frame(_LEAVE, node, session_id, ref, -1, "", event.data)
                backlog.append(_Outgoing(frame.encode(), forget=field))
        self._backlog_ready.set()

    def kill_service(self, reason: str) -> None:
        """Have every node of the service stop."""
        self._backlog.append(
            _Outgoing(_Frame(_KILL, self.node_id, -1, -1, -1, reason, b"").encode())
        )
        self._backlog_ready.set()

    def reply(self, session: Session, data: bytes) -> None:
        """Send `data` to `session` once every event it published before is back."""
        session_id = self._session_ids.get(session)
        if session_id is None or self._applied.get(session_id, 0) >= self._published[session_id]:
            session.recipient.push(data)
        else:
            self.then(session, functools.partial(session.recipient.push, data))

    def then(self, session: Session, action: Callable[[], None]) -> None:
        """Call `action` once every event `session` published before is back from the bus."""
        session_id = self._session_ids.get(session)
        published = 0 if session_id is None else self._published.get(session_id, 0)
        if session_id is None or self._applied.get(session_id, 0) >= published:
            action()
        else:
            self._deferred.setdefault(session_id, []).append((published, action))

    def release(self, session: Session) -> None:
        """The connection of `session` has ended: forget it once its own events are back."""
        session_id = self._session_ids.get(session)
        if session_id is not None:
            self._released.add(session_id)
            self._forget_if_settled(session_id)

    def _session_id(self, session: Session) -> int:
        session_id = self._session_ids.get(session)
        if session_id is None:
            session_id = self._session_ids[session] = self._next_session
            self._sessions[session_id] = session
            self._next_session += 1
        return session_id

    def _settle(self, session_id: int, session: Session) -> None:
        """One of the session's own events is back: send the replies that waited for it."""
        applied = self._applied[session_id] = self._applied.get(session_id, 0) + 1
        deferred = self._deferred.get(session_id)
        while deferred and deferred[0][0] <= applied:
            deferred.pop(0)[1]()
        self._forget_if_settled(session_id)

    def _forget_if_settled(self, session_id: int) -> None:
        published = self._published.get(session_id, 0)
        if session_id in self._released and self._applied.get(session_id, 0) >= published:
            del self._session_ids[self._sessions.pop(session_id)]
            for table in (self._published, self._applied, self._deferred, self._welcomes):
                table.pop(session_id, None)
            self._released.discard(session_id)

    async def _publish_backlog(self) -> None:
        """Publish queued events in order, all that are waiting in one script call that also
        updates the membership records they change."""
        script = self.client.register_script(_PUBLISH_SCRIPT)
        while True:
            await self._backlog_ready.wait()
            self._backlog_ready = trio.Event()
            while self._backlog:
                batch = self._backlog[:]
                payload = b"".join(item.frame for item in batch)
                records: list[str] = []
                forgotten: list[str] = []
                for item in batch:
                    if item.record is not None:
                        records += item.record
                    if item.forget is not None:
                        forgotten.append(item.forget)
                keys = [self._key("members", self.node_id)]
                args: list[str | bytes | int] = [
                    self.channel,
                    payload,
                    len(records),
                    *records,
                    *forgotten,
                ]
                try:
                    await self._command(lambda: script(keys=keys, args=args))  # noqa: B023
                except ProtocolError:
                    # The bus is down: carry the events out on this node, so its members stay
                    # consistent; the other nodes learn of departures from the heartbeat expiry.
                    log.warning("Redis unavailable: %d events delivered here only", len(batch))
                    self._receive(payload)
                del self._backlog[: len(batch)]

    # -- applying events from the bus ------------------------------------------------------

    def _receive(self, payload: bytes) -> None:
        registry = self.registry
        for frame in _decode_frames(payload):
            kind, ref, data = frame.kind, frame.room_ref, frame.data
            if kind == _KILL:
                self.on_kill(f"{frame.name} (node {frame.origin.decode()})")
                continue
            own = frame.origin == self.node_id
            session = self._sessions.get(frame.session) if own else None
            if kind == _JOIN:
                registry.add_room(ref, frame.name)
                self._floor_room_ref = max(self._floor_room_ref, ref + 1)
                self._floor_join_id = max(self._floor_join_id, frame.join_id + 1)
            elif registry.room(ref) is None:
                # A room this node never heard of has no members here.
                if session is not None:
                    self._settle(frame.session, session)
                continue
            if session is None or kind == _CHAT:
                event = RoomEvent(ref, data)
            elif kind == _JOIN:
                welcome = self._welcomes[frame.session].popleft()
                event = RoomEvent(ref, data, joining=session, welcome=welcome)
            else:
                event = RoomEvent(ref, data, leaving=session)
            registry.apply(event)
            if session is not None:
                self._settle(frame.session, session)
