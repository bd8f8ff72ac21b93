"""What a benchmark run measured: its counts and figures, latency percentiles, the table
for people, and the progress lines shown while it runs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from attrs import define, field

from trio_chat.tools.bench.load import Load

PROGRESS_INTERVAL = 0.25
"""Seconds between progress updates on a terminal (rewritten in place)."""
PROGRESS_LINE_INTERVAL = 1.0
"""Seconds between progress lines when stderr is not a terminal (a log, a CI job)."""


@define(kw_only=True)
class Result:
    """What one run measured."""

    scenario: str
    load: Load
    connections: int = 0
    setup_s: float = 0.0
    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    self_echoes: int = 0
    slow_frames: int = 0
    """Frames that failed the chunk-wide check and were parsed one by one (0 when all is
    well: a chunk is re-checked slowly only when something in it is wrong)."""
    corrupt: int = 0
    misrouted: int = 0
    server_errors: int = 0
    disconnects: int = 0
    sent: int = 0
    wall_s: float = 0.0
    latency_us: dict[str, float] = field(factory=dict)
    send_lag_us: dict[str, float] = field(factory=dict)
    cpu_util: float = 0.0
    timed_out: bool = False
    first_error: str = ""

    def note(self, text: str) -> None:
        """Keep `text` as the first thing that went wrong, unless something already did."""
        if not self.first_error:
            self.first_error = text

    @property
    def expected(self) -> int:
        """Deliveries a correct server makes."""
        return self.load.expected

    @property
    def lost(self) -> int:
        """Expected deliveries that never arrived."""
        return max(0, self.expected - self.delivered)

    @property
    def errors(self) -> int:
        """Corrupt or misrouted messages, server errors and dropped connections."""
        return self.corrupt + self.misrouted + self.server_errors + self.disconnects

    @property
    def ok(self) -> bool:
        """Every delivery arrived exactly once and in order, and nothing else went wrong."""
        return not (self.lost or self.errors or self.duplicates or self.out_of_order)

    @property
    def deliveries_per_s(self) -> float:
        """Deliveries over the measured window (first send to last delivery)."""
        return self.delivered / self.wall_s if self.wall_s > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        """The figures as one JSON object, with field names as fanout.c uses them."""
        load = self.load
        return {
            "scenario": self.scenario,
            "rooms": load.rooms,
            "members": load.members,
            "senders": load.senders,
            "messages": load.messages,
            "size": load.size,
            "rate": load.rate,
            "window": load.window,
            "connections": self.connections,
            "setup_s": round(self.setup_s, 6),
            "expected": self.expected,
            "delivered": self.delivered,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "errors": self.errors,
            "corrupt": self.corrupt,
            "misrouted": self.misrouted,
            "server_errors": self.server_errors,
            "disconnects": self.disconnects,
            "self_echoes": self.self_echoes,
            "slow_frames": self.slow_frames,
            "sent": self.sent,
            "wall_s": round(self.wall_s, 6),
            "deliveries_per_s": round(self.deliveries_per_s, 1),
            "latency_us": self.latency_us,
            "send_lag_us": self.send_lag_us,
            "cpu_util": round(self.cpu_util, 3),
            "timed_out": self.timed_out,
            "ok": self.ok,
            "first_error": self.first_error,
        }


def percentiles(samples: Iterable[int]) -> dict[str, float]:
    """Percentiles, maximum and mean of `samples` (nanoseconds), in microseconds."""
    ordered = sorted(samples)
    if not ordered:
        return {}

    def at(fraction: float) -> float:
        index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
        return round(ordered[index] / 1000, 1)

    return {
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p999": at(0.999),
        "max": round(ordered[-1] / 1000, 1),
        "mean": round(sum(ordered) / len(ordered) / 1000, 1),
    }


def format_table(results: list[Result]) -> str:
    """The results as a table for people."""
    lines = [
        f"{'scenario':<8} {'rooms x members':>15} {'senders':>7} {'msgs':>6} {'msgs/s':>6} "
        f"{'deliveries/s':>13} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}  result"
    ]
    for r in results:
        load = r.load
        latency = r.latency_us

        def ms(key: str, latency: dict[str, float] = latency) -> str:
            return f"{latency[key] / 1000:8.2f}" if key in latency else f"{'-':>8}"

        verdict = (
            "ok"
            if r.ok
            else f"FAIL lost {r.lost} dup {r.duplicates} reordered {r.out_of_order} "
            f"errors {r.errors}: {r.first_error}"
        )
        rate = f"{load.rate:g}" if load.rate else "max"
        lines.append(
            f"{r.scenario:<8} {f'{load.rooms} x {load.members}':>15} {load.senders:>7} "
            f"{load.messages:>6} {rate:>6} {r.deliveries_per_s:>13,.0f} {ms('p50')} "
            f"{ms('p90')} {ms('p99')} {ms('max')}  {verdict}"
        )
    return "\n".join(lines)


# -- progress ---------------------------------------------------------------------------------

Progress = Callable[[str], None]


def progress_printer(stream: TextIO, *, tty: bool) -> Progress:
    """A progress callback: one line rewritten in place on a terminal, else a line per call."""

    last = -math.inf

    def show(text: str) -> None:
        nonlocal last
        if tty:
            stream.write("\r\x1b[K" + text)
        elif time.monotonic() - last >= PROGRESS_LINE_INTERVAL:
            last = time.monotonic()
            stream.write(text + "\n")
        stream.flush()

    return show


@define(eq=False)
class Status:
    """The progress of one run, shown through a `Progress` at most every PROGRESS_INTERVAL."""

    scenario: str
    progress: Progress | None
    last: float = 0.0

    def due(self) -> bool:
        """Whether a progress update would be shown now."""
        return self.progress is not None and time.monotonic() - self.last >= PROGRESS_INTERVAL

    def show(self, text: str) -> None:
        """Show `text` as the run's progress."""
        if self.progress is not None:
            self.last = time.monotonic()
            self.progress(f"{self.scenario}: {text}")
