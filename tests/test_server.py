"""The whole server over in-memory streams: one test per rule of docs/protocol.md.

No sockets and no real time: each client is a `trio.testing.memory_stream_pair`, steps are
ordered by HELO round trips (`Client.barrier`) or `wait_all_tasks_blocked`, and timeouts run
on the autojump clock.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.chatclient import (
    Client,
    chat_broadcast,
    chat_request,
    disconnect_request,
    helo_reply,
    join_request,
    joined_announcement,
    joined_reply,
    leave_request,
    left_announcement,
    left_reply,
)
from tests.conftest import MEMORY_IP, MEMORY_PORT, ConnectMemory, open_memory_connection
from trio_chat.config import Config
from trio_chat.server import ChatServer

STUDENT_ID = "test-id"  # what the memory_server fixture is configured with


def joined(room: str, room_ref: int, join_id: int) -> str:
    """The JOINED reply as an in-memory client sees it."""
    return joined_reply(room, MEMORY_IP, MEMORY_PORT, room_ref, join_id)


async def join(client: Client, room: str, name: str, room_ref: int, join_id: int) -> None:
    """Join and check the reply and the client's own announcement."""
    await client.send(join_request(room, name))
    await client.expect(joined(room, room_ref, join_id) + joined_announcement(room_ref, name))


@asynccontextmanager
async def shutdown_scope_nursery(server: ChatServer) -> AsyncIterator[trio.Nursery]:
    """A nursery inside `server.shutdown_scope`, as `serve` runs connections.

    Connections started in it end when KILL_SERVICE cancels the scope; the block waits for
    that to happen.
    """
    async with trio.open_nursery() as outer:

        async def run(task_status: trio.TaskStatus[trio.Nursery]) -> None:
            with server.shutdown_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.sleep_forever)
                    task_status.started(nursery)

        yield await outer.start(run)


# -- 1. transport and framing ------------------------------------------------------------------


async def test_nothing_is_sent_on_connect(connect_memory: ConnectMemory) -> None:
    """A new connection receives nothing until it sends a request."""
    client = connect_memory()
    await trio.testing.wait_all_tasks_blocked()
    await client.expect_nothing()


PIPELINE = (
    "HELO one\n"
    + join_request("room", "amy")
    + chat_request(0, 0, "amy", "hi")
    + leave_request(0, 0, "amy")
    + "HELO two\n"
)
PIPELINE_REPLIES = (
    helo_reply("one", MEMORY_IP, MEMORY_PORT, STUDENT_ID)
    + joined("room", 0, 0)
    + joined_announcement(0, "amy")
    + chat_broadcast(0, "amy", "hi")
    + left_reply(0, 0)
    + left_announcement(0, "amy")
    + helo_reply("two", MEMORY_IP, MEMORY_PORT, STUDENT_ID)
)


async def test_pipelined_requests_in_one_send(connect_memory: ConnectMemory) -> None:
    """Many requests in one segment are all answered, in order."""
    client = connect_memory()
    await client.send(PIPELINE)
    await client.expect(PIPELINE_REPLIES)
    await client.expect_nothing()


async def test_requests_one_byte_at_a_time(connect_memory: ConnectMemory) -> None:
    """Requests split down to single bytes are answered as if sent whole."""
    client = connect_memory()
    for byte in PIPELINE.encode():
        await client.send(bytes([byte]))
    await client.expect(PIPELINE_REPLIES)
    await client.expect_nothing()


async def test_crlf_requests(connect_memory: ConnectMemory) -> None:
    """Requests with CRLF line endings (telnet) are answered as with LF."""
    client = connect_memory()
    await client.send(PIPELINE.replace("\n", "\r\n"))
    await client.expect(PIPELINE_REPLIES)
    await client.expect_nothing()


async def test_field_spacing_and_order(connect_memory: ConnectMemory) -> None:
    """`KEY:value`, `KEY:  value ` and fields in any order are accepted."""
    client = connect_memory()
    await client.send("JOIN_CHATROOM:room\nCLIENT_NAME:  amy \nPORT:\nCLIENT_IP:0\n")
    await client.expect(joined("room", 0, 0) + joined_announcement(0, "amy"))
    await client.send("CHAT:0\nMESSAGE: hi\nCLIENT_NAME:amy\nJOIN_ID:  0 \n\n")
    await client.expect(chat_broadcast(0, "amy", "hi"))


