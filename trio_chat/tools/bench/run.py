"""The measured phase of a run: senders pump messages, as fast as a window allows or on a
schedule, while every member's deliveries are checked as they arrive; then the teardown.

A load generator must cost less per delivery than the server it measures, so the measured
phase is one plain ``epoll`` loop over non-blocking sockets rather than a trio task per
connection (a task wake-up per received chunk would cost as much as the server's whole
fan-out), and receivers check whole chunks with a few C-level byte operations (`checking`).
Latency is the time from a message's send to its arrival at each member; send times are
recorded per message by the sender and matched to arrivals after the run.
"""

from __future__ import annotations

import array
import gc
import math
import resource
import socket
import time

from attrs import define, field

from trio_chat.tools.bench.checking import Checker
from trio_chat.tools.bench.load import BenchError, Digits, Load, message
from trio_chat.tools.bench.members import (
    CLOSED,
    CONNECTING,
    READY,
    RECEIVE_SIZE,
    Conn,
    Members,
    Poller,
    Sender,
)
from trio_chat.tools.bench.setup import SETUP_TIMEOUT, Setup
from trio_chat.tools.bench.statistics import Progress, Result, Status, percentiles

RUN_TIMEOUT = 60.0
"""Seconds allowed for the measured phase."""
IDLE_TIMEOUT = 10.0
"""End the measured phase early after this long without a single delivery: the server has
stopped delivering and waiting longer tells nothing more."""
TEARDOWN_GRACE = 2.0
"""Seconds to wait for the server to close connections after DISCONNECT (the server's own
disconnect grace is 2 s)."""
SEND_BUFFER_LIMIT = 1024 * 1024
"""A sender stops producing while this many of its bytes are still unsent locally."""
PACED_MAX_EVENTS = 32
"""Socket events handled between two looks at the send schedule in a paced run."""


