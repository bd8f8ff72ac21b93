"""Publishing on one node: a room's events go out in numbered batches, retried until known.

A node's events wait in a backlog; the backlog goes out one batch at a time through
`scripts.ROOMS_APPEND` (one call for a single Redis, one call per room for a cluster), which
numbers each room's part of the batch in the room's sequence. A call whose outcome is unknown
(a timeout) is sent again with the same batch numbers until Redis answers, and receivers drop
a second copy; meanwhile the node takes no new request (error 6). Batches go out one after
another so that the earliest own event not yet applied is always at the front of its room
(see delivery.py).
"""

from __future__ import annotations

import collections
import logging
import secrets
from collections.abc import Callable
from typing import Any

import trio

from trio_chat import protocol
from trio_chat.redis import scripts
from trio_chat.redis.delivery import FAILURES, Delivery, OwnEvent, describe
from trio_chat.redis.feed import CHAT, JOIN, LEAVE, Frame
from trio_chat.redis.settings import RedisSettings
from trio_chat.rooms import RoomEvent

log = logging.getLogger("trio_chat.redis")


class Publishing(Delivery):
    """The publishing half of `RedisBroker` (which holds these attributes)."""

    settings: RedisSettings
    client: Any
    keys: scripts.Keys
    node_id: str
    _next_session: int
    _next_token: int
    _backlog: list[OwnEvent]
    _backlog_ready: trio.Event
    _in_doubt: bool
    _batch_numbers: dict[int, int]
    _scripts: dict[str, Any]
    cluster: bool
    _changed: Callable[[], None]
    _mark_down: Callable[..., None]

    def _room_args(self, ref: int) -> list[str | int]:
        return [self.keys.channel(ref), secrets.token_hex(6), self.settings.log_length]

    def _publish(self, events: tuple[RoomEvent, ...]) -> None:
        """Queue `events` for their rooms' channels; they are applied when they come back."""
        now = trio.current_time()
        for event in events:
            session = event.joining or event.leaving or event.sender
            assert session is not None
            session_id = self._session_ids.get(session)
            if session_id is None:
                session_id = self._session_ids[session] = self._next_session
                self._next_session += 1
            ref = event.room_ref
            feed = self._feeds.get(ref)
            if feed is None:  # not subscribed: the session's membership was lost with Redis
                log.debug("not publishing to room %d: no member here", ref)
                continue
            feed.interest += 1
            token, self._next_token = self._next_token, self._next_token + 1
            field = f"{self.node_id}:{session_id}"
            if event.joining is not None:
                name = session.rooms[ref]
                frame = Frame(JOIN, session_id, token, name, event.data)
                leave = Frame(
                    LEAVE, session_id, 0, "", protocol.encode_left_announcement(ref, name)
                )
                own = OwnEvent(
                    token, session, ref, frame, event.welcome, record=(field, leave.encode())
                )
            elif event.leaving is not None:
                frame = Frame(LEAVE, session_id, token, "", event.data)
                own = OwnEvent(token, session, ref, frame, forget=field)
            else:
                own = OwnEvent(token, session, ref, Frame(CHAT, session_id, token, "", event.data))
            own.published = now
            self._own[token] = own
            self._pending.setdefault(session, collections.deque()).append(token)
            self._backlog.append(own)
        self._backlog_ready.set()

    async def _publish_backlog(self) -> None:
        """Publish queued events in order: one batch at a time, one script call per room."""
        while True:
            await self._backlog_ready.wait()
            self._backlog_ready = trio.Event()
            while self._backlog:
                batch, self._backlog = self._backlog, []
                await self._publish_batch(batch, retry=True)

    async def _publish_batch(self, batch: list[OwnEvent], *, retry: bool) -> None:
        """Publish one batch: one call for a single Redis, one call per room for a cluster."""
        by_room: dict[int, list[OwnEvent]] = {}
        for own in batch:
            by_room.setdefault(own.room_ref, []).append(own)
        rooms = []
        for ref, owns in by_room.items():
            number = self._batch_numbers[ref] = self._batch_numbers.get(ref, 0) + 1
            rooms.append((ref, number, owns))
        if not self.cluster:
            await self._publish_rooms(rooms, retry)
            return
        async with trio.open_nursery() as nursery:
            for room in rooms:
                nursery.start_soon(self._publish_rooms, [room], retry)

    async def _publish_rooms(
        self, rooms: list[tuple[int, int, list[OwnEvent]]], retry: bool
    ) -> None:
        """One ROOMS_APPEND call for `rooms` (ROOM_REF, batch number, events), sent again
        until Redis answers."""
        keys: list[str] = []
        args: list[str | bytes | int] = []
        member_rooms = []  # where to look for this node's members if it dies
        for ref, number, owns in rooms:
            body = b"%s %d\n" % (self.node_id.encode(), number)
            body += b"".join(own.frame.encode() for own in owns)
            records = [part for own in owns if own.record is not None for part in own.record]
            forgotten = [own.forget for own in owns if own.forget is not None]
            keys += self.keys.room(ref)
            args += [*self._room_args(ref), body, len(records), *records]
            args += [len(forgotten), *forgotten]
            if records:
                member_rooms.append(str(ref))
        delay = self.settings.retry_initial
        while True:
            try:
                with trio.fail_after(self.settings.command_timeout):
                    if member_rooms:
                        await self.client.sadd(self.keys.node_rooms(self.node_id), member_rooms)
                    replies = await self._scripts["ROOMS_APPEND"](keys=keys, args=args)
                break
            except FAILURES as error:
                if not retry:
                    raise
                # Unknown whether Redis carried it out: send it again with the same numbers
                # (receivers drop a second copy) until Redis answers. Meanwhile no new request
                # is taken, so nothing is caused that could not be delivered in order.
                if not self._in_doubt:
                    log.warning("publishing to Redis failed (%s); retrying", describe(error))
                    self._in_doubt = True
                    self._changed()
                self._mark_down(error)
                await trio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max)
        if self._in_doubt:
            self._in_doubt = False
            self._changed()
        for (_ref, _number, owns), reply in zip(rooms, replies, strict=True):
            epoch, _, seq = bytes(reply).partition(b" ")
            for own in owns:
                own.confirmed = (epoch, int(seq))
