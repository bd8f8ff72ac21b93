"""Limits that keep the server up whatever one client does (docs/protocol.md section 6).

Slow consumers, oversize input, the connection limit and the rooms-per-connection limit, each
over in-memory streams first and then over real sockets on 127.0.0.1. The figures are the
issue's own (2000 messages of 1 KiB, 100 MiB without a newline): they run in a few seconds.
"""

from __future__ import annotations

import functools
import logging
import re
import socket
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from tests.chatclient import RECEIVE_TIMEOUT, Client
from trio_chat.cli import build_parser
from trio_chat.cli.serve import _TUNABLES, config_from_args
from trio_chat.config import KIB, MIB, Config
from trio_chat.connection import Connection
from trio_chat.rooms import Outcome, Registry, Session
from trio_chat.server import ChatServer

# -- the wire, as docs/protocol.md section 2 writes it ---------------------------------------------


def join(room: str, name: str) -> str:
    """A JOIN_CHATROOM request."""
    return f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: {name}\n"


def chat(room_ref: int, name: str, message: str, join_id: int = 0) -> str:
    """A CHAT request."""
    return f"CHAT: {room_ref}\nJOIN_ID: {join_id}\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n"


def broadcast(room_ref: int, name: str, message: str) -> bytes:
    """A CHAT broadcast as every member receives it."""
    return f"CHAT: {room_ref}\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n".encode()


def joined(room: str, ip: str, port: int, room_ref: int, join_id: int) -> bytes:
    """The JOINED_CHATROOM reply."""
    return (
        f"JOINED_CHATROOM: {room}\nSERVER_IP: {ip}\nPORT: {port}\n"
        f"ROOM_REF: {room_ref}\nJOIN_ID: {join_id}\n"
    ).encode()


def error_reply(code: int) -> bytes:
    """The start of an ERROR_CODE reply; the description that follows is free text."""
    return f"ERROR_CODE: {code}\nERROR_DESCRIPTION: ".encode()


async def expect_error(client: Client, code: int) -> None:
    """Assert the next reply is ERROR_CODE `code` with a one-line description."""
    assert await client.receive_exactly(len(error_reply(code))) == error_reply(code)
    description = await client.receive_until(b"\n")
    assert description.strip()


async def read_broadcasts(client: Client, count: int) -> list[bytes]:
    """The next `count` CHAT broadcasts (each ends with the blank line after its message)."""
    return [await client.receive_until(b"\n\n") for _ in range(count)]


# -- servers ----------------------------------------------------------------------------------

StreamPair = Callable[[], tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]]


class MemoryServer:
    """A `ChatServer` whose clients connect over in-memory stream pairs."""

    def __init__(self, server: ChatServer, nursery: trio.Nursery) -> None:
        self.server = server
        self.nursery = nursery

    def connect(
        self, peer: str = "memory", pair: StreamPair = trio.testing.memory_stream_pair
    ) -> Client:
        """A new client; `pair` makes the streams (lockstep ones model a client not reading)."""
        client_stream, server_stream = pair()

        async def handle() -> None:
            await self.server.handle_stream(server_stream, local=("10.0.0.1", 7000), peer=peer)

        self.nursery.start_soon(handle)
        return Client(client_stream)


@asynccontextmanager
async def memory_server(config: Config) -> AsyncIterator[MemoryServer]:
    """A server over memory streams; every connection task must end cleanly by the block's end.

    Any exception escaping a connection fails the test through the nursery.
    """
    async with trio.open_nursery() as nursery:
        yield MemoryServer(ChatServer(config), nursery)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tcp_server(config: Config) -> AsyncIterator[tuple[ChatServer, int]]:
    """A server on 127.0.0.1 and a free port, in this process; yields it and its port."""
    server = ChatServer(config)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_listeners, listeners)
        yield server, listeners[0].socket.getsockname()[1]
        server.shutdown("test over")


