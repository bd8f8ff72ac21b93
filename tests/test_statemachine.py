"""The whole server against a reference model, driven by hypothesis's stateful testing.

Several in-memory clients send random JOIN, CHAT, LEAVE, DISCONNECT, HELO, garbage, oversize
lines and abrupt closes, each request possibly split at random points and with LF or CRLF line
ends. A plain-Python model of docs/protocol.md says which bytes every client must receive; a
check compares each client's stream with the model byte for byte, so every member gets each
broadcast exactly once and in the room's one order, and non-members get nothing. Any
exception escaping a connection fails the run.

The server runs in a trio loop on a thread of its own, because hypothesis calls rules
synchronously; after each request the test waits until every server task is blocked, so the
model knows exactly what the server has handled.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import hypothesis.strategies as st
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.chatclient import Client
from trio_chat.config import Config
from trio_chat.server import ChatServer

T = TypeVar("T")

SERVER_IP, SERVER_PORT, STUDENT_ID = "10.0.0.1", 7000, "model"
CONFIG = Config(
    student_id=STUDENT_ID,
    max_rooms_per_connection=2,  # with three room names, error 5 is within reach
    max_line=256,
    max_message=512,
)
SLOTS = 4  # clients, each connected or not at any moment
ROOMS = ["lobby", "den", "Zoë's"]
NAMES = ["alice", "bob", "c d", "Éva"]

# Text without line ends (a "\r" before "\n" is removed by the server, and "\n" ends a line).
LINE_TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
    max_size=30,
)


# -- the wire, as docs/protocol.md section 2 writes it ---------------------------------------------


def chat_broadcast(room_ref: int, name: str, message: str) -> bytes:
    return f"CHAT: {room_ref}\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n".encode()


def helo_reply(text: str) -> bytes:
    return f"HELO {text}\nIP:{SERVER_IP}\nPort:{SERVER_PORT}\nStudentID:{STUDENT_ID}\n".encode()


def error_prefix(code: int) -> bytes:
    return f"ERROR_CODE: {code}\nERROR_DESCRIPTION: ".encode()


# -- a trio loop on a thread, for synchronous rules -------------------------------------------


class TrioThread:
    """A trio run on its own thread serving `ChatServer` connections; rules call into it."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._crash: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by the next call or by close
            self._crash = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` in the loop and return its result; raise if a connection crashed."""
        if self._crash is not None:
            raise self._crash
        try:
            return trio.from_thread.run(fn, *args, trio_token=self.token)
        except trio.RunFinishedError:
            assert self._crash is not None
            raise self._crash from None

    def close(self) -> None:
        """End the loop (closing every connection) and re-raise anything that escaped."""
        if self._crash is None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join()
        if self._crash is not None:
            raise self._crash


# -- the model --------------------------------------------------------------------------------


@attrs.define(eq=False)
class ModelClient:
    """One connected client: its connection, JOIN_ID, rooms and the bytes it must receive."""

    client: Client
    join_id: int | None = None
    rooms: dict[int, str] = attrs.field(factory=dict)
    """ROOM_REF -> the name this client joined it with."""
    expected: bytearray = attrs.field(factory=bytearray)


def lines(*parts: str, crlf: bool) -> bytes:
    """Lines joined with "\\n" (or "\\r\\n"), each terminated."""
    end = "\r\n" if crlf else "\n"
    return "".join(part + end for part in parts).encode()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given points (taken modulo its length)."""
    points = sorted({cut % len(data) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


CRLF = st.booleans()
CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=3)
SLOT = st.integers(min_value=0, max_value=SLOTS - 1)
ROOM_REF = st.integers(min_value=0, max_value=len(ROOMS) + 1)
ANY_ID = st.integers(min_value=0, max_value=10**6)
MALFORMED = [
    "JOIN_CHATROOM: lobby\n\n",  # fields stop early
    "JOIN_CHATROOM: \nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: n\n",  # empty room name
    "CHAT: zero\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: m\n\n",  # ROOM_REF not an integer
    "CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\n\n",  # no MESSAGE
    "LEAVE_CHATROOM: 0\nJOIN_ID: +1\nCLIENT_NAME: n\n",  # JOIN_ID not an integer
    "LEAVE_CHATROOM: 0\nJOIN_ID: 0\nCLIENT_NAME:\n",  # empty client name
    "DISCONNECT: 0\nCLIENT_NAME: n\nCLIENT_NAME: n\n",  # a field twice, PORT missing
]
UNKNOWN = st.one_of(
    LINE_TEXT.map(lambda t: f"~{t}\n".encode()),  # "~" starts no request
    st.sampled_from(
        [
            b"\xff\xfe\xfd\n",  # not UTF-8
            b"\xc3\n",  # a UTF-8 sequence cut short
            b"\x00\x01\x02\n",
            b"GET / HTTP/1.1\r\n",
            b"HELOX\n",  # HELO must be followed by a space or the line end
            b"KILL_SERVICE now\n",
            b"JOIN_CHATROOM lobby\n",  # no colon
            b"join_chatroom: lobby\n",  # keys are case-sensitive
            b"CLIENT_NAME: alice\n",  # a field line where a request should start
            b"MESSAGE: hi\n",
        ]
    ),
)


class ChatModel(RuleBasedStateMachine):
    """Clients and rooms as docs/protocol.md describes them, checked against the real server."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = TrioThread()
        self.server = ChatServer(CONFIG)
        self.clients: list[ModelClient | None] = [None] * SLOTS
        self.room_refs: dict[str, int] = {}
        self.members: dict[int, list[ModelClient]] = {}
        self.next_join_id = 0

    # -- plumbing ---------------------------------------------------------------------------

    def connect(self, slot: int) -> ModelClient:
        """The client in `slot`, connecting it first if the slot is free."""
        current = self.clients[slot]
        if current is not None:
            return current

        async def open_connection() -> Client:
            client_stream, server_stream = trio.testing.memory_stream_pair()

            async def handle() -> None:
                await self.server.handle_stream(
                    server_stream, local=(SERVER_IP, SERVER_PORT), peer=f"slot{slot}"
                )

            self.loop.nursery.start_soon(handle)
            return Client(client_stream)

        model = ModelClient(self.loop.call(open_connection))
        self.clients[slot] = model
        return model

    def send(self, model: ModelClient, data: bytes, cuts: list[int]) -> None:
        """Send `data` in pieces, letting the server handle each piece before the next."""

        async def send_pieces() -> None:
            for piece in split(data, cuts):
                await model.client.send(piece)
                await trio.testing.wait_all_tasks_blocked()

        self.loop.call(send_pieces)

    def broadcast(self, room_ref: int, data: bytes) -> None:
        for member in self.members.get(room_ref, []):
            member.expected += data

    def leave_room(self, model: ModelClient, room_ref: int) -> None:
        """Announce `model`'s departure to the room (itself included), then end membership."""
        name = model.rooms.pop(room_ref)
        self.broadcast(room_ref, chat_broadcast(room_ref, name, f"{name} has left this chatroom."))
        self.members[room_ref].remove(model)

    def leave_all(self, model: ModelClient, *, hears_it: bool) -> None:
        if not hears_it:
            for room_ref in model.rooms:
                self.members[room_ref].remove(model)
        for room_ref in sorted(model.rooms):
            if hears_it:
                self.leave_room(model, room_ref)
            else:
                name = model.rooms[room_ref]
                self.broadcast(
                    room_ref, chat_broadcast(room_ref, name, f"{name} has left this chatroom.")
                )
        model.rooms.clear()

    def check_client(self, model: ModelClient) -> None:
        """The client received exactly what the model expects, verified by a HELO round trip."""
        barrier = helo_reply("check")

        async def receive() -> bytes:
            await model.client.send("HELO check\n")
            return await model.client.receive_until(barrier)

        received = self.loop.call(receive)
        expected = bytes(model.expected) + barrier
        if b"ERROR_DESCRIPTION: " in expected:
            received, expected = mask_descriptions(received), mask_descriptions(expected)
        assert received == expected
        model.expected.clear()

    def check_closed(self, model: ModelClient, slot: int) -> None:
        """The client received exactly what the model expects, then the end of the stream."""

        async def receive_all() -> bytes:
            chunks = []
            with trio.fail_after(10):
                while data := await model.client.stream.receive_some(65536):
                    chunks.append(data)
            await model.client.aclose()
            return bytes(model.client.buffer) + b"".join(chunks)

        self.clients[slot] = None
        received = self.loop.call(receive_all)
        assert mask_descriptions(received) == mask_descriptions(bytes(model.expected))

    # -- rules ------------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        """Every run starts with no connections and no rooms."""

    @rule(slot=SLOT, room=st.sampled_from(ROOMS), name=st.sampled_from(NAMES), crlf=CRLF, cuts=CUTS)
    def join(self, slot: int, room: str, name: str, crlf: bool, cuts: list[int]) -> None:
        model = self.connect(slot)
        request = lines(
            f"JOIN_CHATROOM: {room}", "CLIENT_IP: 0", "PORT: 0", f"CLIENT_NAME: {name}", crlf=crlf
        )
        self.send(model, request, cuts)
        room_ref = self.room_refs.get(room)
        if room_ref not in model.rooms and len(model.rooms) >= CONFIG.max_rooms_per_connection:
            model.expected += error_prefix(5) + b"<description>\n"
            return  # and a refused JOIN allocates no ROOM_REF
        if room_ref is None:
            room_ref = self.room_refs[room] = len(self.room_refs)
        if model.join_id is None:
            model.join_id = self.next_join_id
            self.next_join_id += 1
        model.expected += (
            f"JOINED_CHATROOM: {room}\nSERVER_IP: {SERVER_IP}\nPORT: {SERVER_PORT}\n"
            f"ROOM_REF: {room_ref}\nJOIN_ID: {model.join_id}\n"
        ).encode()
        model.rooms[room_ref] = name
        members = self.members.setdefault(room_ref, [])
        if model not in members:
            members.append(model)
        self.broadcast(
            room_ref, chat_broadcast(room_ref, name, f"{name} has joined this chatroom.")
        )

    @rule(
        slot=SLOT,
        room_ref=ROOM_REF,
        join_id=ANY_ID,
        name=st.sampled_from(NAMES),
        message=st.lists(LINE_TEXT.filter(bool), min_size=1, max_size=3).map("\n".join) | LINE_TEXT,
        crlf=CRLF,
        cuts=CUTS,
    )
    def chat(
        self,
        slot: int,
        room_ref: int,
        join_id: int,
        name: str,
        message: str,
        crlf: bool,
        cuts: list[int],
    ) -> None:
        model = self.connect(slot)
        request = lines(
            f"CHAT: {room_ref}",
            f"JOIN_ID: {join_id}",
            f"CLIENT_NAME: {name}",
            f"MESSAGE: {message}",
            "",
            crlf=crlf,
        )
        self.send(model, request, cuts)
        if room_ref not in self.room_refs.values():
            model.expected += error_prefix(2) + b"<description>\n"
        elif room_ref not in model.rooms:
            model.expected += error_prefix(3) + b"<description>\n"
        else:
            self.broadcast(room_ref, chat_broadcast(room_ref, name, message))

    @rule(slot=SLOT, room_ref=ROOM_REF, join_id=ANY_ID, crlf=CRLF, cuts=CUTS)
    def leave(self, slot: int, room_ref: int, join_id: int, crlf: bool, cuts: list[int]) -> None:
        model = self.connect(slot)
        request = lines(
            f"LEAVE_CHATROOM: {room_ref}", f"JOIN_ID: {join_id}", "CLIENT_NAME: any", crlf=crlf
        )
        self.send(model, request, cuts)
        model.expected += f"LEFT_CHATROOM: {room_ref}\nJOIN_ID: {join_id}\n".encode()
        if room_ref in model.rooms:
            self.leave_room(model, room_ref)

    @rule(slot=SLOT, text=LINE_TEXT, crlf=CRLF, cuts=CUTS)
    def helo(self, slot: int, text: str, crlf: bool, cuts: list[int]) -> None:
        model = self.connect(slot)
        self.send(model, lines(f"HELO {text}", crlf=crlf), cuts)
        model.expected += helo_reply(text)

    @rule(slot=SLOT, name=st.sampled_from(NAMES), cuts=CUTS)
    def disconnect(self, slot: int, name: str, cuts: list[int]) -> None:
        model = self.connect(slot)
        request = lines("DISCONNECT: 0", "PORT: 0", f"CLIENT_NAME: {name}", crlf=False)
        self.send(model, request, cuts)
        self.leave_all(model, hears_it=True)
        self.check_closed(model, slot)

    @rule(slot=SLOT)
    def vanish(self, slot: int) -> None:
        """The client closes its connection without a word: the others hear it leave."""
        model = self.connect(slot)

        async def close() -> None:
            await model.client.aclose()
            await trio.testing.wait_all_tasks_blocked()

        self.loop.call(close)
        self.leave_all(model, hears_it=False)
        self.clients[slot] = None

    @rule(slot=SLOT, size=st.integers(min_value=CONFIG.max_line + 1, max_value=1000), cuts=CUTS)
    def oversize(self, slot: int, size: int, cuts: list[int]) -> None:
        """A line over the limit: error 4 and close; the others hear the client leave."""
        model = self.connect(slot)
        self.send(model, b"HELO " + b"x" * size + b"\n", cuts)
        model.expected += error_prefix(4) + b"<description>\n"
        self.leave_all(model, hears_it=False)
        self.check_closed(model, slot)

    @rule(slot=SLOT, garbage=UNKNOWN, cuts=CUTS)
    def unknown_line(self, slot: int, garbage: bytes, cuts: list[int]) -> None:
        """A line that names no request gets no reply at all."""
        self.send(self.connect(slot), garbage, cuts)

    @rule(slot=SLOT, request=st.sampled_from(MALFORMED), cuts=CUTS)
    def malformed(self, slot: int, request: str, cuts: list[int]) -> None:
        """A recognised request with a missing or bad field gets error 1."""
        model = self.connect(slot)
        self.send(model, request.encode(), cuts)
        model.expected += error_prefix(1) + b"<description>\n"

    @rule(slot=SLOT, blank=st.sampled_from(["\n", "\r\n", "  \n", "\n\r\n\n"]))
    def blank_lines(self, slot: int, blank: str) -> None:
        """Blank lines between requests are ignored."""
        self.send(self.connect(slot), blank.encode(), [])

    @rule()
    def check(self) -> None:
        """Every connected client has received exactly what the model says, nothing more."""
        for model in self.clients:
            if model is not None:
                self.check_client(model)

    @invariant()
    def no_connection_crashed(self) -> None:
        assert self.loop._crash is None, self.loop._crash

    def teardown(self) -> None:
        try:
            if self.loop._crash is None:
                self.check()
        finally:
            self.loop.close()


def mask_descriptions(data: bytes) -> bytes:
    """`data` with every ERROR_DESCRIPTION's free text replaced by a fixed word."""
    out = []
    for line in data.split(b"\n"):
        if line.startswith(b"ERROR_DESCRIPTION: "):
            assert line != b"ERROR_DESCRIPTION: ", "an error description must say something"
            line = b"ERROR_DESCRIPTION: <description>"
        out.append(line)
    return b"\n".join(out)


ChatModel.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_server_against_model = ChatModel.TestCase
