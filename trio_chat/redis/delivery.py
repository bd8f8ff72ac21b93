"""Delivery on one node: a room's events applied in the room's order, a connection's in its own.

Each room this node serves has a `Feed` (feed.py). Messages from the room's channel are taken
in sequence; a gap, or a subscription renewed after a loss, is filled from the room's log
(`_catch_up`); what Redis no longer has is skipped, and this node's own requests among it end
as if refused (a JOIN gets error 6 instead of JOINED).

This node's own events are applied only when they come back from their room's channel, and
an own event is held (with everything behind it in its room) until the events its connection
caused earlier, in other rooms, are applied: so a client sees the effects of its requests in
request order across rooms. Replies wait the same way (`reply`, `then`). No cycle can form:
a node publishes its batches one after another, so the earliest own event not yet applied is
always at the front of its room, behind nothing but other nodes' events.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable
from typing import Any

import anyio
import attrs
import coredis
import coredis.exceptions
import trio

from trio_chat import protocol
from trio_chat.protocol import ErrorCode, ProtocolError
from trio_chat.redis import scripts
from trio_chat.redis.feed import JOIN, LEAVE, Feed, Frame, Message
from trio_chat.redis.settings import RedisSettings
from trio_chat.redis.subscriber import Subscriber, SubscriberLost
from trio_chat.rooms import Registry, RoomEvent, Session

log = logging.getLogger("trio_chat.redis")

# What a failed Redis call raises: the client's errors, the socket's, our own deadline, and
# anyio's stream errors when a connection is closed under the client.
FAILURES = (
    coredis.exceptions.RedisError,
    OSError,
    trio.TooSlowError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    SubscriberLost,
)


def describe(error: BaseException) -> str:
    """A short reason for a log line."""
    if isinstance(error, trio.TooSlowError):
        return "no answer in time"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def unavailable() -> ProtocolError:
    """Error 6."""
    return ProtocolError(ErrorCode.UNAVAILABLE, "service temporarily unavailable, try again")


@attrs.define(eq=False)
class OwnEvent:
    """One of this node's events on its way through Redis."""

    token: int
    session: Session
    room_ref: int
    frame: Frame
    welcome: bytes | None = None
    record: tuple[str, bytes] | None = None  # membership record the event sets
    forget: str | None = None  # or deletes
    confirmed: tuple[bytes, int] | None = None  # (epoch, seq) once Redis took it
    published: float = 0.0  # trio time when it was queued for Redis (for metrics)


