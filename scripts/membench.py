"""Memory per connection: how much a trio-chat server's RSS grows for each connected client.

    python scripts/membench.py [--clients 10000] [--room-size 10]     (or: nox -s membench)

Starts ``trio-chat serve`` on 127.0.0.1 in a child process, warms it up, then connects
`--clients` clients, each of which joins a room (`--room-size` members to a room) and waits
for its JOINED reply. It prints the server's resident set size before and after, the growth
per connection, and the kernel's TCP buffer memory beside it. The target is at most 16 KiB of
RSS per connection; the exit status is 1 when the figure is over the target.

Both processes need a descriptor per client, so this raises its own RLIMIT_NOFILE to the hard
limit; the server, started from it, inherits the raised limit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import sys
from collections.abc import AsyncIterator

import trio

KIB = 1024
TARGET = 16 * KIB  # the figure: at most 16 KiB of RSS growth per connection
CONNECT_AT_ONCE = 200  # connections opened in parallel; below the listen backlog
WARM_UP_CLIENTS = 200  # served (and gone) before the baseline: first-use allocations
SETTLE_SECONDS = 1.0  # let the server finish its work before each RSS reading
REPLY_TIMEOUT = 30.0  # per client; only matters when something is wrong


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < needed:
        sys.exit(
            f"membench: needs {needed} open files per process, the hard limit is {hard}; "
            "raise it (ulimit -Hn) or use fewer --clients"
        )
    return soft


def rss(pid: int) -> int:
    """Resident set size of process `pid` in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    raise RuntimeError(f"no VmRSS for process {pid}")


def tcp_kernel_memory() -> int:
    """Bytes of socket buffer memory the kernel has allocated to TCP (all processes)."""
    with open("/proc/net/sockstat") as sockstat:
        for line in sockstat:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def server_process(port: int, clients: int) -> AsyncIterator[trio.Process]:
    """``trio-chat serve`` on 127.0.0.1:`port`, stopped with SIGTERM at the end."""
    command = [sys.executable, "-m", "trio_chat", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "WARNING"]
    command += ["--max-connections", str(max(clients, 10_000))]
    process = await trio.lowlevel.open_process(command)
    try:
        yield process
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def wait_for_server(port: int) -> None:
    """Wait until the server accepts connections."""
    with trio.fail_after(REPLY_TIMEOUT):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def receive_until(stream: trio.SocketStream, marker: bytes) -> None:
    """Read until `marker` has arrived (the bytes after it are dropped)."""
    data = b""
    with trio.fail_after(REPLY_TIMEOUT):
        while marker not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            data += chunk


async def join(port: int, number: int, room_size: int) -> trio.SocketStream:
    """A connection that has joined its room; its JOINED reply has arrived."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    room = f"room{number // room_size}"
    request = f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: c{number}\n"
    await stream.send_all(request.encode())
    await receive_until(stream, b"JOIN_ID: ")
    return stream


async def connect_all(
    port: int, count: int, room_size: int, first: int = 0
) -> list[trio.SocketStream]:
    """`count` joined connections, opened `CONNECT_AT_ONCE` at a time."""
    streams: list[trio.SocketStream] = []
    limiter = trio.CapacityLimiter(CONNECT_AT_ONCE)

    async def one(number: int) -> None:
        async with limiter:
            streams.append(await join(port, number, room_size))

    async with trio.open_nursery() as nursery:
        for number in range(first, first + count):
            nursery.start_soon(one, number)
    return streams


async def close_all(streams: list[trio.SocketStream]) -> None:
    for stream in streams:
        await stream.aclose()


async def bench(clients: int, room_size: int) -> int:
    port = free_port()
    async with server_process(port, clients) as server:
        await wait_for_server(port)
        # Warm up: the first connections pay for imports, caches and arenas the server keeps.
        await close_all(await connect_all(port, WARM_UP_CLIENTS, room_size, first=clients))
        await trio.sleep(SETTLE_SECONDS)
        rss_before, tcp_before = rss(server.pid), tcp_kernel_memory()
        start = trio.current_time()
        streams = await connect_all(port, clients, room_size)
        took = trio.current_time() - start
        await trio.sleep(SETTLE_SECONDS)
        rss_after, tcp_after = rss(server.pid), tcp_kernel_memory()
        await close_all(streams)

    per_connection = (rss_after - rss_before) / clients
    print(f"clients connected, each in a room of {room_size}: {clients} (in {took:.1f} s)")
    print(f"server RSS before: {rss_before / KIB / KIB:.1f} MiB")
    print(f"server RSS after:  {rss_after / KIB / KIB:.1f} MiB")
    print(
        f"server RSS growth per connection: {per_connection / KIB:.2f} KiB "
        f"(target <= {TARGET // KIB} KiB)"
    )
    kernel = (tcp_after - tcp_before) / clients
    print(
        f"kernel TCP buffer memory per connection (both ends, not in RSS): {kernel / KIB:.2f} KiB"
    )
    return 0 if per_connection <= TARGET else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000, help="connections (default: 10000)")
    parser.add_argument("--room-size", type=int, default=10, help="clients to a room (default: 10)")
    args = parser.parse_args()
    # This process holds one descriptor per client and so does the server, which inherits
    # the raised limit; a margin covers listeners, pipes and the interpreter's own files.
    raise_fd_limit(args.clients + WARM_UP_CLIENTS + 100)
    return trio.run(bench, args.clients, args.room_size)


if __name__ == "__main__":
    sys.exit(main())
