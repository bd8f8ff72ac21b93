"""A client's outbound queue: bounded in bytes, filled without awaiting, flushed in batches.

Fan-out calls `Outbox.push` for every member of a room without ever awaiting, so one
broadcast costs a list append per member. What happens next decides how fast fan-out is: a
small ``send`` costs a few microseconds of kernel time and waking a task costs about as much
again in trio's scheduler, so both must be paid per batch of messages, not per message.

The connection's writer task (`Outbox.run_writer`) sends everything pending in one
`Transport.send`, waits for more, and pushes meanwhile pile up and go out together.

Direct writes
-------------
On a plain socket (the transport's `fileno` is not None, and `Config.direct_writes` is on)
most bytes do not pass through the writer task at all. The first push into an empty outbox
puts it on the run's dirty list; one flusher task per trio run wakes once for everything
queued while the other tasks ran, and for each dirty outbox joins what is pending and writes
it with one non-blocking ``os.write``. No per-client task is woken and nothing awaits; the
busier the server, the more messages each write carries. The rules that keep this safe, all
enforced in this module:

1. Bytes leave in push order and never interleave: the flusher writes only while the writer
   is not sending (`_writing`), and whatever a write leaves unsent goes back to the head of
   the pending list for the writer, which waits for the socket to become writable. The
   flusher then leaves that outbox alone until the writer has caught up.
2. The descriptor is used only while `run_writer` runs; `run_writer` forgets it before it
   returns, `abandon` forgets it at once, and a connection abandons its outbox before it
   closes its transport. So a descriptor number the kernel has reused for another socket is
   never written to. (A writer still sending when the transport closes gets an error from
   its send, nothing worse.)
3. Once a send was interrupted part-way (`_torn`), nothing more is written by anyone.
4. The flusher is a system task: it never raises. A write that fails leaves the error to the
   writer's own send; anything unexpected abandons that one outbox and is logged.
5. At shutdown, `Outbox.finish` makes one last direct write of what is pending, so replies
   queued just before KILL_SERVICE still get their chance, and closes the outbox.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import trio

from trio_chat.transport import Transport

log = logging.getLogger("trio_chat")

_Abort = trio.lowlevel.Abort


class _Flusher:
    """The outboxes with bytes to write directly, and the one task that writes them."""

    __slots__ = ("dirty", "task")

    def __init__(self) -> None:
        self.dirty: list[Outbox] = []
        self.task: trio.lowlevel.Task | None = None  # set while it waits for work

    async def run(self) -> None:
        while True:
            if not self.dirty:
                self.task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(_abort_wait(self))
            dirty, self.dirty = self.dirty, []
            for outbox in dirty:
                try:
                    outbox._flush()
                except Exception:  # a bug: it must not take the whole run down (rule 4)
                    log.exception("direct write failed; dropping that client's output")
                    outbox._fail()


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
    overflowed and calls `on_cut_off` once: a client that does not read is cut off instead of
    holding memory or slowing anyone else down. A direct write that fails unexpectedly does
    the same, with `failed` set (rule 4). An outbox ends in one of two ways: `close`
    (send what is queued, then end the output) or `abandon` (drop it).
    """

    __slots__ = (
        "_closed",
        "_dirty",
        "_end_with_eof",
        "_fd",
        "_flusher",
        "_pending",
        "_size",
        "_start_writer",
        "_torn",
        "_waiter",
        "_writing",
        "failed",
        "limit",
        "on_cut_off",
        "overflowed",
        "sent",
    )

    def __init__(self, limit: int, on_cut_off: Callable[[Outbox, int], None] | None = None) -> None:
        self.limit = limit
        self.on_cut_off = on_cut_off
        self.overflowed = False
        self.failed = False  # the flusher met an unexpected error writing for this outbox
        self.sent = 0  # bytes written so far (for metrics: counted per write, not per push)
        self._pending: list[bytes] = []
        self._size = 0  # bytes pushed and not yet fully sent, including a write in progress
        self._closed = False
        self._end_with_eof = False
        self._waiter: trio.lowlevel.Task | None = None  # the writer, while it waits for work
        # Starts the writer task the first time it is needed, when writes are direct.
        self._start_writer: Callable[[], None] | None = None
        # Direct writes (see the module docstring): the socket's descriptor while the writer
        # runs, this run's flusher, whether this outbox is on its dirty list, whether the
        # writer is in the middle of a send, and whether a send was cut off part-way.
        self._fd: int | None = None
        self._flusher: _Flusher | None = None
        self._dirty = False
        self._writing = False
        self._torn = False

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
            if self.on_cut_off is not None:
                self.on_cut_off(self, len(data))
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
        """Accept nothing more; the writer sends what is queued, then ends the output."""
        self._closed = True
        self._end_with_eof = True
        self._wake()

    def abandon(self) -> None:
        """Accept nothing more and drop what is queued; the writer returns."""
        self._start_writer = None  # a writer that has not started need not start now
        self._closed = True
        self._end_with_eof = False
        self._fd = None
        self._pending.clear()
        self._wake()

    def finish(self) -> None:
        """One last non-blocking write of what is pending, then `abandon` (at shutdown, when
        the writer will not get to run again)."""
        fd = self._fd
        if fd is not None and self._pending and not self._writing and not self._torn:
            # If the client is gone, or not reading, nothing more can be done for it.
            with contextlib.suppress(OSError):
                os.write(fd, b"".join(self._pending))
        self.abandon()

    def _fail(self) -> None:
        self.failed = True
        self.abandon()
        if self.on_cut_off is not None:
            self.on_cut_off(self, 0)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)
        elif (start := self._start_writer) is not None:
            self._start_writer = None
            start()

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
        self.sent += sent
        if sent < len(chunk):
            pending.append(chunk[sent:])
            self._wake()

    def attach(
        self, transport: Transport, *, direct: bool, start_writer: Callable[[], None]
    ) -> None:
        """Send to `transport` from now on, its writer task started by `start_writer`.

        With `direct` and a transport that offers a descriptor, the flusher writes and the
        writer is started only if it is ever needed: for what a write leaves unsent, or to
        end the output after `close` (an idle connection then costs no task). Otherwise the
        writer starts at once.
        """
        fd = transport.fileno() if direct else None
        if fd is None or self._closed:
            start_writer()
            return
        self._start_writer = start_writer
        self._write_directly(fd)

    def _write_directly(self, fd: int) -> None:
        """Let the flusher write to `fd` from now on (rules 1 and 2 of the module docstring)."""
        self._fd = fd
        self._flusher = _flusher()
        if self._pending:
            self._mark_dirty()

    async def run_writer(self, transport: Transport, *, direct: bool = True) -> None:
        """Send everything pushed, as it comes; after `close`, flush and end the output.

        The only task that sends on `transport` (the flusher writes for it while it is idle,
        see the module docstring); `direct` is for a writer that was not `attach`-ed. It
        returns once the outbox is closed and empty (after `send_eof` if it was closed, not
        abandoned) and lets the transport's errors out.
        """
        if self._fd is None and self._flusher is None:
            fd = transport.fileno() if direct else None
            if fd is not None and not self._closed:
                self._write_directly(fd)
        self._start_writer = None
        try:
            while True:
                batch = self._pending
                if not batch:
                    if self._closed:
                        if self._end_with_eof:
                            await transport.send_eof()
                        return
                    await self._wait()
                    continue
                self._pending = []
                size = sum(map(len, batch))
                self._writing = True
                try:
                    await transport.send(batch)
                except BaseException:
                    # Part of the batch may have gone out: nothing after it can follow.
                    self._torn = True
                    raise
                finally:
                    self._writing = False
                self._size -= size
                self.sent += size
        finally:
            self._fd = None