async def test_blank_lines_between_requests_get_no_reply(connect_memory: ConnectMemory) -> None:
    """Blank lines between requests are ignored without a reply."""
    client = connect_memory()
    await client.send("\n\r\n  \n" + join_request("room", "amy") + "\n\n")
    await client.expect(joined("room", 0, 0) + joined_announcement(0, "amy"))
    await client.expect_nothing()


async def test_invalid_utf8_is_replaced_not_fatal(connect_memory: ConnectMemory) -> None:
    """Invalid UTF-8 in names and messages is relayed as replacement characters."""
    client = connect_memory()
    await client.send(b"JOIN_CHATROOM: r\xff\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: \xc3amy\n")
    await client.expect(joined("r\ufffd", 0, 0) + joined_announcement(0, "\ufffdamy"))
    await client.send(b"\xfe\xff\n" + chat_request(0, 0, "amy", "caf\xe9").encode("latin-1"))
    await client.expect(chat_broadcast(0, "amy", "caf\ufffd"))
    await client.expect_nothing()


# -- 2. HELO ---------------------------------------------------------------------------------


async def test_helo_reports_address_port_and_student_id(connect_memory: ConnectMemory) -> None:
    """HELO is answered with the text, the address connected to, the port and the student id."""
    client = connect_memory()
    await client.send("HELO text\n")
    await client.expect("HELO text\nIP:10.1.2.3\nPort:7000\nStudentID:test-id\n")


async def test_helo_text_is_echoed_verbatim(connect_memory: ConnectMemory) -> None:
    """HELO's text comes back exactly, inner and trailing spaces included."""
    client = connect_memory()
    await client.send("HELO  spaced  out \nHELO\n")
    await client.expect(
        helo_reply(" spaced  out ", MEMORY_IP, MEMORY_PORT, STUDENT_ID)
        + helo_reply("", MEMORY_IP, MEMORY_PORT, STUDENT_ID)
    )


async def test_advertised_ip_replaces_the_address(nursery: trio.Nursery) -> None:
    """With an advertised IP configured, HELO and JOINED report it instead."""
    server = ChatServer(Config(advertise_ip="192.0.2.7", student_id="s"))
    client, _ = open_memory_connection(server, nursery)
    await client.send("HELO x\n" + join_request("room", "amy"))
    await client.expect(
        helo_reply("x", "192.0.2.7", MEMORY_PORT, "s")
        + joined_reply("room", "192.0.2.7", MEMORY_PORT, 0, 0)
        + joined_announcement(0, "amy")
    )


async def test_ipv4_mapped_address_is_reported_plain(nursery: trio.Nursery) -> None:
    """An IPv4-mapped IPv6 local address is reported without its `::ffff:` prefix."""
    server = ChatServer(Config(student_id="s"))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    nursery.start_soon(
        lambda: server.handle_stream(server_stream, local=("::ffff:10.9.8.7", 5), peer="p")
    )
    client = Client(client_stream)
    await client.send("HELO x\n")
    await client.expect(helo_reply("x", "10.9.8.7", 5, "s"))


async def test_helo_any_time(connect_memory: ConnectMemory) -> None:
    """HELO is answered before joins, between them and after leaving."""
    client, other = connect_memory(), connect_memory()
    await client.barrier()
    await join(client, "room", "amy", 0, 0)
    await client.barrier()
    await join(other, "room", "bob", 0, 1)
    await client.expect(joined_announcement(0, "bob"))
    await client.send(leave_request(0, 0, "amy"))
    await client.expect(left_reply(0, 0) + left_announcement(0, "amy"))
    await client.barrier()


# -- 3. JOIN ---------------------------------------------------------------------------------


async def test_join_reply_then_own_announcement(connect_memory: ConnectMemory) -> None:
    """The joiner gets JOINED (with this node's address) first, then its own announcement."""
    client = connect_memory()
    await client.send(join_request("room", "amy"))
    await client.expect(
        "JOINED_CHATROOM: room\nSERVER_IP: 10.1.2.3\nPORT: 7000\nROOM_REF: 0\nJOIN_ID: 0\n"
        "CHAT: 0\nCLIENT_NAME: amy\nMESSAGE: amy has joined this chatroom.\n\n"
    )
    await client.expect_nothing()


async def test_join_is_announced_to_members_only(connect_memory: ConnectMemory) -> None:
    """Members of the room receive a newcomer's announcement; others receive nothing."""
    amy, bob, eve = connect_memory(), connect_memory(), connect_memory()
    await join(amy, "room", "amy", 0, 0)
    await join(eve, "elsewhere", "eve", 1, 1)
    await join(bob, "room", "bob", 0, 2)
    await amy.expect(joined_announcement(0, "bob"))
    await amy.expect_nothing()
    await eve.expect_nothing()