async def connect_with_receive_buffer(port: int, size: int) -> Client:
    """A TCP client whose socket receive buffer is `size` bytes (set before connecting)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    await sock.connect(("127.0.0.1", port))
    return Client(trio.SocketStream(sock))


def connection_of(server: ChatServer, peer_prefix: str) -> Connection:
    """The server's connection whose peer name starts with `peer_prefix`."""
    (connection,) = [c for c in server.connections if c.peer.startswith(peer_prefix)]
    return connection


# -- slow consumers ---------------------------------------------------------------------------

MESSAGES = 2000
MESSAGE_TEXT = "x" * (1 * KIB - 5)


def numbered(i: int) -> str:
    """Message `i` of the busy room: 1 KiB of text that says its own position."""
    return f"{i:04d}|{MESSAGE_TEXT}"


async def chat_in_busy_room(
    sender: Client,
    readers: list[Client],
    room_ref: int,
    on_progress: Callable[[], None] = lambda: None,
) -> list[list[bytes]]:
    """Send MESSAGES chats from `sender` while `sender` and `readers` read everything.

    Returns what each reader received (all broadcasts, announcements included). Every client
    here reads as fast as it can; only the slow client, which is not among them, does not.
    """
    received: list[list[bytes]] = [[] for _ in readers]
    last = broadcast(room_ref, "sender", numbered(MESSAGES - 1))

    async def read_all(index: int, client: Client) -> None:
        while not received[index] or received[index][-1] != last:
            received[index].append(await client.receive_until(b"\n\n"))

    async def send_all() -> None:
        for i in range(MESSAGES):
            await sender.send(chat(room_ref, "sender", numbered(i)))
            on_progress()

    with trio.fail_after(6 * RECEIVE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for index, client in enumerate(readers):
                nursery.start_soon(read_all, index, client)
            nursery.start_soon(send_all)
    return received


# How far past `max_outbound` the slow client's leave may come. The cut-off takes effect when
# its connection task next runs, so the chats the server reads in one receive (up to 64 KiB)
# may still go out first; over TCP the kernel's socket buffers also take some (tens of KiB on
# loopback with a 4 KiB receive buffer; generous for other kernels).
ELSEWHERE_LOCKSTEP = 64 * KIB
ELSEWHERE_TCP = 256 * KIB


def check_busy_room(received: list[list[bytes]], room_ref: int, limit: int, elsewhere: int) -> None:
    """Every reader got every chat once and in order, and the slow one's leave early on."""
    chats = [broadcast(room_ref, "sender", numbered(i)) for i in range(MESSAGES)]
    left = broadcast(room_ref, "slow", "slow has left this chatroom.")
    for stream in received:
        assert [m for m in stream if m != left] == chats
        assert stream.count(left) == 1
        # Cut off once `limit` bytes wait for it (plus what is held elsewhere), not at the end.
        assert stream.index(left) <= (limit + elsewhere) // len(chats[0])


async def test_client_that_never_reads_over_lockstep_stream_is_cut_off_and_others_get_everything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A member that never reads is disconnected when its queue is full; the rest get all 2000."""
    caplog.set_level(logging.INFO, logger="trio_chat")
    config = Config()
    async with memory_server(config) as server:
        sender = server.connect("sender")
        readers = [server.connect(f"reader{i}") for i in range(3)]
        slow = server.connect("slow", pair=trio.testing.lockstep_stream_pair)
        members = [(sender, "sender")] + [(r, f"r{i}") for i, r in enumerate(readers)]
        for client, name in members:
            await client.send(join("busy", name))
            await client.receive_until(f"MESSAGE: {name} has joined this chatroom.\n\n".encode())
        await slow.send(join("busy", "slow"))  # its replies wait for a read that never comes
        for client, name in members:
            later = [n for _, n in members[members.index((client, name)) + 1 :]] + ["slow"]
            for other in later:
                await client.receive_until(
                    f"MESSAGE: {other} has joined this chatroom.\n\n".encode()
                )
        unsent: list[int] = []

        def watch_slow_queue() -> None:
            slow_connection = [c for c in server.server.connections if c.peer == "slow"]
            unsent.extend(c.outbox.unsent for c in slow_connection)

        received = await chat_in_busy_room(sender, [sender, *readers], 0, watch_slow_queue)
        check_busy_room(received, 0, config.max_outbound, ELSEWHERE_LOCKSTEP)
        assert max(unsent) <= config.max_outbound
        assert "slow" not in {c.peer for c in server.server.connections}
        assert re.search(
            rf"slow is too slow: \d+ bytes unsent and \d+ more would pass the limit of "
            rf"{config.max_outbound}; disconnecting it",
            caplog.text,
        )
        for client, _ in members:
            await client.expect_nothing()
        # What the slow client can still read is a clean prefix of its stream, then the end.
        tail = bytearray()
        while data := await slow.stream.receive_some(64 * KIB):
            tail += data
        assert bytes(tail).startswith(joined("busy", "10.0.0.1", 7000, 0, 4))


async def test_client_with_tiny_receive_buffer_over_tcp_is_cut_off_and_others_get_everything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Over real sockets a member with a 4 KiB receive buffer that never reads is cut off."""
    caplog.set_level(logging.INFO, logger="trio_chat")
    config = Config(host="127.0.0.1")
    async with tcp_server(config) as (_server, port):
        sender = await Client.connect(port)
        readers = [await Client.connect(port) for _ in range(3)]
        members = [(sender, "sender")] + [(r, f"r{i}") for i, r in enumerate(readers)]
        for client, name in members:
            await client.send(join("busy", name))
            await client.receive_until(f"MESSAGE: {name} has joined this chatroom.\n\n".encode())
        slow = await connect_with_receive_buffer(port, 4 * KIB)
        await slow.send(join("busy", "slow"))
        for index, (client, _) in enumerate(members):
            for _, other in members[index + 1 :]:
                await client.receive_until(
                    f"MESSAGE: {other} has joined this chatroom.\n\n".encode()
                )
            await client.receive_until(b"MESSAGE: slow has joined this chatroom.\n\n")
        received = await chat_in_busy_room(sender, [sender, *readers], 0)
        check_busy_room(received, 0, config.max_outbound, ELSEWHERE_TCP)
        assert "is too slow: " in caplog.text
        for client, _ in members:
            await client.expect_nothing()
        for client in [*readers, sender, slow]:
            await client.aclose()


async def send_until_cut_off(client: Client, data: bytes) -> None:
    """Send `data` again and again until the server closes the connection."""
    with pytest.raises(trio.BrokenResourceError):  # noqa: PT012 (the loop is the statement)
        while True:
            await client.send(data)


async def test_slow_member_of_several_rooms_leaves_each_when_cut_off() -> None:
    """A member cut off for not reading is announced as gone in each of its rooms, in order."""
    config = Config(max_outbound=16 * KIB)
    rooms = ["a", "b", "c"]
    async with memory_server(config) as server:
        slow = server.connect("slow", pair=trio.testing.lockstep_stream_pair)
        talker = server.connect("talker")
        for room in rooms:
            await talker.send(join(room, "talker"))
            await talker.receive_until(b"MESSAGE: talker has joined this chatroom.\n\n")
            await slow.send(join(room, f"slow-{room}"))
            await talker.receive_until(
                f"MESSAGE: slow-{room} has joined this chatroom.\n\n".encode()
            )
        leaves: list[bytes] = []
        sent = 0
        with trio.fail_after(RECEIVE_TIMEOUT):
            while not leaves:
                text = f"{sent:05d}" + "t" * 1000
                await talker.send(chat(1, "talker", text))
                while (message := await talker.receive_until(b"\n\n")) != broadcast(
                    1, "talker", text
                ):
                    leaves.append(message)
                sent += 1
        leaves += [await talker.receive_until(b"\n\n") for _ in range(3 - len(leaves))]
        assert leaves == [
            broadcast(ref, f"slow-{room}", f"slow-{room} has left this chatroom.")
            for ref, room in enumerate(rooms)
        ]
        assert sent <= config.max_outbound // 1000 + 4  # cut off within a few round trips
        await talker.expect_nothing()


async def test_client_that_pipelines_requests_but_never_reads_is_cut_off() -> None:
    """Replies to a client's own requests are bounded too: HELO flood without reading ends it."""
    config = Config(max_outbound=64 * KIB)
    async with memory_server(config) as server:
        greedy = server.connect("greedy", pair=trio.testing.lockstep_stream_pair)
        with trio.fail_after(RECEIVE_TIMEOUT):
            await send_until_cut_off(greedy, b"HELO flood\n" * 100)
        other = server.connect()
        await other.barrier()


# -- oversize input ---------------------------------------------------------------------------

SMALL = Config(max_line=2 * KIB, max_message=1 * KIB, host="127.0.0.1")


async def check_oversize_closes(client: Client, witness: Client, request: bytes) -> None:
    """`client` (in room 0 as "big", beside `witness`) sends `request`: error 4, leave, EOF."""
    await client.send(request)
    await expect_error(client, 4)
    await client.expect_eof()
    await witness.receive_until(broadcast(0, "big", "big has left this chatroom."))
    await witness.expect_nothing()


async def two_in_a_room(connect: Callable[[], Awaitable[Client]]) -> tuple[Client, Client]:
    """Two clients in room "r" (ROOM_REF 0): "big" and "witness", announcements consumed."""
    big, witness = await connect(), await connect()
    await witness.send(join("r", "witness"))
    await witness.receive_until(b"MESSAGE: witness has joined this chatroom.\n\n")
    await big.send(join("r", "big"))
    await big.receive_until(b"MESSAGE: big has joined this chatroom.\n\n")
    await witness.receive_until(b"MESSAGE: big has joined this chatroom.\n\n")
    return big, witness


OVERSIZE_REQUESTS = {
    "line without newline": b"x" * (SMALL.max_line + 2),
    "line with newline": b"HELO " + b"y" * SMALL.max_line + b"\n",
    "field line": chat(0, "big", "z" * SMALL.max_line).encode(),
    "message in one line": chat(0, "big", "m" * (SMALL.max_message + 1)).encode(),
    "message over many lines": chat(0, "big", "\n".join(["w" * 400] * 3)).encode(),
}


@pytest.mark.parametrize("request_bytes", OVERSIZE_REQUESTS.values(), ids=OVERSIZE_REQUESTS.keys())
async def test_oversize_request_over_memory_gets_error_4_and_close(request_bytes: bytes) -> None:
    """Over memory streams a line or CHAT message over its limit gets error 4, then EOF."""
    async with memory_server(SMALL) as server:

        async def connect() -> Client:
            return server.connect()

        big, witness = await two_in_a_room(connect)
        await check_oversize_closes(big, witness, request_bytes)


@pytest.mark.parametrize("request_bytes", OVERSIZE_REQUESTS.values(), ids=OVERSIZE_REQUESTS.keys())
async def test_oversize_request_over_tcp_gets_error_4_and_close(request_bytes: bytes) -> None:
    """Over real sockets a line or CHAT message over its limit gets error 4, then a clean EOF."""
    async with tcp_server(SMALL) as (_, port):

        async def connect() -> Client:
            return await Client.connect(port)

        big, witness = await two_in_a_room(connect)
        await check_oversize_closes(big, witness, request_bytes)
        await big.aclose()
        await witness.aclose()


async def test_requests_at_the_limits_are_served() -> None:
    """A line of exactly max_line bytes and a message of exactly max_message bytes are fine."""
    async with memory_server(SMALL) as server:
        client = server.connect()
        await client.send(join("r", "n"))
        await client.receive_until(b"MESSAGE: n has joined this chatroom.\n\n")
        helo_text = "h" * (SMALL.max_line - len("HELO "))
        await client.send(f"HELO {helo_text}\r\n")
        await client.receive_until(b"StudentID:")
        await client.receive_until(b"\n")
        message = "\n".join(["a" * 400, "b" * 400, "c" * (SMALL.max_message - 802)])
        await client.send(chat(0, "n", message))
        assert await client.receive_until(b"\n\n") == broadcast(0, "n", message)
        await client.expect_nothing()


HUNDRED_MIB = 100 * MIB


async def send_without_newline(client: Client, total: int) -> int:
    """Send `total` bytes of one endless line, 1 MiB at a time; returns how much went out."""
    chunk = b"a" * MIB
    sent = 0
    try:
        while sent < total:
            await client.send(chunk)
            sent += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the server has closed the connection: it need not read the rest
    return sent


async def test_100_mib_without_newline_over_memory_is_never_held() -> None:
    """100 MiB without a newline: error 4 comes after at most a line's worth; memory stays low."""
    config = Config()
    async with memory_server(config) as server:
        # Lockstep: each send waits for the server to read it, so nothing piles up in between
        # and any growth tracemalloc sees is the server's own.
        flooder = server.connect("flood", pair=trio.testing.lockstep_stream_pair)
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_without_newline, flooder, HUNDRED_MIB)
                await expect_error(flooder, 4)
                await flooder.expect_eof()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # The line buffer, one receive and one 1 MiB chunk in flight are all that may be held.
        assert peak - baseline < 4 * MIB + 4 * config.max_line
        await server.connect().barrier()


