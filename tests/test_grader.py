"""The sequence the lab's automated grader runs, and the ways its clients end, over real TCP.

Every step is checked on every open socket: the clients that must receive something receive
exactly that, and every other socket provably receives nothing (a HELO round trip).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from contextlib import AsyncExitStack

import trio

from tests.chatclient import (
    Client,
    chat_broadcast,
    chat_request,
    disconnect_request,
    expect_refused,
    helo_reply,
    join_request,
    joined_announcement,
    joined_reply,
    leave_request,
    left_announcement,
    left_reply,
)
from trio_chat.config import Config

IP = "127.0.0.1"
ROOM1, ROOM2 = 0, 1  # ROOM_REFs: room1 is joined first


class Grader:
    """The open connections of one grading run and a way to check a step on all of them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.open: list[Client] = []

    def joined(self, room: str, room_ref: int, join_id: int) -> str:
        return joined_reply(room, IP, self.port, room_ref, join_id)

    async def step(self, sender: Client, request: str, expected: Mapping[Client, str]) -> None:
        """Send `request` from `sender`; each socket receives what `expected` says, or nothing."""
        await sender.send(request)
        for client in self.open:
            if client in expected:
                await client.expect(expected[client])
            await client.expect_nothing()


async def test_grader_sequence(server_port: int) -> None:
    """The grader's whole run: HELO, joins, chats, leaves, DISCONNECT, rejoin, KILL_SERVICE."""
    port = server_port
    grader = Grader(port)
    async with AsyncExitStack() as stack:

        async def connect() -> Client:
            client = await stack.enter_async_context(await Client.connect(port))
            grader.open.append(client)
            return client

        # The base connection: HELO, then a line the server does not know, which must get
        # no reply at all.
        base = await connect()
        await base.send("HELO BASE_TEST\nUNKNOWN_MESSAGE something\n")
        await base.expect(helo_reply("BASE_TEST", IP, port, Config().student_id))
        await base.expect_nothing()

        c1, c2, c3, c4 = [await connect() for _ in range(4)]
        clients = [c1, c2, c3, c4]
        names = {c1: "client1", c2: "client2", c3: "client3", c4: "client4"}

        # Everyone joins room1 in turn: JOIN_IDs count connections from 0.
        for join_id, client in enumerate(clients):
            name = names[client]
            expected = {member: joined_announcement(ROOM1, name) for member in clients[:join_id]}
            expected[client] = grader.joined("room1", ROOM1, join_id) + joined_announcement(
                ROOM1, name
            )
            await grader.step(client, join_request("room1", name), expected)

        # client1 and client2 join room2, keeping their JOIN_IDs.
        await grader.step(
            c1,
            join_request("room2", "client1"),
            {c1: grader.joined("room2", ROOM2, 0) + joined_announcement(ROOM2, "client1")},
        )
        await grader.step(
            c2,
            join_request("room2", "client2"),
            {
                c1: joined_announcement(ROOM2, "client2"),
                c2: grader.joined("room2", ROOM2, 1) + joined_announcement(ROOM2, "client2"),
            },
        )

        # Chats reach the members of their room, sender included, and nobody else.
        message = chat_broadcast(ROOM1, "client1", "hello room1")
        await grader.step(
            c1,
            chat_request(ROOM1, 0, "client1", "hello room1"),
            dict.fromkeys(clients, message),
        )
        message = chat_broadcast(ROOM2, "client2", "hello room2")
        await grader.step(
            c2, chat_request(ROOM2, 1, "client2", "hello room2"), {c1: message, c2: message}
        )

        # client3 joins room2 too, then chats there with client1's JOIN_ID.
        await grader.step(
            c3,
            join_request("room2", "client3"),
            {
                c1: joined_announcement(ROOM2, "client3"),
                c2: joined_announcement(ROOM2, "client3"),
                c3: grader.joined("room2", ROOM2, 2) + joined_announcement(ROOM2, "client3"),
            },
        )
        message = chat_broadcast(ROOM2, "client3", "someone else's JOIN_ID")
        await grader.step(
            c3,
            chat_request(ROOM2, 0, "client3", "someone else's JOIN_ID"),
            dict.fromkeys([c1, c2, c3], message),
        )

        # client1 and client2 leave room1 in turn: LEFT, then the announcement to all left in
        # the room and to the leaver.
        for leaver, remaining in ((c1, [c2, c3, c4]), (c2, [c3, c4])):
            join_id = clients.index(leaver)
            name = names[leaver]
            expected = {member: left_announcement(ROOM1, name) for member in remaining}
            expected[leaver] = left_reply(ROOM1, join_id) + left_announcement(ROOM1, name)
            await grader.step(leaver, leave_request(ROOM1, join_id, name), expected)

        # room1 now holds client3 and client4 only.
        message = chat_broadcast(ROOM1, "client4", "just us")
        await grader.step(
            c4, chat_request(ROOM1, 3, "client4", "just us"), {c3: message, c4: message}
        )

        # client1 leaves room2 as well; then leaves it again (LEFT only, no announcement).
        await grader.step(
            c1,
            leave_request(ROOM2, 0, "client1"),
            {
                c1: left_reply(ROOM2, 0) + left_announcement(ROOM2, "client1"),
                c2: left_announcement(ROOM2, "client1"),
                c3: left_announcement(ROOM2, "client1"),
            },
        )
        await grader.step(c1, leave_request(ROOM2, 0, "client1"), {c1: left_reply(ROOM2, 0)})
        message = chat_broadcast(ROOM2, "client2", "client1 is gone")
        await grader.step(
            c2, chat_request(ROOM2, 1, "client2", "client1 is gone"), {c2: message, c3: message}
        )

        # client3 disconnects: its leave is announced in room1 then room2, to itself too;
        # then its connection ends.
        await c3.send(disconnect_request("client3"))
        await c3.expect(left_announcement(ROOM1, "client3") + left_announcement(ROOM2, "client3"))
        await c3.expect_eof()
        grader.open.remove(c3)
        await c4.expect(left_announcement(ROOM1, "client3"))
        await c2.expect(left_announcement(ROOM2, "client3"))
        for client in grader.open:
            await client.expect_nothing()

        # The others chat on.
        message = chat_broadcast(ROOM1, "client4", "after the disconnect")
        await grader.step(
            c4, chat_request(ROOM1, 3, "client4", "after the disconnect"), {c4: message}
        )
        message = chat_broadcast(ROOM2, "client2", "still here")
        await grader.step(c2, chat_request(ROOM2, 1, "client2", "still here"), {c2: message})

        # A new connection joins room1 under the disconnected client's name: a new JOIN_ID.
        c5 = await connect()
        await grader.step(
            c5,
            join_request("room1", "client3"),
            {
                c4: joined_announcement(ROOM1, "client3"),
                c5: grader.joined("room1", ROOM1, 4) + joined_announcement(ROOM1, "client3"),
            },
        )
        message = chat_broadcast(ROOM1, "client3", "back again")
        await grader.step(
            c5, chat_request(ROOM1, 4, "client3", "back again"), {c4: message, c5: message}
        )

        # KILL_SERVICE: no reply, every connection ends, and the port is closed.
        await base.send("KILL_SERVICE\n")
        for client in grader.open:
            await client.expect_eof()
        await expect_refused(port, IP)


