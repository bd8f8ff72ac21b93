"""Soak test: a fixed group chats at a steady rate while a crowd churns, for minutes.

    python scripts/soak.py [--minutes 5] [--churners 1000] ...     (or: nox -s soak -- ...)

A trio-chat server runs in a child process (this script with ``--serve``: the real `serve`
plus a probe that reports its RSS, open descriptors, trio task count and connections when
sent SIGUSR1). Against it:

- a fixed group of `--fixed` clients in one room chats at `--rate` messages per second in all;
- `--churners` clients each loop: connect, join (the fixed group's room or a room of their
  own), chat, then go away in one of several ways (reset with SO_LINGER 0, reset half-way
  through a request, DISCONNECT, half-close, plain close) and come back after a pause.

Every `--interval` seconds it prints the server's RSS, descriptors and task count. It fails
(exit status 1) if they keep growing: if the highest reading in the second half of the run
is well above the highest in the first half, for RSS and for the descriptors and tasks
beyond those of the connections open at that moment (the churn makes the raw counts rise and
fall); if after the churn stops descriptors and tasks are not back at their baseline; if
any fixed member missed a message or saw the room's broadcasts in another order than the
others; or if a churner saw anything unexpected. Last, while 500 clients chat, KILL_SERVICE
must stop the server with status 0 within a second and without a traceback.

These are the issue's full figures; the default test suite runs smaller ones
(tests/test_chaos.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import trio

KIB = 1024
MIB = KIB * KIB
REPLY_TIMEOUT = 30.0  # seconds to wait for an expected reply; only matters when broken
SETTLE_TIMEOUT = 60.0  # seconds for the server to close what churners dropped
WARM_UP_FRACTION = 0.2  # readings in the first part of the run are not judged for growth
# Growth allowed between the first and the second half of the run: noise, not a trend.
RSS_SLACK = (0.10, 8 * MIB)  # fraction, plus bytes
COUNT_SLACK = (0.10, 50)  # fraction, plus descriptors or tasks
KILL_CLIENTS = 500
KILL_ROOM_SIZE = 50
SHUTDOWN_LIMIT = 1.0  # seconds, less time spent waiting for a CPU (see wait_for_kill)


# -- the server side: `serve` plus a probe ----------------------------------------------------


def probe() -> dict[str, int]:
    """This process's RSS, open descriptors, trio tasks and chat connections."""
    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) * KIB for line in status if line.startswith("VmRSS:"))

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(c) for n in task.child_nurseries for c in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return {
        "rss": rss,
        "fds": len(os.listdir("/proc/self/fd")),
        "tasks": count(root),
    }


async def serve_with_probe() -> None:
    """Serve on 127.0.0.1 (port printed as JSON); print a probe reading on each SIGUSR1."""
    from trio_chat.config import Config
    from trio_chat.server import ChatServer

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    server = ChatServer(Config(host="127.0.0.1", max_connections=100_000))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    with trio.open_signal_receiver(signal.SIGUSR1) as readings:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop() -> None:
                await server.serve_listeners(listeners)
                nursery.cancel_scope.cancel()  # KILL_SERVICE: stop the probe too

            nursery.start_soon(serve_then_stop)
            print(json.dumps({"port": listeners[0].socket.getsockname()[1]}), flush=True)
            async for _ in readings:
                reading = probe() | {"connections": len(server.connections)}
                print(json.dumps(reading), flush=True)


# -- the client side --------------------------------------------------------------------------


class Client:
    """One connection with a receive buffer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, text: str) -> None:
        await self.stream.send_all(text.encode())

    async def receive_until(self, marker: bytes) -> bytes:
        with trio.fail_after(REPLY_TIMEOUT):
            while (end := self.buffer.find(marker)) < 0:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("the server closed the connection")
                self.buffer += data
        end += len(marker)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    async def read_to_end(self) -> None:
        with trio.fail_after(REPLY_TIMEOUT):
            while await self.stream.receive_some(65536):
                pass

    async def reset(self) -> None:
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()


def join(room: str, name: str) -> str:
    return f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: {name}\n"


def chat(room_ref: int, name: str, message: str) -> str:
    return f"CHAT: {room_ref}\nJOIN_ID: 0\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n"


async def joined(port: int, room: str, name: str) -> tuple[Client, int]:
    """A client that joined `room` as `name`, and the room's ROOM_REF."""
    client = await Client.connect(port)
    await client.send(join(room, name))
    reply = await client.receive_until(f"MESSAGE: {name} has joined this chatroom.\n\n".encode())
    room_ref = int(reply.split(b"ROOM_REF: ")[1].split(b"\n")[0])
    return client, room_ref


