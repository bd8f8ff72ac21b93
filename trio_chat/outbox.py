"""A client's outbound queue: bounded in bytes, filled without awaiting, drained by one writer.

Fan-out calls `Outbox.push` for every member of a room without ever awaiting, so one
broadcast costs a list append per member. The writer task, the only one that sends on the
connection, takes everything pending and sends it in one `send_all`: while it waits for the
socket, further messages pile up and go out together in the next write. One system call then
carries many messages, which is what makes fan-out fast.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

_Abort = trio.lowlevel.Abort


class Outbox:
    """Bytes waiting to be sent to one client, at most `limit` of them at a time.

    A push that would take the unsent total past `limit` drops everything, marks the outbox
    overflowed and calls `on_overflow` once: a client that does not read is cut off instead of
    holding memory or slowing anyone else down.
    """

    __slots__ = (
        "_closed",
        "_end_with_eof",
        "_pending",
        "_size",
        "_waiter",
        "limit",
        "on_overflow",
        "overflowed",
    )

    def __init__(self, limit: int, on_overflow: Callable[[Outbox], None] | None = None) -> None:
        self.limit = limit
        self.on_overflow = on_overflow
        self.overflowed = False
        self._pending: list[bytes] = []
        self._size = 0  # bytes pushed and not yet fully sent, including a write in progress
        self._closed = False
        self._end_with_eof = False
        self._waiter: trio.lowlevel.Task | None = None

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
                self.on_overflow(self)
            return
        self._size = size
        self._pending.append(data)
        self._wake()

    def close(self) -> None:
        """Accept nothing more; the writer sends what is queued, then ends the stream."""
        self._closed = True
        self._end_with_eof = True
        self._wake()

    def abandon(self) -> None:
        """Accept nothing more and drop what is queued."""
        self._closed = True
        self._end_with_eof = False
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

    async def run_writer(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Send everything pushed, as it comes; after `close`, flush and send end-of-stream.

        The only task that sends on `stream`. It returns once the outbox is closed and empty
        (after sending EOF if it was closed, not abandoned) and lets the stream's errors out.
        """
        pending = self._pending
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
            await stream.send_all(chunk)
            self._size -= len(chunk)