async def test_100_mib_without_newline_over_tcp_is_never_held() -> None:
    """Over a real socket 100 MiB without a newline gets error 4; the server's memory stays low."""
    config = Config(host="127.0.0.1")
    async with tcp_server(config) as (_server, port):
        flooder = await Client.connect(port)
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_without_newline, flooder, HUNDRED_MIB)
                await expect_error(flooder, 4)
                with trio.fail_after(RECEIVE_TIMEOUT):
                    try:
                        while await flooder.stream.receive_some(KIB):
                            raise AssertionError("bytes after error 4")
                    except trio.BrokenResourceError:
                        pass  # a reset, if the grace ended while the flood was still coming
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - baseline < 4 * MIB + 4 * config.max_line
        await flooder.aclose()
        async with await Client.connect(port) as other:
            await other.barrier()


# -- connection limit -------------------------------------------------------------------------


async def served(client: Client) -> bool:
    """Whether the server has answered the HELO `client` sent (without waiting for it)."""
    with trio.move_on_after(0):
        await client.receive_until(b"StudentID:")
        return True
    return False


async def test_connections_beyond_the_limit_wait_and_are_served_in_turn() -> None:
    """Beyond max_connections clients wait in the backlog; each is served when a slot frees."""
    config = Config(host="127.0.0.1", max_connections=3)
    async with tcp_server(config) as (server, port):
        first = [await Client.connect(port) for _ in range(3)]
        for client in first:
            await client.barrier()
        waiting = [await Client.connect(port) for _ in range(5)]
        for client in waiting:
            await client.send("HELO waiting\n")
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert len(server.connections) == 3
        for client in waiting:
            assert not await served(client)
        # Each ended connection lets exactly one waiting client in; none is refused.
        for ended in first:
            await ended.send("DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: x\n")
            await ended.expect_eof()
            await ended.aclose()
        for client in waiting:
            await client.receive_until(b"StudentID:")
            await client.receive_until(b"\n")
            await client.send("DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: x\n")
            await client.expect_eof()
            await client.aclose()