class FixedMember:
    """A member of the fixed group: chats at its share of the rate and checks what it gets."""

    def __init__(self, index: int, client: Client, room_ref: int, members: int) -> None:
        self.index = index
        self.name = f"fixed{index}"
        self.client = client
        self.room_ref = room_ref
        self.sent = 0
        self.received = 0
        self.next_from = [0] * members  # the next message number expected from each member
        self.problems: list[str] = []
        self.digest = hashlib.sha256()  # of every broadcast, in the order received
        self.prefix = f"CHAT: {room_ref}\nCLIENT_NAME: fixed".encode()

    async def talk(self, rate: float, stop: trio.Event) -> None:
        interval = 1 / rate
        next_time = trio.current_time()
        while not stop.is_set():
            await self.client.send(chat(self.room_ref, self.name, f"{self.index}:{self.sent}"))
            self.sent += 1
            next_time += interval
            await trio.sleep_until(next_time)

    async def listen(self) -> None:
        while True:
            self.take(await self.client.receive_until(b"\n\n"))

    def take(self, message: bytes) -> None:
        """Check one broadcast: fixed members' chats come once each, in the order sent."""
        self.digest.update(message)
        if not message.startswith(self.prefix) or message.endswith(b"chatroom.\n\n"):
            return
        text = message.split(b"MESSAGE: ")[1].removesuffix(b"\n\n").decode()
        sender, number = (int(part) for part in text.split(":"))
        if number != self.next_from[sender]:
            self.problems.append(
                f"{self.name}: from fixed{sender} got #{number}, expected #{self.next_from[sender]}"
            )
        self.next_from[sender] = number + 1
        self.received += 1

    async def drain(self) -> None:
        """Take everything queued for this member, proven complete by a HELO round trip."""
        await self.client.send("HELO drain\n")
        data = await self.client.receive_until(b"HELO drain\nIP:")
        await self.client.receive_until(b"StudentID:")
        await self.client.receive_until(b"\n")
        for message in data.removesuffix(b"HELO drain\nIP:").split(b"\n\n")[:-1]:
            self.take(message + b"\n\n")


class Churn:
    """The churning crowd and what it saw."""

    def __init__(self, port: int, churners: int, pause: float, seed: int) -> None:
        self.port = port
        self.churners = churners
        self.pause = pause
        self.rng = random.Random(seed)
        self.cycles = 0
        self.unexpected: Counter[str] = Counter()

    async def run(self, stop: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            for number in range(self.churners):
                nursery.start_soon(self.churner, number, self.rng.getrandbits(32), stop)

    async def churner(self, number: int, seed: int, stop: trio.Event) -> None:
        rng = random.Random(seed)
        await trio.sleep(rng.uniform(0, self.pause))  # spread the starts
        while not stop.is_set():
            try:
                await self.cycle(number, rng)
            except Exception as exc:  # counted and reported: a churner must see no surprises
                self.unexpected[f"{type(exc).__name__}: {exc}"[:120]] += 1
            self.cycles += 1
            await trio.sleep(rng.uniform(0, 2 * self.pause))

    async def cycle(self, number: int, rng: random.Random) -> None:
        name = f"churn{number}"
        client = await Client.connect(self.port)
        try:
            way = rng.randrange(7)
            if way == 0:
                await client.reset()
                return
            in_fixed = rng.random() < 0.2
            await client.send(join("fixed" if in_fixed else f"churn{number % 100}", name))
            reply = await client.receive_until(b"JOIN_ID: ")
            room_ref = int(reply.split(b"ROOM_REF: ")[1].split(b"\n")[0])
            if way == 1:  # reset half-way through a request
                await client.send("CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: x\nMESS")
                await client.reset()
                return
            await client.send(chat(room_ref, name, f"hello from {name}"))
            await client.receive_until(f"MESSAGE: hello from {name}\n\n".encode())
            if way == 2:
                await client.reset()
            elif way == 3:
                await client.send("DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: x\n")
                await client.read_to_end()
            elif way == 4:
                await client.stream.send_eof()
                await client.read_to_end()
            elif way == 5:
                await client.send(f"LEAVE_CHATROOM: {room_ref}\nJOIN_ID: 0\nCLIENT_NAME: x\n")
                await client.receive_until(b"LEFT_CHATROOM")
            # way 6, and 5 after leaving: a plain close
        finally:
            await trio.aclose_forcefully(client.stream)


# -- the run ----------------------------------------------------------------------------------


class Server:
    """The server process: its port, probe readings on demand, and its log in a file."""

    def __init__(self, process: trio.Process, log: Any) -> None:
        self.process = process
        self.log = log
        self.lines: trio.MemoryReceiveChannel[dict[str, int]]
        self._send: trio.MemorySendChannel[dict[str, int]]
        self._send, self.lines = trio.open_memory_channel(1)

    async def read_stdout(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for data in self.process.stdout:
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                await self._send.send(json.loads(line))

    async def reading(self) -> dict[str, int]:
        self.process.send_signal(signal.SIGUSR1)
        with trio.fail_after(REPLY_TIMEOUT):
            return await self.lines.receive()

    def log_text(self) -> str:
        self.log.seek(0)
        return str(self.log.read().decode(errors="replace"))


@contextlib.asynccontextmanager
async def server_process() -> AsyncIterator[tuple[Server, int]]:
    with tempfile.TemporaryFile() as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, stderr=log
        )
        server = Server(process, log)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.read_stdout)
                with trio.fail_after(REPLY_TIMEOUT):
                    port = (await server.lines.receive())["port"]
                yield server, port
                nursery.cancel_scope.cancel()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def format_reading(elapsed: float, reading: dict[str, int], extra: str = "") -> str:
    return (
        f"t={elapsed:6.0f}s  rss={reading['rss'] / MIB:7.1f} MiB  fds={reading['fds']:6d}  "
        f"tasks={reading['tasks']:6d}  connections={reading['connections']:6d}  {extra}"
    )


