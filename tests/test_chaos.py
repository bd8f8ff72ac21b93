"""Chaos over real sockets: clients that misbehave at the TCP level, churn, and shutdown.

Clients reset their connection mid-request (SO_LINGER 0), half-close, write one byte at a
time, or connect and say nothing; a crowd churns (connect, join, chat, reset) while a fixed
group chats. Nothing may be lost for the well-behaved, and afterwards the process's open
file descriptors and trio tasks must be back at their baseline. Last, a server process is
stopped by KILL_SERVICE while 500 clients chat.

The default suite runs 200 churning clients; `nox -s soak` runs the issue's full figure
(1000 churning clients, and the shutdown under 500 chatting clients) for minutes on end.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import socket
import struct
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.chatclient import RECEIVE_TIMEOUT, Client
from trio_chat.config import Config
from trio_chat.server import ChatServer

# How long to wait for the server to finish closing connections the clients have dropped.
# Generous: it only matters when something leaks.
SETTLE_TIMEOUT = 3 * RECEIVE_TIMEOUT


def join(room: str, name: str) -> str:
    """A JOIN_CHATROOM request."""
    return f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: {name}\n"


def chat(room_ref: int, name: str, message: str) -> str:
    """A CHAT request."""
    return f"CHAT: {room_ref}\nJOIN_ID: 0\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n"


def broadcast(room_ref: int, name: str, message: str) -> bytes:
    """A CHAT broadcast as every member receives it."""
    return f"CHAT: {room_ref}\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n".encode()


DISCONNECT = "DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: x\n"


@asynccontextmanager
async def tcp_server(config: Config | None = None) -> AsyncIterator[tuple[ChatServer, int]]:
    """A server on 127.0.0.1 and a free port, in this process; yields it and its port."""
    server = ChatServer(config or Config(host="127.0.0.1"))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_listeners, listeners)
        yield server, listeners[0].socket.getsockname()[1]
        server.shutdown("test over")


async def reset(client: Client) -> None:
    """Close with SO_LINGER 0: the kernel sends RST, and any unread input is thrown away."""
    stream = client.stream
    assert isinstance(stream, trio.SocketStream)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def half_close(client: Client) -> None:
    """Send FIN: the client will send nothing more but still reads."""
    stream = client.stream
    assert isinstance(stream, trio.SocketStream)
    await stream.send_eof()


async def read_broadcasts_until_helo(client: Client) -> list[bytes]:
    """Every broadcast queued for `client`, proven complete by a HELO round trip."""
    await client.send("HELO drain\n")
    data = await client.receive_until(b"HELO drain\n")
    await client.receive_until(b"StudentID:")
    await client.receive_until(b"\n")
    body = data.removesuffix(b"HELO drain\n")
    return [message + b"\n\n" for message in body.split(b"\n\n") if message]


def open_fds() -> int:
    """The number of file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def trio_tasks() -> int:
    """The number of tasks in this trio run, found by walking the task tree from its root."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            count(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


async def settle(condition: Callable[[], bool]) -> None:
    """Wait (a bounded time) for the server to finish with connections clients dropped.

    Polling is the only way here: the server learns of a reset from the kernel, and no
    request-reply barrier can prove a connection that is gone has been cleaned up.
    """
    with trio.move_on_after(SETTLE_TIMEOUT):
        while not condition():  # noqa: ASYNC110 (nothing to wait on: see above)
            await trio.sleep(0.01)


async def joined_member(port: int, room: str, name: str) -> Client:
    """A client that has joined `room` as `name`, its own replies consumed."""
    client = await Client.connect(port)
    await client.send(join(room, name))
    await client.receive_until(f"MESSAGE: {name} has joined this chatroom.\n\n".encode())
    return client


# -- misbehaving clients ----------------------------------------------------------------------


async def test_client_reset_mid_request_leaves_and_the_room_goes_on() -> None:
    """A client that resets half-way through a CHAT leaves its rooms; the others carry on."""
    async with tcp_server() as (server, port):
        steady = await joined_member(port, "r", "steady")
        victim = await joined_member(port, "r", "victim")
        await steady.receive_until(b"MESSAGE: victim has joined this chatroom.\n\n")
        await victim.send("CHAT: 0\nJOIN_ID: 0\nCLIENT_NA")
        await reset(victim)
        await steady.receive_until(broadcast(0, "victim", "victim has left this chatroom."))
        await steady.send(chat(0, "steady", "still here"))
        await steady.expect(broadcast(0, "steady", "still here").decode())
        await steady.expect_nothing()
        await settle(lambda: len(server.connections) == 1)
        assert len(server.connections) == 1
        await steady.aclose()


async def test_reset_with_unread_replies_pending_is_a_clean_departure() -> None:
    """A client that resets while its replies are unread is a departure, nothing worse."""
    async with tcp_server() as (server, port):
        steady = await joined_member(port, "r", "steady")
        victim = await Client.connect(port)
        await victim.send(join("r", "victim") + "HELO unread\n" * 1000)
        await steady.receive_until(b"MESSAGE: victim has joined this chatroom.\n\n")
        await reset(victim)
        await steady.receive_until(broadcast(0, "victim", "victim has left this chatroom."))
        await steady.expect_nothing()
        await settle(lambda: len(server.connections) == 1)
        assert len(server.connections) == 1
        await steady.aclose()


async def test_half_closed_client_still_gets_every_reply() -> None:
    """Requests followed by FIN (as `nc -N` sends them) are all answered before the close."""
    async with tcp_server() as (_, port):
        steady = await joined_member(port, "r", "steady")
        client = await Client.connect(port)
        await client.send(join("r", "half") + chat(0, "half", "bye") + "HELO last\n")
        await half_close(client)
        await client.receive_until(b"MESSAGE: half has joined this chatroom.\n\n")
        await client.expect(broadcast(0, "half", "bye").decode())
        await client.expect(f"HELO last\nIP:127.0.0.1\nPort:{port}\nStudentID:trio-chat\n")
        await client.expect_eof()
        await client.aclose()
        await steady.receive_until(b"MESSAGE: half has joined this chatroom.\n\n")
        await steady.expect(broadcast(0, "half", "bye").decode())
        await steady.expect(broadcast(0, "half", "half has left this chatroom.").decode())
        await steady.expect_nothing()
        await steady.aclose()


async def test_client_writing_one_byte_at_a_time_is_served_exactly() -> None:
    """Requests arriving one byte per segment get the same replies as requests sent whole."""
    async with tcp_server() as (_, port):
        steady = await joined_member(port, "r", "steady")
        client = await Client.connect(port)
        conversation = join("r", "slow") + chat(0, "slow", "one\nbyte") + "HELO b\r\n" + DISCONNECT
        for byte in conversation.encode():
            await client.send(bytes([byte]))  # TCP_NODELAY is on: one segment each
        await client.expect(
            f"JOINED_CHATROOM: r\nSERVER_IP: 127.0.0.1\nPORT: {port}\nROOM_REF: 0\nJOIN_ID: 1\n"
        )
        await client.expect(broadcast(0, "slow", "slow has joined this chatroom.").decode())
        await client.expect(broadcast(0, "slow", "one\nbyte").decode())
        await client.expect(f"HELO b\nIP:127.0.0.1\nPort:{port}\nStudentID:trio-chat\n")
        await client.expect(broadcast(0, "slow", "slow has left this chatroom.").decode())
        await client.expect_eof()
        await client.aclose()
        for message in [
            "slow has joined this chatroom.",
            "one\nbyte",
            "slow has left this chatroom.",
        ]:
            await steady.expect(broadcast(0, "slow", message).decode())
        await steady.expect_nothing()
        await steady.aclose()


async def test_silent_connections_cost_nothing_to_others_and_close_cleanly() -> None:
    """Fifty clients that connect and say nothing (one with half a request) stop no one."""
    async with tcp_server() as (server, port):
        async with await Client.connect(port) as first:
            await first.barrier()  # the server has set up what it keeps for the whole run
        await settle(lambda: len(server.connections) == 0)
        baseline_fds, baseline_tasks = open_fds(), trio_tasks()
        silent = [await Client.connect(port) for _ in range(50)]
        await silent[0].send("JOIN_CHATROOM: r\nCLIENT")
        talker = await joined_member(port, "r", "talker")
        await talker.send(chat(0, "talker", "anyone?"))
        await talker.expect(broadcast(0, "talker", "anyone?").decode())
        await talker.expect_nothing()
        for client in silent:
            await client.aclose()
        await talker.send(DISCONNECT)
        await talker.receive_until(b"MESSAGE: talker has left this chatroom.\n\n")
        await talker.expect_eof()
        await talker.aclose()
        await settle(lambda: len(server.connections) == 0 and trio_tasks() == baseline_tasks)
        assert (open_fds(), trio_tasks()) == (baseline_fds, baseline_tasks)


# -- churn ------------------------------------------------------------------------------------

CHURNERS = 200  # the figure is 1000: `nox -s soak` runs that
CHURN_AT_ONCE = 50
FIXED = 5
FIXED_MESSAGES = 100


async def churn_once(port: int, number: int, rng: random.Random) -> None:
    """One churning client: connect, maybe join and chat, then go away in one of many ways."""
    name = f"churn{number}"
    way = rng.randrange(8)
    client = await Client.connect(port)
    try:
        if way == 0:  # connect, then reset at once
            await reset(client)
            return
        if way == 1:  # reset in the middle of a JOIN
            await client.send("JOIN_CHATROOM: fixed\nCLIENT_IP: 0\nPO")
            await reset(client)
            return
        await client.send(join("fixed", name))
        await client.receive_until(b"JOIN_ID: ")
        if way == 2:  # reset right after joining, the announcement unread
            await reset(client)
            return
        await client.send(chat(0, name, f"{name} was here"))
        if way == 3:  # reset with a chat in flight and a second one half sent
            await client.send("CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: x\nMESSAGE: cut")
            await reset(client)
            return
        await client.receive_until(f"MESSAGE: {name} was here\n\n".encode())
        if way == 4:  # DISCONNECT properly and read to the end
            await client.send(DISCONNECT)
            await client.receive_until(f"MESSAGE: {name} has left this chatroom.\n\n".encode())
        elif way == 5:  # half-close, read to the end
            await half_close(client)
        elif way == 6:  # plain close without a word
            await client.aclose()
            return
        else:  # reset after a full conversation
            await reset(client)
            return
        with trio.fail_after(RECEIVE_TIMEOUT):
            while await client.stream.receive_some(65536):
                pass
        await client.aclose()
    except BaseException:
        await trio.aclose_forcefully(client.stream)
        raise


async def test_churning_crowd_loses_nothing_for_a_fixed_group_and_leaks_nothing() -> None:
    """200 clients churn through a room while 5 chat in it: the 5 get everything, in one order.

    Afterwards the process's open descriptors and trio tasks are back at their baseline.
    """
    async with tcp_server() as (server, port):
        fixed = [await joined_member(port, "fixed", f"fixed{i}") for i in range(FIXED)]
        for index, client in enumerate(fixed):
            for later in range(index + 1, FIXED):
                await client.receive_until(f"fixed{later} has joined this chatroom.\n\n".encode())
        baseline_fds, baseline_tasks = open_fds(), trio_tasks()
        received: list[list[bytes]] = [[] for _ in fixed]
        rng = random.Random(20261124)

        async def fixed_member(index: int) -> None:
            client = fixed[index]
            for i in range(FIXED_MESSAGES):
                await client.send(chat(0, f"fixed{index}", f"{index}:{i}"))
                received[index] += await read_broadcasts_until_helo(client)

        async def crowd() -> None:
            limiter = trio.CapacityLimiter(CHURN_AT_ONCE)

            async def one(number: int, seed: int) -> None:
                async with limiter:
                    await churn_once(port, number, random.Random(seed))

            async with trio.open_nursery() as nursery:
                for number in range(CHURNERS):
                    nursery.start_soon(one, number, rng.getrandbits(32))

        with trio.fail_after(6 * RECEIVE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(crowd)
                for index in range(FIXED):
                    nursery.start_soon(fixed_member, index)
        await settle(lambda: len(server.connections) == FIXED)
        for index, client in enumerate(fixed):
            received[index] += await read_broadcasts_until_helo(client)

        # Every fixed member saw the very same sequence, with every fixed chat exactly once
        # and each sender's chats in the order sent.
        assert all(stream == received[0] for stream in received)
        fixed_chats = [m for m in received[0] if m.startswith(b"CHAT: 0\nCLIENT_NAME: fixed")]
        for index in range(FIXED):
            mine = [
                m
                for m in fixed_chats
                if m.startswith(f"CHAT: 0\nCLIENT_NAME: fixed{index}\n".encode())
            ]
            assert mine == [
                broadcast(0, f"fixed{index}", f"{index}:{i}") for i in range(FIXED_MESSAGES)
            ]
        assert len(fixed_chats) == FIXED * FIXED_MESSAGES
        # Every churner that was announced as joined was announced as gone, once.
        for number in range(CHURNERS):
            name = f"churn{number}"
            joins = received[0].count(broadcast(0, name, f"{name} has joined this chatroom."))
            leaves = received[0].count(broadcast(0, name, f"{name} has left this chatroom."))
            assert joins == leaves <= 1

        await settle(lambda: (open_fds(), trio_tasks()) == (baseline_fds, baseline_tasks))
        assert (open_fds(), trio_tasks()) == (baseline_fds, baseline_tasks)
        for client in fixed:
            await client.aclose()


# -- shutdown under load ----------------------------------------------------------------------

CHATTERS = 500
ROOM_SIZE = 50
# docs/protocol.md: the service exits "promptly (well under a second with no backlog)"; the issue
# asks for within a second while 500 clients chat.
SHUTDOWN_LIMIT = 1.0


def scheduler_seconds(pid: int) -> tuple[float, float]:
    """Seconds process `pid`'s main thread has spent on a CPU, and waiting for one.

    From /proc/PID/schedstat, which stays readable while the process is a zombie.
    """
    with open(f"/proc/{pid}/schedstat") as file:
        on_cpu, waiting, _ = file.read().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


async def wait_for_exit(pid: int) -> None:
    """Wait until process `pid` has exited, without reaping it."""
    pidfd = os.pidfd_open(pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


class ServerProcess:
    """`trio-chat serve` in a child process, its log collected as it is written."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.log = bytearray()
        self.port_known = trio.Event()
        self.port = 0

    async def collect_log(self) -> None:
        assert self.process.stderr is not None
        async for data in self.process.stderr:
            self.log += data
            if not self.port_known.is_set() and b"listening on" in self.log:
                line = self.log.split(b"listening on", 1)[1].split(b"\n", 1)[0]
                self.port = int(line.split(b"port")[1])
                self.port_known.set()


