"""The fan-out benchmark: it checks every delivery against a real server and reports figures.

These are correctness tests of the tool, on loads small enough to take a fraction of a
second: nothing here is timed. A proxy between the tool and the server drops, repeats or
swaps one message to show that the tool notices each kind of fault.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable

import pytest
import trio

from trio_chat import cli
from trio_chat.tools import bench
from trio_chat.tools.bench import Load, Result, run_load

SMALL = Load(rooms=2, members=4, senders=2, messages=40)

# How long the tool waits without any delivery before it gives up, in the tests that lose a
# message on purpose: long enough for every other delivery on a loaded machine.
QUIET_END = 2.0


async def bench_in_thread(port: int, load: Load, *, idle_timeout: float = 10.0) -> Result:
    """Run the blocking benchmark in a worker thread while the server runs in this one."""
    return await trio.to_thread.run_sync(
        functools.partial(run_load, "127.0.0.1", port, load, idle_timeout=idle_timeout)
    )


async def test_capacity_run_delivers_everything_exactly_once_and_reports_figures(
    server_port: int,
) -> None:
    """A correct server passes: every delivery counted once, figures and latency reported."""
    result = await bench_in_thread(server_port, SMALL)
    assert result.ok, result.first_error
    assert result.delivered == result.expected == 2 * 2 * 40 * 3
    assert (result.lost, result.duplicates, result.out_of_order, result.errors) == (0, 0, 0, 0)
    assert result.self_echoes <= 2 * 2 * 40  # the run ends at the last delivery
    assert result.sent == 2 * 2 * 40
    assert result.slow_frames == 0  # every chunk passed the fast check
    assert result.deliveries_per_s > 0
    assert result.connections == 8
    latency = result.latency_us
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


async def test_paced_run_sends_on_schedule_and_reports_send_lag(server_port: int) -> None:
    """With a rate, senders follow a schedule and the run reports how late sends were."""
    load = Load(rooms=1, members=3, senders=2, messages=10, rate=200.0)
    result = await bench_in_thread(server_port, load)
    assert result.ok, result.first_error
    assert result.delivered == 2 * 10 * 2
    assert result.wall_s >= 9 / 200  # the last message is not due before 45 ms
    assert set(result.send_lag_us) >= {"p50", "p99", "max"}


async def test_many_senders_and_large_messages_are_checked_too(server_port: int) -> None:
    """Many senders per room (small digit alphabets) and multi-kilobyte messages pass."""
    load = Load(rooms=1, members=12, senders=11, messages=30, size=3000)
    result = await bench_in_thread(server_port, load)
    assert result.ok, result.first_error
    assert result.delivered == 11 * 30 * 11
    assert result.slow_frames == 0


# -- faults ------------------------------------------------------------------------------------

Fault = Callable[[list[bytes]], list[bytes]]

_BENCH_FRAME = re.compile(rb"CHAT: [0-9]+\nCLIENT_NAME: [^\n]*\nMESSAGE: ~[^\n]*\n\n")
_HELD_FRAMES = 20  # enough for both senders to have several messages among them


def drop(frames: list[bytes]) -> list[bytes]:
    """Lose the first message."""
    return frames[1:]


def repeat(frames: list[bytes]) -> list[bytes]:
    """Deliver the first message twice."""
    return [frames[0], *frames]


def swap(frames: list[bytes]) -> list[bytes]:
    """Deliver the first two messages of one sender in the wrong order."""
    senders = [frame.split(b"\n")[1] for frame in frames]
    first = next(i for i, name in enumerate(senders) if senders.count(name) > 1)
    second = senders.index(senders[first], first + 1)
    out = list(frames)
    out[first], out[second] = out[second], out[first]
    return out


def _safe_cut(held: bytearray) -> int:
    """How much of `held` can be passed on: all but a frame (or its start) still arriving."""
    start = held.rfind(b"CHAT: ")
    if start >= 0 and b"\n\n" not in held[start:]:
        return start
    for size in range(len(b"CHAT: ") - 1, 0, -1):
        if held.endswith(b"CHAT: "[:size]):
            return len(held) - size
    return len(held)


async def _faulty_relay(
    client: trio.SocketStream, server_port: int, victim: bytes, fault: Fault
) -> None:
    """Relay one connection; if it is `victim`'s, apply `fault` to its first bench messages."""
    upstream = await trio.open_tcp_stream("127.0.0.1", server_port)
    armed = trio.Event()

    async def to_server() -> None:
        while data := await client.receive_some(65536):
            if b"CLIENT_NAME: " + victim + b"\n" in data:
                armed.set()
            await upstream.send_all(data)
        await upstream.send_eof()

    async def to_client() -> None:
        held = bytearray()
        done = False
        while data := await upstream.receive_some(65536):
            if done or not armed.is_set():
                await client.send_all(data)
                continue
            held += data
            first = _BENCH_FRAME.search(held)
            if first is None:  # setup traffic: pass it on, but not half a frame
                cut = _safe_cut(held)
                await client.send_all(bytes(held[:cut]))
                del held[:cut]
                continue
            frames = []
            position = first.start()
            while (match := _BENCH_FRAME.match(held, position)) is not None:
                frames.append(match.group())
                position = match.end()
            if len(frames) >= _HELD_FRAMES:
                faulty = b"".join(fault(frames))
                await client.send_all(bytes(held[: first.start()]) + faulty + held[position:])
                done = True
        await client.send_eof()

    async with client, upstream:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(to_server)
                nursery.start_soon(to_client)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # either side hung up; the other is closed with it