def keeps_growing(values: list[int], slack: tuple[float, int]) -> bool:
    """Whether the second half's highest value is well above the first half's."""
    if len(values) < 4:
        return False
    half = len(values) // 2
    fraction, absolute = slack
    return max(values[half:]) > max(values[:half]) * (1 + fraction) + absolute


async def settle(server: Server, fixed: int) -> dict[str, int]:
    """A reading once only the fixed group is connected (or the timeout passed)."""
    with trio.move_on_after(SETTLE_TIMEOUT):
        # Polling: the server learns of resets from the kernel; no event tells us it is done.
        while (reading := await server.reading())["connections"] > fixed:  # noqa: ASYNC110
            await trio.sleep(0.5)
    return reading


def scheduler_wait(pid: int) -> float:
    """Seconds process `pid` has spent waiting for a CPU (readable while it is a zombie)."""
    with open(f"/proc/{pid}/schedstat") as file:
        return int(file.read().split()[1]) / 1e9


async def kill_under_load(server: Server, port: int) -> list[str]:
    """KILL_SERVICE while KILL_CLIENTS chat: the problems seen (none when all is well)."""
    stop = trio.Event()
    started = trio.Semaphore(0)

    async def chatter(number: int) -> None:
        name = f"k{number}"
        with contextlib.suppress(EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            client, room_ref = await joined(port, f"kill{number // KILL_ROOM_SIZE}", name)
            started.release()
            count = 0
            while not stop.is_set():
                await client.send(chat(room_ref, name, str(count)))
                await client.receive_until(f"CLIENT_NAME: {name}\nMESSAGE: {count}\n\n".encode())
                count += 1
            await client.stream.aclose()

    problems = []
    pid = server.process.pid
    async with trio.open_nursery() as nursery:
        for number in range(KILL_CLIENTS):
            nursery.start_soon(chatter, number)
        with trio.fail_after(REPLY_TIMEOUT):
            for _ in range(KILL_CLIENTS):
                await started.acquire()
        killer = await Client.connect(port)
        waited_before = scheduler_wait(pid)
        await killer.send("KILL_SERVICE\n")
        start = trio.current_time()
        pidfd = os.pidfd_open(pid)
        try:
            with trio.fail_after(REPLY_TIMEOUT):
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        elapsed = trio.current_time() - start
        waited = scheduler_wait(pid) - waited_before
        status = await server.process.wait()
        stop.set()
        await killer.stream.aclose()
    print(
        f"KILL_SERVICE under {KILL_CLIENTS} chatting clients: exit status {status} after "
        f"{elapsed:.3f} s, of which {waited:.3f} s waiting for a CPU"
    )
    if status != 0:
        problems.append(f"the server exited with status {status}")
    if elapsed - waited >= SHUTDOWN_LIMIT:
        problems.append(f"the server took {elapsed - waited:.3f} s to stop")
    log = server.log_text()
    if "Traceback" in log or "ERROR" in log:
        problems.append("the server logged an error:\n" + log[-3000:])
    return problems


async def soak(args: argparse.Namespace) -> int:
    problems: list[str] = []
    async with server_process() as (server, port):
        # One connection first: the server sets up what it keeps for the whole run.
        warm_up = await Client.connect(port)
        await warm_up.send("HELO warm-up\n")
        await warm_up.receive_until(b"StudentID:")
        await warm_up.stream.aclose()
        empty = await settle(server, 0)
        members: list[FixedMember] = []
        for index in range(args.fixed):
            client, room_ref = await joined(port, "fixed", f"fixed{index}")
            members.append(FixedMember(index, client, room_ref, args.fixed))
        for member in members:  # skip the announcements of those who joined after it
            last = f"fixed{args.fixed - 1} has joined this chatroom.\n\n".encode()
            if member.index < args.fixed - 1:
                await member.client.receive_until(last)
        baseline = await server.reading()
        print(format_reading(0, baseline, "(baseline: the fixed group only)"))
        tasks_per_connection = (baseline["tasks"] - empty["tasks"]) / args.fixed

        churn = Churn(port, args.churners, args.churn_pause, args.seed)
        readings: list[dict[str, int]] = []
        stop_churn, stop_chat = trio.Event(), trio.Event()
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(churn.run, stop_churn)
            for member in members:
                nursery.start_soon(member.talk, args.rate / args.fixed, stop_chat)
            async with trio.open_nursery() as listeners:
                for member in members:
                    listeners.start_soon(member.listen)
                end = start + args.minutes * 60
                while (now := trio.current_time()) < end:
                    await trio.sleep(min(args.interval, end - now))
                    reading = await server.reading()
                    readings.append(reading)
                    sent = sum(m.sent for m in members)
                    received = sum(m.received for m in members)
                    print(
                        format_reading(
                            trio.current_time() - start,
                            reading,
                            f"chats sent={sent} received={received} churn cycles={churn.cycles}",
                        ),
                        flush=True,
                    )
                stop_churn.set()
                stop_chat.set()
                # Churners finish their cycle; the server then closes what they dropped.
                final = await settle(server, args.fixed)
                listeners.cancel_scope.cancel()
        for member in members:
            await member.drain()
        print(format_reading(trio.current_time() - start, final, "(churn stopped)"))

        judged = readings[int(len(readings) * WARM_UP_FRACTION) :]
        trends = {
            "RSS": ([r["rss"] for r in judged], RSS_SLACK),
            "descriptors beyond connections": (
                [r["fds"] - r["connections"] for r in judged],
                COUNT_SLACK,
            ),
            "tasks beyond connections": (
                [round(r["tasks"] - tasks_per_connection * r["connections"]) for r in judged],
                COUNT_SLACK,
            ),
        }
        for what, (values, slack) in trends.items():
            if keeps_growing(values, slack):
                problems.append(f"{what} kept growing: {values}")
        for key in ("fds", "tasks"):
            if final[key] != baseline[key]:
                problems.append(f"{key}: {final[key]} after the churn, {baseline[key]} before")
        sent = sum(m.sent for m in members)
        for member in members:
            problems += member.problems
            if member.received != sent:
                problems.append(f"{member.name} received {member.received} of {sent} chats")
        if len({m.digest.hexdigest() for m in members}) != 1:
            problems.append("the fixed members saw the room's broadcasts in different orders")
        for what, count in churn.unexpected.items():
            problems.append(f"churners saw {count} times: {what}")
        print(f"{sent} chats, each received by {args.fixed} members; {churn.cycles} churn cycles")

        problems += await kill_under_load(server, port)

    for problem in problems:
        print("FAIL:", problem)
    print("soak: " + ("FAILED" if problems else "passed"))
    return 1 if problems else 0


def raise_fd_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the server inherits it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        sys.exit(f"soak: needs {needed} open files, the hard limit is {hard} (ulimit -Hn)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5, help="how long (default: 5)")
    parser.add_argument("--interval", type=float, default=10, help="seconds between readings")
    parser.add_argument("--fixed", type=int, default=10, help="fixed group size (default: 10)")
    parser.add_argument("--rate", type=float, default=200, help="fixed group's chats per second")
    parser.add_argument("--churners", type=int, default=1000, help="churning clients (1000)")
    parser.add_argument(
        "--churn-pause", type=float, default=1.0, help="mean seconds between a churner's visits"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed of the churn")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve_with_probe)
        return 0
    raise_fd_limit(args.churners + KILL_CLIENTS + args.fixed + 100)
    return trio.run(soak, args)


if __name__ == "__main__":
    sys.exit(main())
