"""``trio-chat serve --workers N``: N server processes on one port, one service through Redis.

The parent only supervises: it starts N copies of the same ``serve`` command with
``--reuse-port`` (the kernel spreads connections among them), and when one ends, for
KILL_SERVICE, a signal or a crash, it stops the others and exits with the first one's status.
KILL_SERVICE reaches every worker through Redis, so they all end together with status 0.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

import trio

log = logging.getLogger("trio_chat")

# How long workers get to finish after SIGTERM before they are killed outright.
STOP_GRACE = 5.0


def worker_argv(argv: Sequence[str], index: int) -> list[str]:
    """The command line of worker `index`: the parent's, without ``--workers``, with
    ``--reuse-port`` and the worker's number (which its log lines carry)."""
    command: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            command.append(arg)
    return [
        *(sys.executable, "-m", "trio_chat"),
        *command,
        *("--reuse-port", "--worker-index", str(index)),
    ]


async def supervise(argv: Sequence[str], count: int) -> int:
    """Run `count` workers on the command line `argv` (the parent's, without the program
    name) until one ends; then stop the rest. Returns the first one's exit status."""
    first_status: list[int] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            processes = []
            for index in range(1, count + 1):
                processes.append(await trio.lowlevel.open_process(worker_argv(argv, index)))
                log.info("started worker %d: process %d", index, processes[-1].pid)

            async def watch(index: int, process: trio.Process) -> None:
                status = await process.wait()
                if not first_status:
                    first_status.append(status)
                    log.info("worker %d exited with status %d", index, status)
                nursery.cancel_scope.cancel()

            async def forward_signals() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            for index, process in enumerate(processes, start=1):
                nursery.start_soon(watch, index, process)
            nursery.start_soon(forward_signals)
        with trio.CancelScope(shield=True):
            await _stop_all(processes)
    return first_status[0] if first_status else 0


async def _stop_all(processes: list[trio.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STOP_GRACE):
        for process in processes:
            await process.wait()
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()