async def test_room_ref_per_room_and_join_id_per_connection(connect_memory: ConnectMemory) -> None:
    """ROOM_REF counts rooms from 0; JOIN_ID counts connections from 0 and is kept per room."""
    amy, bob = connect_memory(), connect_memory()
    await join(amy, "first", "amy", 0, 0)
    await join(bob, "second", "bob", 1, 1)
    await join(bob, "first", "bob", 0, 1)
    await amy.expect(joined_announcement(0, "bob"))
    await join(amy, "third", "amy", 2, 0)
    await amy.send(leave_request(2, 0, "amy"))
    await amy.expect(left_reply(2, 0) + left_announcement(2, "amy"))
    await join(amy, "fourth", "amy", 3, 0)  # the emptied room's ROOM_REF is not reused
    await join(amy, "third", "amy", 2, 0)


async def test_join_again_replies_again_without_duplicating(connect_memory: ConnectMemory) -> None:
    """Joining a room already joined replies and announces again; chats still arrive once."""
    amy, bob = connect_memory(), connect_memory()
    await join(amy, "room", "amy", 0, 0)
    await join(bob, "room", "bob", 0, 1)
    await amy.expect(joined_announcement(0, "bob"))
    await join(amy, "room", "amy", 0, 0)
    await bob.expect(joined_announcement(0, "amy"))
    await bob.send(chat_request(0, 1, "bob", "once"))
    await bob.expect(chat_broadcast(0, "bob", "once"))
    await amy.expect(chat_broadcast(0, "bob", "once"))
    await amy.expect_nothing()


async def test_many_rooms_under_different_names(connect_memory: ConnectMemory) -> None:
    """A connection may be in several rooms at once under a different name in each."""
    client = connect_memory()
    await join(client, "one", "amy", 0, 0)
    await join(client, "two", "amelia", 1, 0)
    await client.send(chat_request(1, 0, "amelia", "hi") + chat_request(0, 0, "amy", "yo"))
    await client.expect(chat_broadcast(1, "amelia", "hi") + chat_broadcast(0, "amy", "yo"))


# -- 3. CHAT ---------------------------------------------------------------------------------


async def test_chat_reaches_every_member_including_sender(connect_memory: ConnectMemory) -> None:
    """A CHAT is broadcast to every member, the sender included, and to no one else."""
    amy, bob, eve = connect_memory(), connect_memory(), connect_memory()
    await join(amy, "room", "amy", 0, 0)
    await join(bob, "room", "bob", 0, 1)
    await amy.expect(joined_announcement(0, "bob"))
    await amy.send(chat_request(0, 0, "amy", "hello"))
    await amy.expect(chat_broadcast(0, "amy", "hello"))
    await bob.expect(chat_broadcast(0, "amy", "hello"))
    for client in (amy, bob, eve):
        await client.expect_nothing()


async def test_chat_uses_the_requests_client_name(connect_memory: ConnectMemory) -> None:
    """The broadcast carries the request's CLIENT_NAME, not the name the client joined with."""
    client = connect_memory()
    await join(client, "room", "amy", 0, 0)
    await client.send(chat_request(0, 0, "not amy", "hi"))
    await client.expect(chat_broadcast(0, "not amy", "hi"))


async def test_chat_with_another_clients_join_id(connect_memory: ConnectMemory) -> None:
    """A CHAT carrying another connection's JOIN_ID is still broadcast (it is not checked)."""
    amy, bob = connect_memory(), connect_memory()
    await join(amy, "room", "amy", 0, 0)
    await join(bob, "room", "bob", 0, 1)
    await amy.expect(joined_announcement(0, "bob"))
    await bob.send(chat_request(0, 0, "bob", "borrowed id"))
    await bob.expect(chat_broadcast(0, "bob", "borrowed id"))
    await amy.expect(chat_broadcast(0, "bob", "borrowed id"))


async def test_multi_line_chat_is_relayed_as_is(connect_memory: ConnectMemory) -> None:
    """A message spanning several lines is relayed with its lines joined by newlines."""
    client = connect_memory()
    await join(client, "room", "amy", 0, 0)
    await client.send("CHAT: 0\r\nJOIN_ID: 0\r\nCLIENT_NAME: amy\r\nMESSAGE: a\r\n b \r\nc\r\n\r\n")
    await client.expect(chat_broadcast(0, "amy", "a\n b \nc"))


# -- 3. LEAVE --------------------------------------------------------------------------------