@asynccontextmanager
async def server_process(*, max_open_files: int | None = None) -> AsyncIterator[ServerProcess]:
    """A server process on 127.0.0.1 and a free port; killed at the end if still running.

    With `max_open_files`, the process may have no more descriptors open than that.
    """
    command = [sys.executable, "-m", "trio_chat", "serve", "--host", "127.0.0.1", "--port", "0"]
    if max_open_files is not None:
        # prlimit(1) sets the limit on the interpreter before it starts; so does the server's
        # own shell when an operator sets `ulimit -n`.
        command = ["prlimit", f"--nofile={max_open_files}", "--", *command]
    process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
    server = ServerProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.collect_log)
            with trio.fail_after(RECEIVE_TIMEOUT):
                await server.port_known.wait()
            yield server
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def chatter(port: int, number: int, started: trio.Semaphore, stop: trio.Event) -> None:
    """Join a room and chat in it, a message per round trip, until the server goes away."""
    name = f"c{number}"
    try:
        async with await Client.connect(port) as client:
            await client.send(join(f"room{number // ROOM_SIZE}", name))
            await client.receive_until(b"JOIN_ID: ")
            started.release()
            for i in range(10**9):
                if stop.is_set():
                    return
                await client.send(chat(number // ROOM_SIZE, name, f"{i}"))
                await client.receive_until(f"CLIENT_NAME: {name}\nMESSAGE: {i}\n\n".encode())
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the service stopped


async def test_kill_service_stops_a_busy_server_within_a_second() -> None:
    """KILL_SERVICE while 500 clients chat: the process exits 0 within a second, no traceback."""
    async with server_process() as server:
        stop = trio.Event()
        started = trio.Semaphore(0)
        async with trio.open_nursery() as nursery:
            for number in range(CHATTERS):
                nursery.start_soon(chatter, server.port, number, started, stop)
            with trio.fail_after(6 * RECEIVE_TIMEOUT):
                for _ in range(CHATTERS):
                    await started.acquire()
            killer = await Client.connect(server.port)
            pid = server.process.pid
            _, waited_before = scheduler_seconds(pid)
            await killer.send("KILL_SERVICE\n")
            start = trio.current_time()
            with trio.fail_after(RECEIVE_TIMEOUT):
                await wait_for_exit(pid)
            elapsed = trio.current_time() - start
            _, waited_after = scheduler_seconds(pid)
            status = await server.process.wait()
            stop.set()
            await killer.aclose()
    assert status == 0
    # The time it took, less any time it spent waiting for a CPU that other processes (this
    # test's 500 clients among them) were using: on a machine of its own, it exits that fast.
    assert elapsed - (waited_after - waited_before) < SHUTDOWN_LIMIT
    assert b"Traceback" not in server.log
    assert b"ERROR" not in server.log
    assert b"shutting down: KILL_SERVICE" in server.log


# -- out of descriptors -----------------------------------------------------------------------


async def test_server_out_of_descriptors_makes_clients_wait_not_fail() -> None:
    """With too few descriptors for everyone, clients wait in the backlog and all get served."""
    async with server_process(max_open_files=48) as server:
        served = 0

        async def visit(i: int) -> None:
            nonlocal served
            async with await Client.connect(server.port) as client:
                await client.send(f"HELO {i}\n")
                with trio.fail_after(6 * RECEIVE_TIMEOUT):
                    await client.receive_until(b"StudentID:")
                await client.receive_until(b"\n")
                await client.send(DISCONNECT)
                await client.expect_eof()
                served += 1

        # All connect before any is let go: the server's table fills while others wait.
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(visit, i)
        assert served == 100
        async with await Client.connect(server.port) as killer:
            await killer.send("KILL_SERVICE\n")
            with trio.fail_after(RECEIVE_TIMEOUT):
                status = await server.process.wait()
    assert status == 0
    assert b"Too many open files" in server.log  # it did run out, and said so
    assert b"Traceback" not in server.log


# -- shutdown in bounded time -------------------------------------------------------------------
# How long 10,000 idle connections take to shut down is measured by `nox -s shutdownbench`;
# these tests hold the three things that keep it short.


async def test_an_idle_connection_on_a_socket_costs_one_task() -> None:
    """An idle plain-socket connection runs its reader task only (its writer starts when a
    client reads too slowly, or at the end): shutdown unwinds one task per connection."""
    async with tcp_server() as (_server, port):
        first = await Client.connect(port)
        await first.barrier()  # the run's flusher is started by now
        baseline = trio_tasks()
        clients = [await Client.connect(port) for _ in range(20)]
        for client in clients:
            await client.barrier()
        assert trio_tasks() - baseline == len(clients)
        for client in [first, *clients]:
            await client.aclose()


async def test_a_connection_that_ends_is_freed_without_the_garbage_collector() -> None:
    """Nothing of a connection is left in a reference cycle once it ends: with thousands
    ending together at shutdown, the collector would otherwise walk them all again."""
    gc.disable()
    try:
        async with tcp_server() as (server, port):
            client = await Client.connect(port)
            await client.send(join("room", "amy"))
            await client.receive_until(b"has joined this chatroom.\n\n")
            (connection,) = server.connections
            gone = weakref.ref(connection)
            del connection
            await client.aclose()
            await settle(lambda: not server.connections)
            assert gone() is None
    finally:
        gc.enable()


async def test_shutdown_logs_one_line_for_every_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At shutdown the server says once how many connections it closes, not once for each."""
    caplog.set_level(logging.INFO, logger="trio_chat")
    async with tcp_server() as (_server, port):
        clients = [await Client.connect(port) for _ in range(5)]
        for client in clients:
            await client.barrier()
        await clients[0].send("KILL_SERVICE\n")
        for client in clients:
            await client.expect_eof()
            await client.aclose()
    assert "closing 5 connections" in caplog.text
    assert "disconnected" not in caplog.text