async def test_many_clients_at_once_beyond_the_limit_are_all_served() -> None:
    """Fifty clients connecting at once to a server taking two at a time all get served."""
    config = Config(host="127.0.0.1", max_connections=2)
    async with tcp_server(config) as (_, port):

        async def visit(i: int) -> None:
            async with await Client.connect(port) as client:
                await client.send(f"HELO {i}\nDISCONNECT: 0\nPORT: 0\nCLIENT_NAME: c{i}\n")
                assert await client.receive_until(b"\n") == f"HELO {i}\n".encode()
                await client.receive_until(b"StudentID:")
                await client.receive_until(b"\n")
                await client.expect_eof()

        with trio.fail_after(6 * RECEIVE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(visit, i)


# -- rooms per connection ---------------------------------------------------------------------


async def test_joining_one_room_too_many_gets_error_5_and_the_connection_stays() -> None:
    """Over max_rooms_per_connection a JOIN gets error 5; rejoining and leave-then-join work."""
    async with memory_server(Config(max_rooms_per_connection=3)) as server:
        client = server.connect()
        for ref, room in enumerate("abc"):
            await client.send(join(room, "n"))
            assert await client.receive_until(b"\n\n") == joined(
                room, "10.0.0.1", 7000, ref, 0
            ) + broadcast(ref, "n", "n has joined this chatroom.")
        await client.send(join("d", "n"))
        await expect_error(client, 5)
        await client.send(join("b", "n"))  # already a member: not one more room
        await client.receive_until(b"MESSAGE: n has joined this chatroom.\n\n")
        await client.send("LEAVE_CHATROOM: 0\nJOIN_ID: 0\nCLIENT_NAME: n\n")
        await client.receive_until(b"MESSAGE: n has left this chatroom.\n\n")
        await client.send(join("e", "n"))
        reply = await client.receive_until(b"\n\n")
        assert reply.startswith(b"JOINED_CHATROOM: e\n")
        await client.send(chat(0, "n", "hello"))
        await expect_error(client, 3)
        await client.expect_nothing()


# -- timeouts ---------------------------------------------------------------------------------


async def test_quiet_client_is_kept_for_days_by_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With no idle timeout (the default), a silent connection is still served a week later."""
    async with memory_server(Config()) as server:
        client = server.connect()
        await client.send(join("r", "n"))
        await client.receive_until(b"\n\n")
        await trio.sleep(7 * 24 * 3600)
        await client.barrier()


async def test_idle_timeout_closes_a_silent_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With idle_timeout set, a connection silent that long is closed and leaves its rooms."""
    async with memory_server(Config(idle_timeout=30.0)) as server:
        quiet, talker = server.connect(), server.connect()
        await quiet.send(join("r", "quiet"))
        await quiet.receive_until(b"\n\n")
        await talker.send(join("r", "talker"))
        await talker.receive_until(b"MESSAGE: talker has joined this chatroom.\n\n")
        start = trio.current_time()
        await trio.sleep(25)
        await talker.barrier()  # the talker spoke at 25 s: it is not idle at 30 s
        await quiet.receive_until(b"MESSAGE: talker has joined this chatroom.\n\n")
        await quiet.expect_eof()
        assert trio.current_time() - start == pytest.approx(30)
        await talker.receive_until(b"MESSAGE: quiet has left this chatroom.\n\n")
        await trio.sleep(5)
        await talker.barrier()


# -- settings ---------------------------------------------------------------------------------


def test_every_limit_and_timeout_is_a_serve_option() -> None:
    """Each Config limit and timeout can be set with a `trio-chat serve` option of its name."""
    fields = [a.name for a in attrs.fields(Config)]
    limits = [name for name in fields if name.startswith(("max_", "receive_", "web_max_"))]
    timeouts = ["disconnect_grace", "idle_timeout", "accept_retry_delay", "web_request_timeout"]
    assert set(limits + timeouts) == set(_TUNABLES)
    argv = ["serve", "--port", "0"]
    for name in _TUNABLES:
        argv += ["--" + name.replace("_", "-"), "7"]
    config = config_from_args(build_parser().parse_args(argv))
    for name in _TUNABLES:
        assert getattr(config, name) == 7


def test_defaults_are_those_of_protocol_section_6() -> None:
    """The defaults are docs/protocol.md's: 64 KiB messages on lines that leave room for the
    ``MESSAGE: `` before them, 1 MiB queue, 10,000 connections, 1,000 rooms each."""
    config = Config()
    assert (config.max_message, config.max_outbound) == (64 * KIB, MIB)
    assert config.max_line == 64 * KIB + len("MESSAGE: ")
    assert Config(max_message=1000).max_line == 1009
    assert Config(max_message=1000, max_line=50).max_line == 50
    assert (config.max_connections, config.max_rooms_per_connection) == (10_000, 1_000)
    assert config.idle_timeout is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (name, value)
        for name in _TUNABLES
        for value in (0, -1)
        if not (value == 0 and name == "max_connections_per_ip")  # 0 turns that one off
    ],
)
def test_nonsense_limits_are_refused(name: str, value: int) -> None:
    """A limit or timeout of zero or less is refused when the settings are made."""
    settings: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=name):
        Config(**settings)