async def test_leave_replies_then_announces_to_all(connect_memory: ConnectMemory) -> None:
    """LEAVE: the leaver gets LEFT then its own announcement; the others the announcement."""
    amy, bob = connect_memory(), connect_memory()
    await join(amy, "room", "amy", 0, 0)
    await join(bob, "room", "bob", 0, 1)
    await amy.expect(joined_announcement(0, "bob"))
    await amy.send(leave_request(0, 0, "amy"))
    await amy.expect(left_reply(0, 0) + left_announcement(0, "amy"))
    await bob.expect(left_announcement(0, "amy"))
    await amy.expect_nothing()
    await bob.expect_nothing()


async def test_nothing_from_a_room_after_leaving(connect_memory: ConnectMemory) -> None:
    """After its leave announcement a client gets nothing from that room, and may not chat."""
    amy, bob = connect_memory(), connect_memory()
    await join(amy, "room", "amy", 0, 0)
    await join(bob, "room", "bob", 0, 1)
    await amy.expect(joined_announcement(0, "bob"))
    await amy.send(leave_request(0, 0, "amy") + chat_request(0, 1, "bob", "pipelined"))
    await amy.expect(left_reply(0, 0) + left_announcement(0, "amy"))
    await amy.expect_error(3)
    await bob.send(chat_request(0, 1, "bob", "gone?"))
    await bob.expect(left_announcement(0, "amy") + chat_broadcast(0, "bob", "gone?"))
    await amy.expect_nothing()


async def test_repeated_and_stray_leave(connect_memory: ConnectMemory) -> None:
    """A LEAVE for a room the client is not in gets the same LEFT reply and no announcement."""
    amy, bob = connect_memory(), connect_memory()
    await join(amy, "room", "amy", 0, 0)
    await join(bob, "room", "bob", 0, 1)
    await amy.expect(joined_announcement(0, "bob"))
    await amy.send(leave_request(0, 0, "amy"))
    await amy.expect(left_reply(0, 0) + left_announcement(0, "amy"))
    await bob.expect(left_announcement(0, "amy"))
    await amy.send(leave_request(0, 0, "amy") + leave_request(7, 3, "amy"))
    await amy.expect(left_reply(0, 0) + left_reply(7, 3))
    await amy.expect_nothing()
    await bob.expect_nothing()


async def test_leave_keeps_other_rooms_and_connection(connect_memory: ConnectMemory) -> None:
    """Leaving one room keeps the client's other rooms and its connection."""
    client = connect_memory()
    await join(client, "one", "amy", 0, 0)
    await join(client, "two", "amy", 1, 0)
    await client.send(leave_request(0, 0, "amy") + chat_request(1, 0, "amy", "still here"))
    await client.expect(
        left_reply(0, 0) + left_announcement(0, "amy") + chat_broadcast(1, "amy", "still here")
    )


# -- 3. DISCONNECT and vanishing clients -----------------------------------------------------


async def test_disconnect_announces_in_room_order_then_closes(
    connect_memory: ConnectMemory,
) -> None:
    """DISCONNECT announces the leave in each room by ascending ROOM_REF, to all, then EOF."""
    amy, bob = connect_memory(), connect_memory()
    await join(bob, "zero", "bob", 0, 0)
    await join(bob, "one", "bob", 1, 0)
    await join(amy, "one", "amelia", 1, 1)
    await join(amy, "zero", "amy", 0, 1)
    await bob.expect(joined_announcement(1, "amelia") + joined_announcement(0, "amy"))
    await amy.send(disconnect_request("amy"))
    expected = left_announcement(0, "amy") + left_announcement(1, "amelia")
    await amy.expect(expected)
    await amy.expect_eof()
    await bob.expect(expected)
    await bob.expect_nothing()


async def test_disconnect_flushes_everything_before_eof(connect_memory: ConnectMemory) -> None:
    """Replies to requests pipelined before DISCONNECT all arrive before the end of stream."""
    client = connect_memory()
    chats = "".join(chat_request(0, 0, "amy", f"message {i}") for i in range(50))
    await client.send(join_request("room", "amy") + chats + disconnect_request("amy"))
    await client.expect(
        joined("room", 0, 0)
        + joined_announcement(0, "amy")
        + "".join(chat_broadcast(0, "amy", f"message {i}") for i in range(50))
        + left_announcement(0, "amy")
    )
    await client.expect_eof()


async def test_requests_after_disconnect_are_ignored(connect_memory: ConnectMemory) -> None:
    """Requests sent after DISCONNECT get no reply."""
    amy, bob = connect_memory(), connect_memory()
    await join(bob, "room", "bob", 0, 0)
    await amy.send(disconnect_request("amy") + "HELO late\n" + join_request("room", "amy"))
    await amy.expect_eof()
    await bob.expect_nothing()