StartProxy = Callable[[Fault], Awaitable[int]]


@pytest.fixture
def faulty_proxy(server_port: int, nursery: trio.Nursery) -> StartProxy:
    """A function that starts a relay to the server applying a fault to member b1's stream."""

    async def start(fault: Fault) -> int:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        relay = functools.partial(_faulty_relay, server_port=server_port, victim=b"b1", fault=fault)
        await nursery.start(trio.serve_listeners, relay, listeners)
        port: int = listeners[0].socket.getsockname()[1]
        return port

    return start


@pytest.mark.parametrize(
    ("fault", "lost", "duplicates", "out_of_order"),
    [(drop, 1, 0, 0), (repeat, 0, 1, 0), (swap, 0, 0, 1)],
)
async def test_a_lost_repeated_or_reordered_message_fails_the_run(
    faulty_proxy: StartProxy, fault: Fault, lost: int, duplicates: int, out_of_order: int
) -> None:
    """One message dropped, repeated or swapped on one member's stream is counted and fails."""
    port = await faulty_proxy(fault)
    result = await bench_in_thread(port, SMALL, idle_timeout=QUIET_END)
    assert not result.ok
    assert (result.lost, result.duplicates, result.out_of_order) == (lost, duplicates, out_of_order)
    assert result.first_error.startswith("member b1:")


# -- the command -------------------------------------------------------------------------------


async def test_command_prints_json_for_machines_and_a_table_for_people(
    server_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """``trio-chat bench HOST PORT`` with load options prints one JSON line, or a table."""
    argv = ["bench", "127.0.0.1", str(server_port), "--rooms", "1", "--members", "3"]
    argv += ["--messages", "20"]
    status = await trio.to_thread.run_sync(cli.main, [*argv, "--json"])
    assert status == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["ok"] is True
    assert figures["delivered"] == figures["expected"] == 20 * 2
    assert figures["deliveries_per_s"] > 0
    assert set(figures["latency_us"]) >= {"p50", "p90", "p99", "max"}
    status = await trio.to_thread.run_sync(cli.main, argv)
    assert status == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["scenario", "rooms"]
    assert table[1].split()[0] == "custom"
    assert table[1].endswith("ok")


def test_named_scenarios_match_the_comparison_script() -> None:
    """big, small and paced are the comparison's loads (docs/performance.md); options override."""
    assert bench.SCENARIOS["big"].expected == 1 * 2 * 2000 * 499
    assert bench.SCENARIOS["small"].expected == 10 * 2 * 2000 * 49
    assert bench.SCENARIOS["paced"].rate == 100
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "h", "1", "small", "--messages", "5"])
    assert bench.loads_from_args(args) == [
        ("small", Load(rooms=10, members=50, senders=2, messages=5))
    ]
    args = parser.parse_args(["bench", "h", "1"])
    assert [name for name, _ in bench.loads_from_args(args)] == ["big", "small", "paced"]