async def test_reset_connection_is_announced(server_port: int) -> None:
    """A client whose connection is reset (no DISCONNECT, no FIN) is announced as leaving."""
    async with (
        await Client.connect(server_port) as gone,
        await Client.connect(server_port) as stays,
    ):
        await gone.send(join_request("room1", "gone"))
        await gone.receive_until(b"gone has joined this chatroom.\n\n")
        await stays.send(join_request("room1", "stays"))
        await stays.expect(
            joined_reply("room1", IP, server_port, ROOM1, 1) + joined_announcement(ROOM1, "stays")
        )
        assert isinstance(gone.stream, trio.SocketStream)
        # SO_LINGER with a zero timeout makes close() send a reset instead of a FIN.
        gone.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await gone.aclose()
        await stays.expect(left_announcement(ROOM1, "gone"))
        await stays.send(chat_request(ROOM1, 1, "stays", "alone"))
        await stays.expect(chat_broadcast(ROOM1, "stays", "alone"))
        await stays.expect_nothing()


async def test_kill_service_from_a_room_member(server_port: int) -> None:
    """KILL_SERVICE from a connection in a room also ends every connection, with no reply."""
    async with (
        await Client.connect(server_port) as member,
        await Client.connect(server_port) as other,
    ):
        await member.send(join_request("room1", "member"))
        await member.receive_until(b"member has joined this chatroom.\n\n")
        await other.barrier()
        await member.send("KILL_SERVICE\n")
        await member.expect_eof()
        await other.expect_eof()
        await expect_refused(server_port, IP)


async def test_replies_pipelined_before_kill_service_are_delivered(server_port: int) -> None:
    """A HELO sent in the same segment as KILL_SERVICE still gets its reply before EOF."""
    async with await Client.connect(server_port) as client:
        await client.send("HELO last words\nKILL_SERVICE\n")
        await client.expect(f"HELO last words\nIP:{IP}\nPort:{server_port}\nStudentID:")
        await client.receive_until(b"\n")
        await client.expect_eof()
    await expect_refused(server_port, IP)


async def test_half_closed_client_gets_every_reply(server_port: int) -> None:
    """A client that pipelines requests and half-closes gets every reply, then EOF."""
    count = 2000  # enough replies that they cannot all go out in one write
    async with await Client.connect(server_port) as client:
        chats = "".join(chat_request(ROOM1, 0, "amy", f"message {i}") for i in range(count))
        await client.send(join_request("room1", "amy") + chats)
        await client.send_eof()
        await client.expect(
            joined_reply("room1", IP, server_port, ROOM1, 0)
            + joined_announcement(ROOM1, "amy")
            + "".join(chat_broadcast(ROOM1, "amy", f"message {i}") for i in range(count))
        )
        await client.expect_eof()


async def test_disconnect_after_a_backlog_flushes_it_all(server_port: int) -> None:
    """DISCONNECT pipelined behind many requests: every reply arrives, then EOF."""
    count = 2000
    async with await Client.connect(server_port) as client:
        chats = "".join(chat_request(ROOM1, 0, "amy", f"message {i}") for i in range(count))
        await client.send(join_request("room1", "amy") + chats + disconnect_request("amy"))
        await client.expect(
            joined_reply("room1", IP, server_port, ROOM1, 0)
            + joined_announcement(ROOM1, "amy")
            + "".join(chat_broadcast(ROOM1, "amy", f"message {i}") for i in range(count))
            + left_announcement(ROOM1, "amy")
        )
        await client.expect_eof()
