"""How long a server with many idle connections takes to shut down.

Starts ``trio-chat serve`` on a free port of 127.0.0.1 with its default settings (log lines
included, written to a file), opens N idle connections (each proves it is served with one
HELO round trip), then stops the server with KILL_SERVICE sent on one of them, or with
SIGTERM or SIGINT, and prints the time from that moment until the process has exited, and
the CPU time the server spent in it (on a busy machine the first grows, the second does not).

    python scripts/shutdownbench.py [--connections 10000] [--ways kill term int] [--rounds 1]

Raises its own descriptor limit (and the server's) to what N connections need; the hard
limit must allow about N + 100.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time

HELO = b"HELO x\n"


def raise_descriptor_limit(needed: int) -> None:
    """Raise the soft limit on open files to `needed`, or fail saying why."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit(f"shutdownbench: needs {needed} descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_server(port: int, connections: int, log: int) -> subprocess.Popen[bytes]:
    """A server on `port`, logging at INFO to `log`, once it accepts connections."""
    command = [sys.executable, "-m", "trio_chat", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--max-connections", str(connections + 10)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("shutdownbench: the server did not start")
            time.sleep(0.05)


def open_idle_connections(port: int, count: int) -> list[socket.socket]:
    """`count` connections, each answered one HELO (so the server is serving it)."""
    clients = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(HELO)
        clients.append(sock)
    selector = selectors.DefaultSelector()
    waiting = {}
    for sock in clients:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        waiting[sock] = b""
    deadline = time.monotonic() + 120
    while waiting:
        if time.monotonic() > deadline:
            sys.exit(f"shutdownbench: {len(waiting)} connections got no HELO reply")
        for key, _ in selector.select(timeout=1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data = waiting[sock] + sock.recv(4096)
            if data.count(b"\n") >= 4:  # HELO, IP, Port, StudentID
                selector.unregister(sock)
                del waiting[sock]
            else:
                waiting[sock] = data
    selector.close()
    return clients


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time used by this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_round(way: str, connections: int) -> tuple[float, float, int]:
    """Seconds from the stop request to the server's exit, the CPU seconds the server spent
    in them (what a busy machine cannot inflate), and the log lines written."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        server = start_server(port, connections, log.fileno())
        clients = open_idle_connections(port, connections)
        try:
            waited_cpu = children_cpu_seconds()
            cpu_before = cpu_seconds(server.pid)
            start = time.monotonic()
            if way == "kill":
                clients[0].sendall(b"KILL_SERVICE\n")
            else:
                server.send_signal(signal.SIGTERM if way == "term" else signal.SIGINT)
            status = server.wait(timeout=120)
            elapsed = time.monotonic() - start
            cpu = children_cpu_seconds() - waited_cpu - cpu_before
        finally:
            if server.poll() is None:
                server.kill()
            for sock in clients:
                sock.close()
        if status != 0:
            sys.exit(f"shutdownbench: the server exited with status {status}")
        log.seek(0)
        return elapsed, cpu, log.read().count(b"\n")


def main() -> None:
    """Parse the arguments, run the rounds, print one line per round."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument(
        "--ways", nargs="+", choices=["kill", "term", "int"], default=["kill", "term"]
    )
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    raise_descriptor_limit(args.connections + 100)
    os.environ["PYTHONUNBUFFERED"] = "1"
    print(f"{'stopped by':12} {'connections':>11} {'shutdown s':>10} {'cpu s':>6} {'log lines':>9}")
    for _ in range(args.rounds):
        for way in args.ways:
            elapsed, cpu, lines = one_round(way, args.connections)
            name = {"kill": "KILL_SERVICE", "term": "SIGTERM", "int": "SIGINT"}[way]
            print(f"{name:12} {args.connections:>11} {elapsed:>10.3f} {cpu:>6.2f} {lines:>9}")


if __name__ == "__main__":
    main()
