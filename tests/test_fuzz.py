"""Byte-level fuzzing of the whole server over in-memory streams.

Random bytes (raw, and built from protocol fragments so that they reach deep into the parser),
cut at random points, are fed to the server by two hostile clients beside a well-behaved one.
No exception may escape a connection, nothing may be logged as an error, and the well-behaved
client must get exactly its own replies, before, during and after.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import hypothesis.strategies as st
import trio
import trio.testing
from hypothesis import given, settings

from tests.chatclient import Client
from trio_chat.config import KIB, Config
from trio_chat.server import ChatServer

# Small limits, so oversize lines and messages and full outbound queues all happen.
CONFIG = Config(student_id="fuzz", max_line=256, max_message=512, max_outbound=16 * KIB)
LOCAL = ("10.0.0.1", 7000)

FRAGMENTS = [
    b"JOIN_CHATROOM: ",
    b"LEAVE_CHATROOM: ",
    b"CHAT: ",
    b"DISCONNECT: ",
    b"HELO ",
    b"HELO",
    b"CLIENT_IP: ",
    b"PORT: ",
    b"CLIENT_NAME: ",
    b"JOIN_ID: ",
    b"MESSAGE: ",
    b"\n",
    b"\r\n",
    b"\n\n",
    b"\r",
    b":",
    b" ",
    b"0",
    b"1",
    b"7",
    b"-1",
    b"99999999999999999999999",
    b"room",
    b"name",
    b"\xff\xfe",
    b"\xc3",
    b"\x00",
    b"\xe2\x80\xa8",
    b"x" * 200,
    b"y" * 600,
]
# KILL_SERVICE is not the subject here (it stops the service for everyone, as it should): the
# hostile bytes never contain it, however they were put together.
HOSTILE_BYTES = (
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=40)), max_size=80)
    .map(b"".join)
    .filter(lambda data: b"KILL_SERVICE" not in data)
)
CUTS = st.lists(st.integers(min_value=0, max_value=50_000), max_size=10)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given points (taken modulo its length)."""
    if not data:
        return []
    points = sorted({cut % len(data) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


class ErrorRecords(logging.Handler):
    """Collects the log records at ERROR and above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def errors_logged() -> Iterator[list[logging.LogRecord]]:
    """The ERROR records the server logs while the block runs."""
    handler = ErrorRecords()
    logger = logging.getLogger("trio_chat")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


GOOD_ROOM = "good-room-\u1e9e"  # a name the hostile bytes cannot spell
GOOD_JOINED = (
    f"JOINED_CHATROOM: {GOOD_ROOM}\nSERVER_IP: 10.0.0.1\nPORT: 7000\nROOM_REF: 0\nJOIN_ID: 0\n"
    "CHAT: 0\nCLIENT_NAME: good\nMESSAGE: good has joined this chatroom.\n\n"
)


async def good_chat(good: Client, text: str) -> None:
    """The well-behaved client chats in its room and gets exactly its own message back."""
    await good.send(f"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: good\nMESSAGE: {text}\n\n")
    await good.expect(f"CHAT: 0\nCLIENT_NAME: good\nMESSAGE: {text}\n\n")
    await good.expect_nothing()


async def hostile(client: Client, data: bytes, cuts: list[int]) -> None:
    """Send `data` in pieces, letting the server take each; then vanish."""
    try:
        for piece in split(data, cuts):
            await client.send(piece)
            await trio.testing.wait_all_tasks_blocked()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the server closed the connection (error 4, or a queue the client let fill)
    await client.aclose()
    await trio.testing.wait_all_tasks_blocked()


@settings(max_examples=500)
@given(
    first=HOSTILE_BYTES,
    second=HOSTILE_BYTES,
    first_cuts=CUTS,
    second_cuts=CUTS,
    lockstep=st.booleans(),
)
async def test_hostile_bytes_never_break_the_server_or_a_good_client(
    first: bytes, second: bytes, first_cuts: list[int], second_cuts: list[int], lockstep: bool
) -> None:
    """Random bytes from two clients raise nothing and leave a third client's service intact."""
    server = ChatServer(CONFIG)
    with errors_logged() as errors:
        async with trio.open_nursery() as nursery:

            def connect(peer: str, pair: object = trio.testing.memory_stream_pair) -> Client:
                client_stream, server_stream = pair()  # type: ignore[operator]

                async def handle() -> None:
                    await server.handle_stream(server_stream, local=LOCAL, peer=peer)

                nursery.start_soon(handle)
                return Client(client_stream)

            good = connect("good")
            await good.send(
                f"JOIN_CHATROOM: {GOOD_ROOM}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: good\n"
            )
            await good.expect(GOOD_JOINED)
            # A lockstep stream is a client that never reads: its queue fills and it is cut off.
            pair = (
                trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
            )
            attackers = [
                (connect("hostile1", pair), first, first_cuts),
                (connect("hostile2"), second, second_cuts),
            ]
            async with trio.open_nursery() as attack:
                for client, data, cuts in attackers:
                    attack.start_soon(hostile, client, data, cuts)
                await good_chat(good, "during")
            await trio.testing.wait_all_tasks_blocked()
            await good_chat(good, "after")
            newcomer = connect("newcomer")
            await newcomer.barrier()
            assert {c.peer for c in server.connections} == {"good", "newcomer"}
            nursery.cancel_scope.cancel()
    assert errors == []