# -- rooms are never deleted ------------------------------------------------------------------


async def test_one_client_creating_rooms_cannot_grow_memory_without_bound() -> None:
    """Joining and leaving ever-new rooms stops at max_rooms (error 5), so a client cannot
    grow the server's memory for ever although rooms are never deleted."""
    config = Config(max_rooms=1_000)
    async with memory_server(config) as server:
        client = server.connect()
        name = "r" * (config.max_name - 8)  # as long as names may be
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            for ref in range(config.max_rooms):
                await client.send(join(f"{ref:08}{name}", "n"))
                await client.send(f"LEAVE_CHATROOM: {ref}\nJOIN_ID: 0\nCLIENT_NAME: n\n")
                await client.receive_until(b"MESSAGE: n has left this chatroom.\n\n")
            for ref in range(config.max_rooms, 3 * config.max_rooms):
                await client.send(join(f"{ref:08}{name}", "n"))
                await client.expect_error(5)
            await client.barrier()
            growth = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            tracemalloc.stop()
        # About 1 KiB a room at most; the 2,000 refused JOINs add nothing.
        assert growth < config.max_rooms * KIB


async def test_names_longer_than_max_name_are_refused() -> None:
    """A room or client name over max_name bytes gets error 1 and creates nothing."""
    config = Config(max_name=16)
    async with memory_server(config) as server:
        client = server.connect()
        await client.send(join("r" * 17, "n"))
        await client.expect_error(1)
        await client.send(join("r", "é" * 9))  # 9 characters, 18 bytes
        await client.expect_error(1)
        await client.send(join("r" * 16, "n" * 16))
        await client.receive_until(b"has joined this chatroom.\n\n")
        await client.barrier()