@define(eq=False)
class Run:
    """The measured phase of one run over members already set up, and its teardown."""

    load: Load
    digits: Digits
    members: Members
    checker: Checker
    status: Status
    run_timeout: float
    idle_timeout: float
    arrivals: list[tuple[int, int, int, int]] = field(factory=list)
    """(arrival time ns, global sender, first seq, count) for each checked run of messages."""
    send_lag: array.array[int] = field(factory=lambda: array.array("q"))
    receive_buffer: bytearray = field(factory=lambda: bytearray(RECEIVE_SIZE))
    receive_view: memoryview = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.receive_view = memoryview(self.receive_buffer)

    @property
    def result(self) -> Result:
        """What the run measures."""
        return self.members.result

    def measure(self) -> None:
        load = self.load
        result = self.result
        expected = load.expected
        window = load.window or math.inf
        rate = load.rate
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter_ns()
        start_s = time.monotonic()
        last_delivery = start
        for sender in self.members.senders:
            sender.offset = sender.number / (rate * len(self.members.senders)) if rate else 0.0
        ready = list(self.members.senders)  # capacity mode: senders whose window may have opened
        by_fd = self.members.by_fd
        receive = self._receive
        poll = self.members.poller.poll
        deadline = start_s + self.run_timeout
        idle_until = start_s + self.idle_timeout
        delivered = 0
        # Paced runs take fewer events per wake-up so that due sends are not held back
        # behind a long batch of reads.
        max_events = PACED_MAX_EVENTS if rate else -1
        while delivered < expected:
            now_s = time.monotonic()
            if now_s > deadline or now_s > idle_until:
                result.timed_out = True
                result.note(
                    f"no delivery for {self.idle_timeout:g} s"
                    if now_s > idle_until
                    else f"run timed out after {self.run_timeout:g} s"
                )
                break
            timeout = min(deadline, idle_until) - now_s
            if rate:
                elapsed = (time.perf_counter_ns() - start) / 1e9
                for sender in self.members.senders:
                    due = self._pump_paced(sender, start, elapsed, window)
                    if due is not None:
                        timeout = min(timeout, due - elapsed)
            elif ready:
                for sender in ready:
                    self._pump(sender, window)
                ready.clear()
            for fd, events in poll(timeout, max_events):
                conn = by_fd[fd]
                if events & Poller.OUT and conn.out:
                    self.members.flush(conn)
                    if not conn.out and conn.pump is not None and not rate:
                        ready.append(conn.pump)
                if conn.state == READY:
                    acked = receive(conn)
                    if acked and not rate:
                        # Send at once rather than after the rest of this batch of events:
                        # the window is the server's work in flight; keep it full.
                        first = conn.room.index * load.senders
                        for s in acked:
                            self._pump(self.members.senders[first + s], window)
            if result.delivered != delivered:
                delivered = result.delivered
                last_delivery = time.perf_counter_ns()
                idle_until = time.monotonic() + self.idle_timeout
            if self.status.due():
                self.status.show(
                    f"{delivered:,}/{expected:,} deliveries "
                    f"({delivered / max(1e-9, (last_delivery - start) / 1e9):,.0f}/s)"
                )
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        elapsed_all = max(1e-9, time.monotonic() - start_s)
        result.wall_s = (last_delivery - start) / 1e9
        result.cpu_util = (
            usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime
        ) / elapsed_all

    def _pump(self, sender: Sender, window: float) -> None:
        conn = sender.conn
        if conn.state != READY:
            return
        messages = self.load.messages
        chunk = []
        now = time.perf_counter_ns()
        seq = sender.next_seq
        limit = min(messages, sender.acked + window)
        while seq < limit and len(conn.out) < SEND_BUFFER_LIMIT:
            chunk.append(self._frame(sender, seq))
            sender.sent_at.append(now)
            seq += 1
        if chunk:
            self.result.sent += seq - sender.next_seq
            sender.next_seq = seq
            self.members.send(conn, b"".join(chunk))

    def _pump_paced(
        self, sender: Sender, start: int, elapsed: float, window: float
    ) -> float | None:
        """Send what is due; return when the next message is due (None: nothing more)."""
        conn = sender.conn
        load = self.load
        if conn.state != READY or sender.next_seq >= load.messages:
            return None
        chunk = []
        now = time.perf_counter_ns()
        seq = sender.next_seq
        while seq < load.messages and seq - sender.acked < window:
            due = sender.offset + seq / load.rate
            if due > elapsed:
                break
            chunk.append(self._frame(sender, seq))
            sender.sent_at.append(now)
            self.send_lag.append(now - start - int(due * 1e9))
            seq += 1
        if chunk:
            self.result.sent += seq - sender.next_seq
            sender.next_seq = seq
            self.members.send(conn, b"".join(chunk))
        if seq >= load.messages:
            return None
        return sender.offset + seq / load.rate

    def _frame(self, sender: Sender, seq: int) -> bytes:
        return sender.prefix + message(self.digits, self.load, sender.conn.sender, seq) + b"\n\n"

    def _receive(self, conn: Conn) -> list[int]:
        """Read and check what arrived; the room's senders acknowledged if this is member 0."""
        try:
            # Into one buffer allocated once: a fresh 256 KiB object per receive would be
            # mapped and unmapped by the allocator every time.
            size = conn.sock.recv_into(self.receive_buffer)
        except BlockingIOError:
            return []
        except OSError as error:
            self.members.lost(conn, error.strerror or "receive failed")
            return []
        if not size:
            self.members.lost(conn, "the server closed the connection")
            return []
        now = time.perf_counter_ns()
        runs = self.checker.check(conn, self.receive_view[:size])
        room = conn.room
        result = self.result
        first = room.index * self.load.senders
        acked = []
        for sender, start, n in runs:
            if sender == conn.sender:
                result.self_echoes += n
                continue
            result.delivered += n
            self.arrivals.append((now, first + sender, start, n))
            if conn.index == room.index * self.load.members:  # member 0 acknowledges
                pump = self.members.senders[first + sender]
                pump.acked = max(pump.acked, start + n)
                acked.append(sender)
        return acked

    def teardown(self) -> None:
        """Say DISCONNECT on every connection and wait, briefly, for the server to close."""
        members = self.members
        open_conns = [c for c in members.conns if c.state not in (CLOSED, CONNECTING)]
        for conn in open_conns:
            conn.out.clear()
            try:
                conn.sock.send(f"DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: {conn.name}\n".encode())
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                members.close(conn)
                continue
            members.poller.modify(conn.sock.fileno(), Poller.IN)
        remaining = sum(1 for c in open_conns if c.state != CLOSED)
        deadline = time.monotonic() + TEARDOWN_GRACE
        while remaining and time.monotonic() < deadline:
            for fd, _ in members.poller.poll(min(0.1, deadline - time.monotonic())):
                conn = members.by_fd[fd]
                try:
                    data = conn.sock.recv(RECEIVE_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data and conn.state != CLOSED:
                    members.close(conn)
                    remaining -= 1
        members.close_all()

    def latencies(self) -> None:
        """Turn send times and arrival runs into latency percentiles (microseconds)."""
        samples = array.array("q")
        for arrived, sender, start, n in self.arrivals:
            sent = self.members.senders[sender].sent_at[start : start + n]
            samples.extend(map(arrived.__sub__, sent))
        self.result.latency_us = percentiles(samples)
        if self.send_lag:
            self.result.send_lag_us = percentiles(self.send_lag)


def run_load(
    host: str,
    port: int,
    load: Load,
    *,
    scenario: str = "custom",
    progress: Progress | None = None,
    setup_timeout: float = SETUP_TIMEOUT,
    run_timeout: float = RUN_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
) -> Result:
    """Run `load` against the server at `host`:`port` and return what it measured.

    Blocking: it runs its own event loop (from trio, call it in a thread). Raises
    `BenchError` when the run cannot be set up; wrong deliveries are counted, not raised.
    """
    problem = load.problem()
    if problem is not None:
        raise BenchError(problem)
    result = Result(scenario=scenario, load=load)
    status = Status(scenario, progress)
    digits = Digits.for_load(load)
    members = Members(result)
    run = Run(
        load, digits, members, Checker(load, digits, result), status, run_timeout, idle_timeout
    )
    try:
        started = time.monotonic()
        Setup(host, port, load, digits, members, status, setup_timeout).run()
        result.setup_s = time.monotonic() - started
        status.show("setup done; sending")
        # A collection pass over the arrival records would pause the loop and show up as
        # latency that is not the server's.
        gc.disable()
        try:
            run.measure()
        finally:
            gc.enable()
        status.show("done; disconnecting")
        run.teardown()
    finally:
        members.close_all()
    run.latencies()
    return result
