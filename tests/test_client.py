"""Tests for trio_chat.client: request encoding, reply parsing, and the client over TCP."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_chat import protocol
from trio_chat.client import (
    ChatClient,
    ChatMessage,
    Error,
    HeloReply,
    Joined,
    Left,
    Reply,
    ReplyError,
    ReplyParser,
    Unrecognized,
    encode_request,
)
from trio_chat.protocol import Chat, Disconnect, Helo, Join, KillService, Leave, Request

# -- encoding --------------------------------------------------------------------------------


def _server_parse(data: bytes) -> list[protocol.Event]:
    buffer = protocol.LineBuffer(65536)
    parser = protocol.RequestParser(65536)
    return [event for line in buffer.feed(data) for event in parser.feed_line(line)]


names = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=20
).filter(lambda text: text.strip() == text and ":" not in text[:1])
ids = st.integers(min_value=0, max_value=10**12)
messages = st.lists(
    st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1),
    min_size=1,
    max_size=3,
).map("\n".join)
requests = st.one_of(
    st.builds(Join, names, names),
    st.builds(Leave, ids, ids, names),
    st.builds(Chat, ids, ids, names, messages),
    st.builds(Disconnect, names),
    st.builds(Helo, names),
    st.just(KillService()),
)


@given(requests)
def test_encoded_requests_parse_back_to_themselves(request: Request) -> None:
    """Whatever the client encodes, the server's own parser reads back as the same request."""
    assert _server_parse(encode_request(request)) == [request]


def test_chat_encoding_is_the_protocol_text() -> None:
    """A CHAT is the four lines of docs/protocol.md, its message ended by a blank line."""
    assert encode_request(Chat(3, 7, "ann", "hi\nthere")) == (
        b"CHAT: 3\nJOIN_ID: 7\nCLIENT_NAME: ann\nMESSAGE: hi\nthere\n\n"
    )


@pytest.mark.parametrize(
    "request_",
    [
        Join("a\nb", "ann"),
        Join("room", "a\rb"),
        Chat(0, 0, "ann", "one\n\ntwo"),
        Chat(0, 0, "ann", "one\rtwo"),
        Helo("x\ny"),
    ],
)
def test_requests_that_would_break_framing_are_refused(request_: Request) -> None:
    """A line break in a one-line field, a blank line or a CR in a message: ValueError."""
    with pytest.raises(ValueError, match=r"line|carriage"):
        encode_request(request_)


# -- reply parsing ---------------------------------------------------------------------------


def _parse(data: bytes) -> list[Reply]:
    parser = ReplyParser()
    events = []
    for line in protocol.LineBuffer(1 << 20).feed(data):
        event = parser.feed_line(line)
        if event is not None:
            events.append(event)
    return events


def test_every_reply_kind_parses_from_the_servers_own_encoding() -> None:
    """Each reply the server's encoders build parses to the matching event."""
    error = protocol.ProtocolError(protocol.ErrorCode.NOT_A_MEMBER, "not a member of room 2")
    data = (
        protocol.encode_joined("lobby", "10.0.0.1", 8000, 2, 5)
        + protocol.encode_joined_announcement(2, "ann")
        + protocol.encode_chat(2, "ann", "two\nlines")
        + protocol.encode_left(2, 5)
        + protocol.encode_error(error)
        + protocol.encode_helo("hi there", "10.0.0.1", 8000, "id-1")
    )
    assert _parse(data) == [
        Joined("lobby", "10.0.0.1", 8000, 2, 5),
        ChatMessage(2, "ann", "ann has joined this chatroom."),
        ChatMessage(2, "ann", "two\nlines"),
        Left(2, 5),
        Error(3, "not a member of room 2"),
        HeloReply("hi there", "10.0.0.1", 8000, "id-1"),
    ]


def test_reply_fields_may_come_in_any_order_and_spacing() -> None:
    """Fields after the first line are matched by key, with spaces around the colon ignored."""
    data = b"JOINED_CHATROOM:r\nJOIN_ID:1\nROOM_REF:  0 \nPORT: 9\nSERVER_IP:  1.2.3.4\n"
    assert _parse(data) == [Joined("r", "1.2.3.4", 9, 0, 1)]


def test_unknown_lines_are_reported_not_fatal() -> None:
    """A line starting no known reply becomes an Unrecognized event; parsing carries on."""
    data = b"WELCOME to my server\n" + protocol.encode_left(1, 1)
    assert _parse(data) == [Unrecognized("WELCOME to my server"), Left(1, 1)]


@pytest.mark.parametrize(
    "data",
    [
        b"LEFT_CHATROOM: x\nJOIN_ID: 1\n",
        b"JOINED_CHATROOM: r\nSERVER_IP: 1\nBOGUS: 2\n",
        b"ERROR_CODE: 1\nERROR_CODE: 2\n",
    ],
)
def test_malformed_replies_raise(data: bytes) -> None:
    """A non-integer number, an unexpected field or a repeated field raises ReplyError."""
    with pytest.raises(ReplyError):
        _parse(data)


def test_a_runaway_chat_message_is_refused() -> None:
    """A CHAT message longer than the parser's limit raises rather than growing forever."""
    parser = ReplyParser(max_message=10)
    parser.feed_line(b"CHAT: 1")
    parser.feed_line(b"CLIENT_NAME: a")
    parser.feed_line(b"MESSAGE: 12345")
    with pytest.raises(ReplyError, match="longer than 10"):
        parser.feed_line(b"678901")


# -- the client over TCP ---------------------------------------------------------------------


async def test_client_session_against_the_server(server_port: int) -> None:
    """Join, chat, HELO, leave and disconnect arrive as typed events; iteration ends at close."""
    async with await ChatClient.connect("127.0.0.1", server_port) as client:
        await client.join("lobby", "ann")
        await client.chat(0, 0, "ann", "hello")
        await client.helo("ping")
        await client.leave(0, 0, "ann")
        await client.chat(0, 0, "ann", "too late")
        await client.disconnect("ann")
        with trio.fail_after(10):
            events = [event async for event in client]
    assert events == [
        Joined("lobby", "127.0.0.1", server_port, 0, 0),
        ChatMessage(0, "ann", "ann has joined this chatroom."),
        ChatMessage(0, "ann", "hello"),
        HeloReply("ping", "127.0.0.1", server_port, "trio-chat"),
        Left(0, 0),
        ChatMessage(0, "ann", "ann has left this chatroom."),
        Error(3, "not a member of room 0"),
    ]


async def test_two_clients_hear_each_other(server_port: int) -> None:
    """A broadcast from one client reaches another through `receive`."""
    async with (
        await ChatClient.connect("127.0.0.1", server_port) as ann,
        await ChatClient.connect("127.0.0.1", server_port) as bob,
    ):
        await ann.join("room", "ann")
        with trio.fail_after(10):
            assert isinstance(await ann.receive(), Joined)
            await ann.receive()
            await bob.join("room", "bob")
            joined = await bob.receive()
            assert isinstance(joined, Joined)
            assert await ann.receive() == ChatMessage(0, "bob", "bob has joined this chatroom.")
            await bob.chat(joined.room_ref, joined.join_id, "bob", "hi ann")
            assert await ann.receive() == ChatMessage(0, "bob", "hi ann")


async def test_receive_after_close_raises_eof(server_port: int) -> None:
    """Once the server has closed the connection, `receive` raises EOFError."""
    async with await ChatClient.connect("127.0.0.1", server_port) as client:
        await client.disconnect("ann")
        with trio.fail_after(10), pytest.raises(EOFError):
            await client.receive()