# -- fairness ---------------------------------------------------------------------------------


FAIRNESS = Config(receive_size=8 * KIB)  # a receive of 4096 tiny lines


async def lines_handled_before_another_clients_helo(caplog: pytest.LogCaptureFixture) -> int:
    """How many of one client's tiny lines are handled before another client's HELO.

    Both arrive before the server runs again: one full receive of tiny unknown lines (the
    most work per byte a client can ask for) and a HELO on another connection.
    """
    caplog.clear()
    server = ChatServer(FAIRNESS)
    async with trio.open_nursery() as nursery:
        streams = {}
        for peer in ("flood", "good"):
            _, server_stream = trio.testing.memory_stream_pair()
            streams[peer] = server_stream
            handle = functools.partial(
                server.handle_stream, server_stream, local=("10.0.0.1", 7000), peer=peer
            )
            nursery.start_soon(handle)
        await trio.testing.wait_all_tasks_blocked()
        streams["flood"].receive_stream.put_data(b"x\n" * (FAIRNESS.receive_size // 2))
        streams["good"].receive_stream.put_data(b"HELO turn\n")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records]
    helo = next(i for i, m in enumerate(messages) if m.startswith("good: Helo"))
    return sum("flood: ignoring unknown line" in m for m in messages[:helo])


async def test_a_flood_of_tiny_lines_does_not_hold_up_other_clients(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One client's receive of 4096 tiny lines is not all handled before another's HELO."""
    caplog.set_level(logging.DEBUG, logger="trio_chat")
    # trio runs ready tasks in a random order: over ten rounds the flood goes first in some.
    handled = [await lines_handled_before_another_clients_helo(caplog) for _ in range(10)]
    # Handled without a pause, a receive of the default 64 KiB holds 32,768 such lines and
    # every other client waits about half a second (unknown lines are logged at INFO).
    assert max(handled) <= FAIRNESS.receive_size // 2 // 4


# -- fault isolation ----------------------------------------------------------------------------


async def test_an_unexpected_error_in_one_connection_closes_that_connection_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug met while handling one client's request (injected here into the room core) is
    logged with its traceback and ends that client's connection alone: its room hears it
    leave, and another client in the room is still served."""
    real_chat = Registry.chat

    def chat_with_a_bug(
        self: Registry, session: Session, room_ref: int, client_name: str, message: str
    ) -> Outcome:
        if message == "boom":
            raise RuntimeError("injected bug")
        return real_chat(self, session, room_ref, client_name, message)

    monkeypatch.setattr(Registry, "chat", chat_with_a_bug)
    async with (
        tcp_server(Config(host="127.0.0.1")) as (server, port),
        await Client.connect(port) as steady,
        await Client.connect(port) as victim,
    ):
        await steady.send(join("room", "steady"))
        await steady.receive_until(b"joined this chatroom.\n\n")
        await victim.send(join("room", "victim"))
        await victim.receive_until(b"joined this chatroom.\n\n")
        await steady.receive_until(b"joined this chatroom.\n\n")
        await victim.send(chat(0, "victim", "boom", join_id=1))
        await victim.expect_eof()
        assert await steady.receive_until(b"\n\n") == broadcast(
            0, "victim", "victim has left this chatroom."
        )
        await steady.send(chat(0, "steady", "still here"))
        assert await steady.receive_until(b"\n\n") == broadcast(0, "steady", "still here")
        await steady.barrier()
        assert len(server.connections) == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert "injected bug" in caplog.text


# -- limits that agree, and bodies held as bytes ------------------------------------------------


async def test_one_line_message_of_exactly_max_message_is_accepted_at_default_settings() -> None:
    """At default settings a one-line message of exactly max_message bytes is relayed, and
    one byte more is refused with error 4: the line limit leaves room for ``MESSAGE: ``."""
    config = Config()
    async with memory_server(config) as server:
        client = server.connect()
        await client.send(join("r", "n"))
        await client.receive_until(b"MESSAGE: n has joined this chatroom.\n\n")
        for size in (config.max_message - 1, config.max_message):
            message = "m" * size
            await client.send(chat(0, "n", message) + "HELO x\n")  # CRLF-free: line by line too
            assert await client.receive_until(b"\n\n") == broadcast(0, "n", message)
            await client.receive_until(b"StudentID:")
            await client.receive_until(b"\n")
        await client.send(chat(0, "n", "m" * (config.max_message + 1)))
        await expect_error(client, 4)
        await client.expect_eof()


# An unfinished CHAT message of many short lines, as an attacker sends it: about 64 KiB.
FAT_HEAD = b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: fat\nMESSAGE: ab\n"
FAT_LINES = b"ab\n" * 21_843


async def test_unfinished_multi_line_messages_are_held_in_about_their_size() -> None:
    """Connections holding unfinished messages of thousands of short lines cost the server
    less than twice the bytes held, other clients are still served, and each message is
    read whole once its blank line arrives."""
    connections = 20
    async with memory_server(Config()) as server:
        steady = server.connect("steady")
        await steady.send(join("r", "steady"))
        await steady.receive_until(b"has joined this chatroom.\n\n")
        fat = [server.connect(f"fat{i}") for i in range(connections)]
        await trio.testing.wait_all_tasks_blocked()
        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            for client in fat:
                await client.send(FAT_HEAD)
                for start in range(0, len(FAT_LINES), 4 * KIB):
                    await client.send(FAT_LINES[start : start + 4 * KIB])
            await trio.testing.wait_all_tasks_blocked()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        per_connection = (held - baseline) / connections
        assert per_connection < 2 * (len(FAT_HEAD) + len(FAT_LINES)), per_connection
        await steady.send(chat(0, "steady", "one\ntwo"))
        assert await steady.receive_until(b"\n\n") == broadcast(0, "steady", "one\ntwo")
        await fat[0].send(b"\n")  # the blank line: a whole CHAT, from a non-member
        await expect_error(fat[0], 3)
        await fat[0].barrier()
