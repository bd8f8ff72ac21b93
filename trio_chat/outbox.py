"""A client's outbound queue: bounded in bytes, filled without awaiting, flushed in batches.

Fan-out calls `Outbox.push` for every member of a room without ever awaiting, so one
broadcast costs a list append per member. What happens next decides how fast fan-out is: a
small ``send`` costs a few microseconds of kernel time and waking a task costs about as much
again in trio's scheduler, so both must be paid per batch of messages, not per message.

- On a socket, the first push into an empty outbox puts it on the run's dirty list. One
  flusher task per trio run wakes once for everything queued while the other tasks ran,
  and for each dirty outbox joins what is pending and writes it with one non-blocking
  ``os.write``. No per-client task is woken and nothing awaits. The busier the server, the
  more messages each write carries.
- When the socket cannot take everything (the client reads slowly), the rest goes to the
  connection's writer task, which waits until the socket is writable and keeps sending;
  pushes meanwhile pile up and go out together. The flusher leaves that outbox alone until
  the writer has caught up.
- Over other streams (in-memory streams in tests), the writer task sends everything.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import trio

_Abort = trio.lowlevel.Abort


class _Flusher:
    """The outboxes with bytes to write, and the one task that writes them."""

    __slots__ = ("dirty", "task")

    def __init__(self) -> None:
        self.dirty: list[Outbox] = []
        self.task: trio.lowlevel.Task | None = None  # set while it waits for work

    async def run(self) -> None:
        # A system task: it must never raise (that would crash the run), and it does not:
        # `Outbox._flush` catches every OSError.
        while True:
            if not self.dirty:
                self.task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(_abort_wait(self))
            dirty, self.dirty = self.dirty, []
            for outbox in dirty:
                outbox._flush()


def _abort_wait(flusher: _Flusher) -> Callable[[object], _Abort]:
    def abort(_: object) -> _Abort:
        flusher.task = None
        return _Abort.SUCCEEDED

    return abort


_FLUSHER: trio.lowlevel.RunVar[_Flusher] = trio.lowlevel.RunVar("trio_chat_flusher")


def _flusher() -> _Flusher:
    """This trio run's flusher, started on first use."""
    try:
        return _FLUSHER.get()
    except LookupError:
        flusher = _Flusher()
        _FLUSHER.set(flusher)
        trio.lowlevel.spawn_system_task(flusher.run, name="trio_chat.outbox flusher")
        return flusher


class Outbox:
    """Bytes waiting to be sent to one client, at most `limit` of them at a time.

    A push that would take the unsent total past `limit` drops everything, marks the outbox
    overflowed and calls `on_overflow` once: a client that does not read is cut off instead of
    holding memory or slowing anyone else down.
    """

    __slots__ = (
        "_closed",
        "_dirty",
        "_end_with_eof",
        "_fd",
        "_flusher",
        "_pending",
        "_size",
        "_torn",
        "_waiter",
        "_writing",
        "limit",
        "on_overflow",
        "overflowed",
    )

    def __init__(
        self, limit: int, on_overflow: Callable[[Outbox, int], None] | None = None
    ) -> None:
        self.limit = limit
        self.on_overflow = on_overflow
        self.overflowed = False
        self._pending: list[bytes] = []
        self._size = 0  # bytes pushed and not yet fully sent, including a write in progress
        self._closed = False
        self._end_with_eof = False
        self._waiter: trio.lowlevel.Task | None = None  # the writer, while it waits for work
        # Direct writes: the socket's descriptor while the writer runs on a socket (None
        # otherwise, and always before the socket can be closed, so a reused descriptor
        # number is never written to), this run's flusher, whether this outbox is on its
        # dirty list, and whether the writer task is in the middle of a send.
        self._fd: int | None = None
        self._flusher: _Flusher | None = None
        self._dirty = False
        self._writing = False
        self._torn = False  # a send was interrupted part-way: the stream is no longer whole

    @property
    def unsent(self) -> int:
        """Bytes accepted by `push` that have not been sent yet."""
        return self._size

    def push(self, data: bytes) -> None:
        """Queue `data` for sending, or drop it if the outbox is closed; never blocks."""
        if self._closed:
            return
        size = self._size + len(data)
        if size > self.limit:
            self.overflowed = True
            self.abandon()
            if self.on_overflow is not None:
                self.on_overflow(self, len(data))
            return
        self._size = size
        self._pending.append(data)
        if not self._dirty:
            self._mark_dirty()

    def _mark_dirty(self) -> None:
        flusher = self._flusher
        if flusher is None:
            self._wake()
            return
        self._dirty = True
        flusher.dirty.append(self)
        task = flusher.task
        if task is not None:
            flusher.task = None
            trio.lowlevel.reschedule(task)

    def close(self) -> None:
        """Accept nothing more; the writer sends what is queued, then ends the stream."""
        self._closed = True
        self._end_with_eof = True
        self._wake()

    def seal(self) -> None:
        """Accept nothing more, keeping what is queued (for `write_nowait` at shutdown)."""
        self._closed = True

    def abandon(self) -> None:
        """Accept nothing more and drop what is queued."""
        self._closed = True
        self._end_with_eof = False
        self._fd = None
        self._pending.clear()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    async def _wait(self) -> None:
        self._waiter = trio.lowlevel.current_task()

        def abort(_: object) -> _Abort:
            self._waiter = None
            return _Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _flush(self) -> None:
        """Write what is pending straight to the socket; leave the rest to the writer."""
        self._dirty = False
        pending = self._pending
        fd = self._fd
        if self._writing or not pending:
            return  # the writer is sending and takes what is pending when it is done
        if fd is None:
            self._wake()
            return
        chunk = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        try:
            sent = os.write(fd, chunk)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Broken or reset: the writer's own send raises and ends the connection.
            pending.append(chunk)
            self._wake()
            return
        self._size -= sent
        if sent < len(chunk):
            pending.append(chunk[sent:])
            self._wake()

    def write_nowait(self, stream: trio.abc.Stream) -> None:
        """One last non-blocking write of what is pending, when the writer can no longer run
        (shutdown): replies queued just before KILL_SERVICE still get their chance."""
        if self._torn or not self._pending or not isinstance(stream, trio.SocketStream):
            return
        with contextlib.suppress(OSError):
            os.write(stream.socket.fileno(), b"".join(self._pending))
        self._pending.clear()

    async def run_writer(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Send everything pushed, as it comes; after `close`, flush and send end-of-stream.

        The only task that sends on `stream` (the flusher writes for it while it is idle).
        It returns once the outbox is closed and empty (after sending EOF if it was closed,
        not abandoned) and lets the stream's errors out.
        """
        pending = self._pending
        if isinstance(stream, trio.SocketStream) and not self._closed:
            self._fd = stream.socket.fileno()
            self._flusher = _flusher()
            if pending:
                self._mark_dirty()
        try:
            while True:
                if not pending:
                    if self._closed:
                        if self._end_with_eof:
                            await stream.send_eof()
                        return
                    await self._wait()
                    continue
                chunk = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                self._writing = True
                try:
                    await stream.send_all(chunk)
                except BaseException:
                    # Part of `chunk` may have gone out: nothing after it can follow.
                    self._torn = True
                    raise
                finally:
                    self._writing = False
                self._size -= len(chunk)
        finally:
            self._fd = None