class Delivery:
    """The receiving half of `RedisBroker` (which holds these attributes)."""

    settings: RedisSettings
    client: Any
    registry: Registry
    node_id: str
    keys: scripts.Keys
    subscriber: Subscriber
    on_kill: Callable[[str], None]
    on_round_trip: Callable[[float], None]
    _feeds: dict[int, Feed]
    _by_channel: dict[str, Feed]
    _opening: dict[int, trio.Event]
    _held: set[Feed]
    _session_ids: dict[Session, int]
    _own: dict[int, OwnEvent]
    _pending: dict[Session, collections.deque[int]]
    _deferred: dict[Session, list[tuple[int, Callable[[], None]]]]
    _released: set[Session]
    _nursery: trio.Nursery | None
    messages_received: int
    events_applied: int

    def reply(self, session: Session, data: bytes) -> None:
        """Send `data` to `session` once every event it caused before is applied."""
        self.then(session, functools.partial(session.recipient.push, data))

    def then(self, session: Session, action: Callable[[], None]) -> None:
        """Call `action` once every event `session` caused before is applied."""
        pending = self._pending.get(session)
        if not pending:
            action()
        else:
            self._deferred.setdefault(session, []).append((pending[-1], action))

    def release(self, session: Session) -> None:
        """The connection of `session` has ended: forget it once its own events are back."""
        self._released.add(session)
        self._forget_if_settled(session)

    def _forget_if_settled(self, session: Session) -> None:
        if session in self._released and not self._pending.get(session):
            self._released.discard(session)
            self._pending.pop(session, None)
            self._deferred.pop(session, None)
            self._session_ids.pop(session, None)

    def _close_feed(self, feed: Feed) -> None:
        self._feeds.pop(feed.ref, None)
        self._by_channel.pop(feed.channel, None)
        self._held.discard(feed)
        self.subscriber.unsubscribe(feed.channel)

    def _maybe_close(self, feed: Feed) -> None:
        room = self.registry.room(feed.ref)
        if self._feeds.get(feed.ref) is not feed or feed.ref in self._opening:
            return
        if feed.interest == 0 and (room is None or not room.members):
            self._close_feed(feed)

    def _on_message(self, channel: str, data: bytes) -> None:
        if channel == self.keys.control:
            kind, _, rest = data.partition(b" ")
            if kind == b"K":
                node, _, reason = rest.decode(errors="replace").partition(" ")
                self.on_kill(f"{reason} (node {node})")
            return
        feed = self._by_channel.get(channel)
        if feed is None:
            return
        self.messages_received += 1
        try:
            message = Message.decode(data)
        except ValueError:
            log.warning("ignoring a malformed message on %s", channel)
            return
        feed.received.append(message)
        if feed.synced and not feed.syncing:
            self._drain_received(feed)

    def _on_subscribed(self, channel: str) -> None:
        feed = self._by_channel.get(channel)
        if feed is not None and feed.synced and not feed.syncing and self._nursery is not None:
            feed.syncing = True
            self._nursery.start_soon(self._catch_up, feed)

    def _on_lost(self, channel: str) -> None:
        """Nothing to do until the subscription is back: then the log fills the gap."""

    def _drain_received(self, feed: Feed) -> None:
        """Take the received messages that follow on; start filling a gap if one shows."""
        received, feed.received = feed.received, []
        for index, message in enumerate(received):
            if not feed.accept(message):
                feed.received = received[index:]
                if not feed.syncing and self._nursery is not None:
                    feed.syncing = True
                    self._nursery.start_soon(self._catch_up, feed)
                break
        self._apply_ready(feed)

    async def _catch_up(self, feed: Feed) -> None:
        """Read what the feed missed from the room's log, then go on with the channel."""
        delay = self.settings.retry_initial
        seq_key, log_key, _members = self.keys.room(feed.ref)
        while self._feeds.get(feed.ref) is feed:
            try:
                with trio.fail_after(self.settings.command_timeout):
                    epoch = await self.client.hget(seq_key, "epoch")
                    start = f"{feed.seq + 1}-0" if epoch == feed.epoch else "-"
                    entries = await self.client.xrange(log_key, start, "+")
            except FAILURES as error:
                log.debug("catching up room %d failed: %r", feed.ref, error)
                await trio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max)
                continue
            logged = [Message.decode(bytes(entry.field_values[b"m"])) for entry in entries]
            self._skip_lost(feed, logged[0] if logged else None, epoch)
            for message in logged:
                feed.accept(message)
            feed.syncing = False
            self._drain_received(feed)
            return

    def _skip_lost(self, feed: Feed, first: Message | None, epoch: bytes | None) -> None:
        """Before applying the log from `first` on: give up on what Redis no longer has."""
        new_epoch: bytes | None
        if first is not None:
            new_epoch, next_seq = first.epoch, first.seq
        else:
            new_epoch, next_seq = epoch, feed.seq + 1 if epoch == feed.epoch else 1
        if new_epoch is None:
            return  # the room has no sequence yet
        if new_epoch == feed.epoch:
            if next_seq <= feed.seq + 1:
                return
            lost = True
        else:
            lost = feed.epoch is not None or next_seq > 1
            feed.epoch, feed.origins = new_epoch, {}
        feed.seq = next_seq - 1
        if not lost:
            return
        log.warning("room %d: Redis no longer has some of its events; skipping them", feed.ref)
        for own in sorted(self._own.values(), key=lambda own: own.token):
            if own.room_ref == feed.ref and own.confirmed is not None:
                own_epoch, own_seq = own.confirmed
                if own_epoch != feed.epoch or own_seq <= feed.seq:
                    self._lose(own)

    def _lose(self, own: OwnEvent) -> None:
        """An own event Redis took but lost: its request ends as if refused (error 6)."""
        session = own.session
        if own.frame.kind == JOIN:
            session.rooms.pop(own.room_ref, None)
            session.recipient.push(protocol.encode_error(unavailable()))
        elif own.frame.kind == LEAVE:
            room = self.registry.room(own.room_ref)
            if room is not None:
                room.members.pop(session.recipient, None)
        self._settle(own)

    def evict_all(self) -> None:
        """The other nodes took this one for dead and announced its members as gone: end
        every membership here too, and tell each connection concerned (error 6), so that
        no one chats on in a room where the others believe them gone."""
        error = protocol.encode_error(
            ProtocolError(
                ErrorCode.UNAVAILABLE,
                "this server was cut off from the service and your rooms were left; join again",
            )
        )
        evicted = 0
        for session in list(self._session_ids):
            if not session.rooms:
                continue
            for ref in session.rooms:
                room = self.registry.room(ref)
                if room is not None:
                    room.members.pop(session.recipient, None)
            session.rooms.clear()
            session.recipient.push(error)
            evicted += 1
        log.warning(
            "this node was taken for dead while cut off; %d connections left their rooms",
            evicted,
        )
        for feed in list(self._feeds.values()):
            self._maybe_close(feed)

    def _apply_ready(self, feed: Feed) -> None:
        """Apply the feed's events in order, holding at an own event whose turn has not come."""
        todo = [feed]
        while todo:
            feed = todo.pop()
            self._held.discard(feed)
            progressed = False
            me = self.node_id.encode()
            while feed.ready:
                origin, frame = feed.ready[0]
                own = self._own.get(frame.token) if origin == me else None
                if own is not None and self._pending[own.session][0] != own.token:
                    self._held.add(feed)
                    break
                feed.ready.popleft()
                self._apply(feed, frame, own)
                progressed |= own is not None
            if progressed and self._held:
                todo.extend(self._held)
                self._held.clear()
            if self._feeds.get(feed.ref) is feed:
                self._maybe_close(feed)

    def _apply(self, feed: Feed, frame: Frame, own: OwnEvent | None) -> None:
        self.events_applied += 1
        ref = feed.ref
        if own is None:
            self.registry.apply(RoomEvent(ref, frame.data))
            return
        session = own.session
        if frame.kind == JOIN:
            event = RoomEvent(ref, frame.data, joining=session, welcome=own.welcome)
        elif frame.kind == LEAVE:
            event = RoomEvent(ref, frame.data, leaving=session)
        else:
            event = RoomEvent(ref, frame.data, sender=session)
        self.registry.apply(event)
        self.on_round_trip(trio.current_time() - own.published)
        self._settle(own)

    def _settle(self, own: OwnEvent) -> None:
        """`own` is applied (or lost): release what waited for it."""
        del self._own[own.token]
        session = own.session
        pending = self._pending[session]
        pending.remove(own.token)
        feed = self._feeds.get(own.room_ref)
        if feed is not None:
            feed.interest -= 1
        deferred = self._deferred.get(session)
        while deferred and (not pending or deferred[0][0] < pending[0]):
            deferred.pop(0)[1]()
        self._forget_if_settled(session)