async def test_client_end_of_stream_is_announced(connect_memory: ConnectMemory) -> None:
    """A client that half-closes without DISCONNECT is announced as leaving to the others."""
    amy, bob = connect_memory(), connect_memory()
    await join(amy, "zero", "amy", 0, 0)
    await join(amy, "one", "amelia", 1, 0)
    await join(bob, "one", "bob", 1, 1)
    await join(bob, "zero", "bob", 0, 1)
    await amy.expect(joined_announcement(1, "bob") + joined_announcement(0, "bob"))
    await amy.send_eof()
    await bob.expect(left_announcement(0, "amy") + left_announcement(1, "amelia"))
    await amy.expect_eof()
    await bob.expect_nothing()


async def test_vanished_client_is_announced(connect_memory: ConnectMemory) -> None:
    """A client whose connection closes outright is announced as leaving to the others."""
    amy, bob = connect_memory(), connect_memory()
    await join(amy, "room", "amy", 0, 0)
    await join(bob, "room", "bob", 0, 1)
    await amy.aclose()
    await bob.expect(left_announcement(0, "amy"))
    await bob.send(chat_request(0, 1, "bob", "alone"))
    await bob.expect(chat_broadcast(0, "bob", "alone"))


async def test_drain_waits_for_the_grace_when_the_client_never_closes(
    memory_server: ChatServer, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """After DISCONNECT the server reads and discards input for the grace, then closes."""
    client, finished = open_memory_connection(memory_server, nursery)
    await client.send(disconnect_request("amy"))
    await client.expect_eof()
    start = trio.current_time()
    await trio.sleep(memory_server.config.disconnect_grace / 2)
    assert not finished.is_set()
    await client.send("HELO ignored\n")  # still read (so no reset), never answered
    await finished.wait()
    assert trio.current_time() - start == pytest.approx(memory_server.config.disconnect_grace)
    assert client.buffer == b""


async def test_drain_ends_when_the_client_closes(
    memory_server: ChatServer, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """After DISCONNECT the server closes as soon as the client's end of stream arrives."""
    client, finished = open_memory_connection(memory_server, nursery)
    await client.send(disconnect_request("amy"))
    await client.expect_eof()
    start = trio.current_time()
    await client.send_eof()
    await finished.wait()
    assert trio.current_time() == start


# -- 3. KILL_SERVICE -------------------------------------------------------------------------


async def test_kill_service_stops_the_service(
    memory_server: ChatServer, connect_memory: ConnectMemory
) -> None:
    """KILL_SERVICE cancels the server's shutdown scope."""
    client = connect_memory()
    await client.barrier()
    assert not memory_server.shutdown_scope.cancel_called
    await client.send("KILL_SERVICE\n")
    await trio.testing.wait_all_tasks_blocked()
    assert memory_server.shutdown_scope.cancel_called


async def test_kill_service_closes_every_connection_without_reply(
    memory_server: ChatServer,
) -> None:
    """KILL_SERVICE sends no reply and closes every connection, members of rooms or not."""
    async with shutdown_scope_nursery(memory_server) as nursery:
        amy, _ = open_memory_connection(memory_server, nursery)
        bob, _ = open_memory_connection(memory_server, nursery)
        idle, _ = open_memory_connection(memory_server, nursery)
        await join(amy, "room", "amy", 0, 0)
        await join(bob, "room", "bob", 0, 1)
        await amy.expect(joined_announcement(0, "bob"))
        await idle.barrier()
        await amy.send("KILL_SERVICE\n")
        for client in (amy, bob, idle):
            await client.expect_eof()


async def test_kill_service_after_disconnect_while_draining(
    memory_server: ChatServer, connect_memory: ConnectMemory
) -> None:
    """KILL_SERVICE read during the drain that follows DISCONNECT is still honoured."""
    client = connect_memory()
    await client.send(disconnect_request("amy"))
    await client.expect_eof()
    await client.send("KILL_SERVICE\n")
    await trio.testing.wait_all_tasks_blocked()
    assert memory_server.shutdown_scope.cancel_called


async def test_kill_service_pipelined_after_disconnect(
    memory_server: ChatServer, connect_memory: ConnectMemory
) -> None:
    """KILL_SERVICE in the same segment right after DISCONNECT is honoured."""
    client = connect_memory()
    await client.send(disconnect_request("amy") + "KILL_SERVICE\r\n")
    await client.expect_eof()
    await trio.testing.wait_all_tasks_blocked()
    assert memory_server.shutdown_scope.cancel_called


# -- 3. unknown lines ------------------------------------------------------------------------


async def test_unknown_line_gets_no_reply(connect_memory: ConnectMemory) -> None:
    """An unknown line gets no reply at all and the connection stays open and usable."""
    client = connect_memory()
    await client.send("HELLO THERE\nKILL_SERVICE please\nJOIN_ID: 0\n")
    await client.expect_nothing()
    await join(client, "room", "amy", 0, 0)


# -- 5. errors -------------------------------------------------------------------------------


async def test_missing_field_is_error_1(connect_memory: ConnectMemory) -> None:
    """A request missing a field gets error 1, the connection stays open, the next works."""
    client = connect_memory()
    await client.send("JOIN_CHATROOM: room\nCLIENT_IP: 0\nPORT: 0\n" + join_request("room", "amy"))
    await client.expect_error(1)
    await client.expect(joined("room", 0, 0) + joined_announcement(0, "amy"))
    await client.expect_nothing()


async def test_non_integer_field_is_error_1(connect_memory: ConnectMemory) -> None:
    """A ROOM_REF or JOIN_ID that is not an integer gets error 1."""
    client = connect_memory()
    await join(client, "room", "amy", 0, 0)
    await client.send(chat_request(0, 0, "amy", "x").replace("JOIN_ID: 0", "JOIN_ID: zero"))
    await client.expect_error(1)
    await client.send(leave_request(0, 0, "amy").replace("LEAVE_CHATROOM: 0", "LEAVE_CHATROOM: a"))
    await client.expect_error(1)
    await client.expect_nothing()


async def test_empty_names_are_error_1(connect_memory: ConnectMemory) -> None:
    """An empty room name or client name gets error 1 and joins nothing."""
    client = connect_memory()
    await client.send(join_request("", "amy") + join_request("room", " "))
    await client.expect_error(1)
    await client.expect_error(1)
    await join(client, "room", "amy", 0, 0)


async def test_chat_to_unknown_room_is_error_2(connect_memory: ConnectMemory) -> None:
    """A CHAT to a ROOM_REF never assigned gets error 2."""
    client = connect_memory()
    await join(client, "room", "amy", 0, 0)
    await client.send(chat_request(5, 0, "amy", "hi"))
    await client.expect_error(2)
    await client.expect_nothing()


async def test_integers_at_both_ends_of_every_range(connect_memory: ConnectMemory) -> None:
    """ROOM_REF: an integer naming no room (negative, one past the last room, beyond any
    room, of any length) is error 2 for CHAT and the usual LEFT_CHATROOM for LEAVE, which
    echoes ROOM_REF and JOIN_ID as written; JOIN_ID is never checked, whatever its value."""
    client = connect_memory()
    await join(client, "room", "amy", 0, 0)
    await join(client, "hall", "amy", 1, 0)
    huge = "1" + "0" * 30
    for ref in ("0", "000", "-0", "1", "01"):
        await client.send(chat_request(0, 0, "amy", "hi").replace("CHAT: 0", f"CHAT: {ref}"))
        room = int(ref)
        await client.expect(chat_broadcast(room, "amy", "hi"))
    for ref in ("2", "-1", "999999999999999999", "1000000000000000000", huge, "-" + huge):
        await client.send(chat_request(0, 0, "amy", "hi").replace("CHAT: 0", f"CHAT: {ref}"))
        await client.expect_error(2)
    for join_id in ("-1", "999999999999999999", huge, "-" + huge, "0" * 40):
        await client.send(chat_request(0, 0, "amy", join_id).replace("ID: 0", f"ID: {join_id}"))
        await client.expect(chat_broadcast(0, "amy", join_id))
    for ref, join_id in (("2", "-1"), ("-1", huge), (huge, "007"), ("-" + huge, "0")):
        request = leave_request(0, 0, "amy")
        request = request.replace("LEAVE_CHATROOM: 0", f"LEAVE_CHATROOM:  {ref} ")
        await client.send(request.replace("JOIN_ID: 0", f"JOIN_ID: {join_id}"))
        await client.expect(f"LEFT_CHATROOM: {ref}\nJOIN_ID: {join_id}\n")
    await client.send(leave_request(0, 0, "amy").replace("CHATROOM: 0", "CHATROOM: 000"))
    await client.expect("LEFT_CHATROOM: 000\nJOIN_ID: 0\n" + left_announcement(0, "amy"))
    await client.expect_nothing()


async def test_chat_to_room_not_joined_is_error_3(connect_memory: ConnectMemory) -> None:
    """A CHAT to an existing room the connection is not in gets error 3 and reaches no one."""
    amy, bob = connect_memory(), connect_memory()
    await join(bob, "room", "bob", 0, 0)
    await amy.send(chat_request(0, 0, "amy", "let me in"))
    await amy.expect_error(3)
    await bob.expect_nothing()
    await amy.expect_nothing()


async def test_too_many_rooms_is_error_5(nursery: trio.Nursery) -> None:
    """A JOIN past the rooms-per-connection limit gets error 5; the connection stays."""
    server = ChatServer(Config(max_rooms_per_connection=1, student_id=STUDENT_ID))
    client, _ = open_memory_connection(server, nursery)
    await join(client, "one", "amy", 0, 0)
    await client.send(join_request("two", "amy"))
    await client.expect_error(5)
    await client.send(chat_request(0, 0, "amy", "still in one"))
    await client.expect(chat_broadcast(0, "amy", "still in one"))


async def test_oversize_line_is_error_4_then_close(nursery: trio.Nursery) -> None:
    """A line over the limit gets error 4, the connection closes and its rooms hear it leave."""
    server = ChatServer(Config(max_line=100, student_id=STUDENT_ID))
    amy, _ = open_memory_connection(server, nursery)
    bob, _ = open_memory_connection(server, nursery)
    await join(amy, "room", "amy", 0, 0)
    await join(bob, "room", "bob", 0, 1)
    await amy.expect(joined_announcement(0, "bob"))
    await amy.send("HELO " + "x" * 200)  # no newline needed: it can never fit
    await amy.expect_error(4)
    await amy.expect_eof()
    await bob.expect(left_announcement(0, "amy"))
    await bob.expect_nothing()


async def test_oversize_message_is_error_4_then_close(nursery: trio.Nursery) -> None:
    """A CHAT message over the limit gets error 4 and is not relayed; the connection closes."""
    server = ChatServer(Config(max_message=100, student_id=STUDENT_ID))
    amy, _ = open_memory_connection(server, nursery)
    bob, _ = open_memory_connection(server, nursery)
    await join(amy, "room", "amy", 0, 0)
    await join(bob, "room", "bob", 0, 1)
    await amy.expect(joined_announcement(0, "bob"))
    await amy.send(chat_request(0, 0, "amy", "\n".join(["x" * 40] * 3)))
    await amy.expect_error(4)
    await amy.expect_eof()
    await bob.expect(left_announcement(0, "amy"))
    await bob.expect_nothing()


# -- 6. timeouts -----------------------------------------------------------------------------


async def test_idle_connection_kept_by_default(
    connect_memory: ConnectMemory, autojump_clock: trio.testing.MockClock
) -> None:
    """With no idle timeout configured, a silent connection stays open indefinitely."""
    client = connect_memory()
    await join(client, "room", "amy", 0, 0)
    await trio.sleep(7 * 24 * 3600)
    await client.expect_nothing()


async def test_idle_timeout_closes_a_silent_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """With an idle timeout, a connection silent that long is closed and its leave announced."""
    idle_timeout = 5.0  # under the client's receive timeout, which runs on the same clock
    server = ChatServer(Config(idle_timeout=idle_timeout, student_id=STUDENT_ID))
    amy, _ = open_memory_connection(server, nursery)
    bob, _ = open_memory_connection(server, nursery)
    await join(amy, "room", "amy", 0, 0)
    await join(bob, "room", "bob", 0, 1)
    await amy.expect(joined_announcement(0, "bob"))
    await trio.sleep(idle_timeout * 0.8)
    await amy.barrier()  # activity restarts each one's timer
    await bob.barrier()
    start = trio.current_time()
    await trio.sleep(idle_timeout * 0.8)
    await bob.barrier()
    await amy.expect_eof()
    assert trio.current_time() - start == pytest.approx(idle_timeout)
    await bob.expect(left_announcement(0, "amy"))


# -- 4. ordering -----------------------------------------------------------------------------


async def test_every_member_sees_one_order(connect_memory: ConnectMemory) -> None:
    """Chats sent at once by several members reach every member in one and the same order."""
    members = [connect_memory() for _ in range(3)]
    for join_id, member in enumerate(members):
        await join(member, "room", f"m{join_id}", 0, join_id)
    for index, member in enumerate(members):
        for later in range(index + 1, len(members)):
            await member.expect(joined_announcement(0, f"m{later}"))
    count = 30
    async with trio.open_nursery() as senders:
        for join_id, member in enumerate(members):
            chats = "".join(chat_request(0, join_id, f"m{join_id}", str(i)) for i in range(count))
            senders.start_soon(member.send, chats)
    received = []
    for member in members:
        data = b""
        for _ in range(count * len(members)):
            data += await member.receive_until(b"\n\n")
        received.append(data)
        await member.expect_nothing()
    assert received[0] == received[1] == received[2]
    # Each sender's chats arrive in the order it sent them.
    chats_by_sender: dict[str, list[str]] = {}
    for chunk in received[0].decode().split("\n\n")[:-1]:
        _, name_line, message_line = chunk.split("\n")
        chats_by_sender.setdefault(name_line, []).append(message_line)
    expected = [f"MESSAGE: {i}" for i in range(count)]
    assert chats_by_sender == {f"CLIENT_NAME: m{j}": expected for j in range(len(members))}


# -- logging ---------------------------------------------------------------------------------

PEER = "198.51.100.7:4242"


def logged(caplog: pytest.LogCaptureFixture, level: int, *words: str) -> list[str]:
    """Messages of `trio_chat` log records at `level` naming PEER and containing every word."""
    return [
        message
        for record in caplog.records
        if record.name.startswith("trio_chat")
        and record.levelno == level
        and PEER in (message := record.getMessage())
        and all(word.lower() in message.lower() for word in words)
    ]


async def test_connection_lifecycle_is_logged(
    memory_server: ChatServer, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Connect, join, leave and disconnect each log an INFO line with the peer address."""
    caplog.set_level(logging.INFO, logger="trio_chat")
    client, finished = open_memory_connection(memory_server, nursery, PEER)
    await join(client, "lobby", "amy", 0, 0)
    await client.send(leave_request(0, 0, "amy"))
    await client.expect(left_reply(0, 0) + left_announcement(0, "amy"))
    await client.send(disconnect_request("amy"))
    await client.expect_eof()
    await client.send_eof()
    await finished.wait()
    assert logged(caplog, logging.INFO, "connect")
    assert logged(caplog, logging.INFO, "join", "lobby")
    assert logged(caplog, logging.INFO, "left") or logged(caplog, logging.INFO, "leav")
    assert logged(caplog, logging.INFO, "disconnect")


async def test_unknown_line_is_logged(
    memory_server: ChatServer, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown line is logged with the peer address."""
    caplog.set_level(logging.INFO, logger="trio_chat")
    client, _ = open_memory_connection(memory_server, nursery, PEER)
    await client.send("WHAT_IS_THIS\n")
    await client.expect_nothing()
    assert logged(caplog, logging.INFO, "WHAT_IS_THIS")


async def test_each_request_is_logged_at_debug(
    memory_server: ChatServer, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """With DEBUG logging, every request is logged with the peer address."""
    caplog.set_level(logging.DEBUG, logger="trio_chat")
    client, _ = open_memory_connection(memory_server, nursery, PEER)
    await client.send("HELO first\n" + join_request("lobby", "amy"))
    await client.receive_until(b"has joined this chatroom.\n\n")
    await client.expect_nothing()
    assert logged(caplog, logging.DEBUG, "first")
    assert logged(caplog, logging.DEBUG, "lobby")


async def test_shutdown_is_logged(
    memory_server: ChatServer, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """KILL_SERVICE logs an INFO line naming the connection that sent it."""
    caplog.set_level(logging.INFO, logger="trio_chat")
    client, _ = open_memory_connection(memory_server, nursery, PEER)
    await client.send("KILL_SERVICE\n")
    await trio.testing.wait_all_tasks_blocked()
    assert logged(caplog, logging.INFO, "KILL_SERVICE")


# -- a refused JOIN creates nothing ----------------------------------------------------------


async def test_join_refused_with_error_5_assigns_no_room_ref(nursery: trio.Nursery) -> None:
    """A JOIN refused with error 5 joins no room, so its room gets no ROOM_REF."""
    server = ChatServer(Config(max_rooms_per_connection=1, student_id=STUDENT_ID))
    amy, _ = open_memory_connection(server, nursery)
    bob, _ = open_memory_connection(server, nursery)
    await join(amy, "one", "amy", 0, 0)
    await amy.send(join_request("two", "amy"))
    await amy.expect_error(5)
    await bob.send(chat_request(1, 1, "bob", "anyone in two?"))
    await bob.expect_error(2)  # ROOM_REF 1 was never assigned
    await join(bob, "three", "bob", 1, 1)
