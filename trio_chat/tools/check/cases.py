"""The checks, one function per case, each on fresh connections and fresh room names.

ROOM_REFs persist for the life of a server, so every case makes up room names no earlier case
(and no earlier run) used; a case never depends on another having run. Each case checks its
own behaviour strictly and the behaviour it merely uses for setup loosely (a join's reply and
announcement in either order, a leave with or without the leaver's own announcement), so a
server with one fault fails the cases about that fault and no others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import trio
from attrs import define, field, frozen

from trio_chat.client import ChatMessage, Error, Joined, Reply, ReplyError, ReplyParser
from trio_chat.tools.check.settings import Settings
from trio_chat.tools.check.wire import (
    JOINED_PATTERN,
    CaseFailed,
    Conn,
    Membership,
    error_reply,
    leave_request,
    left_reply,
    parse_joined,
)

# A ROOM_REF no server will have assigned while being checked.
UNUSED_REF = 999_999_999
# How often, after KILL_SERVICE, the kill case tries to connect until the port refuses.
KILL_POLL_INTERVAL = 0.05


@define(eq=False)
class Context:
    """What a case works with: the server's address, the settings, and its connections."""

    host: str
    port: int
    settings: Settings
    prefix: str
    """Unique to this run and case: room names start with it."""
    conns: list[Conn] = field(factory=list)

    def room(self, label: str) -> str:
        """A room name no other case or run uses."""
        return f"{self.prefix}-{label}"

    async def connect(self, label: str, *, greeting: bool = True) -> Conn:
        """Open a new connection.

        With `greeting`, anything the server sends on connecting (PROTOCOL.md says: nothing)
        is read and dropped, so that only `connect_silence` (and the grader's sequence) fail
        a server that greets its clients.
        """
        try:
            with trio.fail_after(self.settings.connect_timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)
        except (OSError, trio.TooSlowError) as exc:
            raise CaseFailed(f"{label}: cannot connect ({exc or 'timed out'})") from None
        conn = Conn(stream, label, self.settings)
        self.conns.append(conn)
        if greeting:
            await conn.settle(f"{label}: connect")
        return conn

    def identity(self, conn: Conn) -> tuple[str, int]:
        """The IP and port the server should report in HELO and JOINED to `conn`."""
        host, port = conn.peer
        return self.settings.advertise_ip or host, self.settings.advertise_port or port

    def helo_reply(self, conn: Conn, text: str) -> bytes:
        """The exact HELO reply, given the identity the server gave in an earlier HELO."""
        return f"HELO {text}\n".encode() + conn.helo_tail

    async def aclose(self) -> None:
        """Close every connection the case opened."""
        for conn in self.conns:
            with trio.CancelScope(shield=True):
                await conn.aclose()


CaseFunction = Callable[[Context], Awaitable[None]]


@frozen
class Case:
    """One check: its name, what it checks, and which setting bounds its duration."""

    name: str
    summary: str
    run: CaseFunction
    timeout: str = "case_timeout"
    needs_kill: bool = False


CASES: list[Case] = []


def case(
    summary: str, *, timeout: str = "case_timeout", needs_kill: bool = False
) -> Callable[[CaseFunction], CaseFunction]:
    """Register the decorated function as a case named after it."""

    def register(function: CaseFunction) -> CaseFunction:
        name = function.__name__.removeprefix("case_")
        CASES.append(Case(name, summary, function, timeout, needs_kill))
        return function

    return register


async def expect_all(step: str, *pairs: tuple[Conn, bytes]) -> None:
    """Check each connection received exactly its bytes (b"": nothing)."""
    for conn, expected in pairs:
        await conn.expect(step, expected)


# -- the grader's sequence -------------------------------------------------------------------


@case("the sequence the lab's grader runs: HELO, joins, chats, leave, disconnect, rejoin")
async def case_grader(ctx: Context) -> None:
    base = await ctx.connect("base", greeting=False)
    ip, port = ctx.identity(base)
    await base.send("HELO BASE_TEST\n")
    await _expect_helo(base, "BASE_TEST", ip, port, "HELO on the base connection")
    await base.send("UNKNOWN_MESSAGE from the grader\n")
    await base.expect_nothing("an unknown line gets no reply")

    room1, room2 = ctx.room("room1"), ctx.room("room2")
    c1, c2, c3, c4 = [await ctx.connect(f"client{i}", greeting=False) for i in range(1, 5)]

    async def nothing_else(step: str, *conns: Conn) -> None:
        for conn in conns:
            await conn.expect_nothing(step)

    m1 = await c1.join(room1, "client1", strict=True)
    await nothing_else("client1 joined room1", c2, c3, c4)
    m2 = await c2.join(room1, "client2", strict=True)
    await c1.expect("client2 joined room1", m2.announced)
    await nothing_else("client2 joined room1", c3, c4)
    m3 = await c3.join(room2, "client3", strict=True)
    await nothing_else("client3 joined room2", c1, c2, c4)
    m4 = await c4.join(room2, "client4", strict=True)
    await c3.expect("client4 joined room2", m4.announced)
    await nothing_else("client4 joined room2", c1, c2)
    if m1.room_ref != m2.room_ref or m3.room_ref != m4.room_ref or m1.room_ref == m3.room_ref:
        raise CaseFailed(
            "ROOM_REF: one per room name, different rooms different",
            expected=f"room1: {m1.room_ref} {m1.room_ref}, room2: n n (n != {m1.room_ref})",
            arrived=f"room1: {m1.room_ref} {m2.room_ref}, room2: {m3.room_ref} {m4.room_ref}",
        )
    ids = [m.join_id for m in (m1, m2, m3, m4)]
    if len(set(ids)) != 4:
        raise CaseFailed("JOIN_ID: one per connection", expected="4 different", arrived=str(ids))

    chat = await c1.chat(m1, "hello room1 from client1")
    await expect_all("client1 chats in room1", (c1, chat), (c2, chat), (c3, b""), (c4, b""))
    # The grader sends another client's JOIN_ID; the server must not check it.
    other = Membership(room2, "client3", m3.server_ip, m3.port, m3.room_ref, m1.join_id)
    chat = await c3.chat(other, "hello room2 with client1's JOIN_ID")
    await expect_all("client3 chats in room2", (c3, chat), (c4, chat), (c1, b""), (c2, b""))

    m1b = await c1.join(room2, "client1", strict=True)
    if m1b.join_id != m1.join_id:
        raise CaseFailed(
            "client1 joins a second room: the same JOIN_ID",
            expected=str(m1.join_id),
            arrived=str(m1b.join_id),
        )
    await expect_all("client1 joined room2", (c3, m1b.announced), (c4, m1b.announced))
    await c2.expect_nothing("client1 joined room2")

    await c2.leave(m2)
    await c2.expect(
        "client2 leaves room1: LEFT, then its own announcement",
        left_reply(m2.room_ref, m2.join_id) + m2.left_announcement,
    )
    await c1.expect("client2 left room1", m2.left_announcement)
    await nothing_else("client2 left room1", c3, c4)
    chat = await c1.chat(m1, "room1 after client2 left")
    await expect_all("client1 chats in room1", (c1, chat), (c2, b""))

    await c4.send("DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: client4\n")
    await c4.expect_close("client4 disconnects: its announcement, then close", m4.left_announcement)
    await c3.expect("client4 disconnected", m4.left_announcement)
    await c1.expect("client4 disconnected", m4.left_announcement)
    chat = await c3.chat(m3, "room2 after client4 left")
    await expect_all("client3 chats in room2", (c3, chat), (c1, chat), (c2, b""))

    c5 = await ctx.connect("client4-again", greeting=False)
    m5 = await c5.join(room2, "client4", strict=True)
    if m5.room_ref != m3.room_ref or m5.join_id in ids:
        raise CaseFailed(
            "a new connection joins room2 under client4's name",
            expected=f"ROOM_REF {m3.room_ref}, a JOIN_ID not in {ids}",
            arrived=f"ROOM_REF {m5.room_ref}, JOIN_ID {m5.join_id}",
        )
    await expect_all("client4 rejoined room2", (c1, m5.announced), (c3, m5.announced))


async def _expect_helo(conn: Conn, text: str, ip: str, port: int, step: str) -> None:
    arrived = await conn.settle(f"{conn.label}: {step}")
    expected_head = f"HELO {text}\nIP:{ip}\nPort:{port}\nStudentID:".encode()
    if not (
        arrived.startswith(expected_head)
        and arrived.endswith(b"\n")
        and arrived.count(b"\n") == 4
        and len(arrived) > len(expected_head) + 1
    ):
        raise CaseFailed(
            f"{conn.label}: {step}", expected=expected_head + "…\n".encode(), arrived=arrived
        )


# -- joining ---------------------------------------------------------------------------------


@case("JOINED comes before the join announcement, which the joiner receives too")
async def case_join(ctx: Context) -> None:
    room, other_room = ctx.room("a"), ctx.room("b")
    first, second = await ctx.connect("first"), await ctx.connect("second")
    m1 = await first.join(room, "ann", strict=True)
    m2 = await second.join(room, "bob", strict=True)
    await first.expect("bob joined", m2.announced)
    again = await first.join(room, "ann", strict=True)
    if (again.room_ref, again.join_id) != (m1.room_ref, m1.join_id):
        raise CaseFailed(
            "joining a room again: the same ROOM_REF and JOIN_ID",
            expected=f"ROOM_REF {m1.room_ref}, JOIN_ID {m1.join_id}",
            arrived=f"ROOM_REF {again.room_ref}, JOIN_ID {again.join_id}",
        )
    await second.expect("ann joined again: announced again", m1.announced)
    chat = await second.chat(m2, "members are not duplicated")
    await expect_all("a chat after the second join arrives once", (second, chat), (first, chat))
    alias = await first.join(other_room, "ann-elsewhere", strict=True)
    if alias.join_id != m1.join_id or alias.room_ref == m1.room_ref:
        raise CaseFailed(
            "a second room: the same JOIN_ID, a new ROOM_REF",
            expected=f"JOIN_ID {m1.join_id}, ROOM_REF not {m1.room_ref}",
            arrived=f"JOIN_ID {alias.join_id}, ROOM_REF {alias.room_ref}",
        )


# -- framing ---------------------------------------------------------------------------------


async def _framing_setup(ctx: Context) -> tuple[Conn, Conn, Membership, Membership]:
    """A connection `a` in a room of its own, and `b` in a room `a` is about to join."""
    a, b = await ctx.connect("a"), await ctx.connect("b")
    own = await a.join(ctx.room("own"), "alpha")
    target = await b.join(ctx.room("target"), "beta")
    await a.settle("a: learn the HELO reply")
    return a, b, own, target


def _script(own: Membership, target: Membership) -> tuple[bytes, Membership]:
    """Requests a's framing cases send: JOIN, CHAT, HELO, a two-line CHAT, blank lines."""
    membership = Membership(
        target.room_name, "alpha", own.server_ip, own.port, target.room_ref, own.join_id
    )
    ref, join_id = target.room_ref, own.join_id
    script = (
        f"JOIN_CHATROOM: {target.room_name}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: alpha\n"
        f"\n"
        f"CHAT: {ref}\nJOIN_ID: {join_id}\nCLIENT_NAME: alpha\nMESSAGE: one\n\n"
        f"HELO framed\n"
        f"CHAT: {ref}\nJOIN_ID: {join_id}\nCLIENT_NAME: alpha\nMESSAGE: two\nlines\n\n"
    ).encode()
    return script, membership


async def _check_script(ctx: Context, a: Conn, b: Conn, m: Membership, step: str) -> None:
    tail = m.chat("one") + ctx.helo_reply(a, "framed") + m.chat("two\nlines")
    await a.expect(step, m.joined + m.announced + tail, m.announced + m.joined + tail)
    await b.expect(step, m.announced + m.chat("one") + m.chat("two\nlines"))


@case("several requests in one TCP segment (pipelining) are all answered, in order")
async def case_pipelining(ctx: Context) -> None:
    a, b, own, target = await _framing_setup(ctx)
    script, membership = _script(own, target)
    await a.send(script)
    await _check_script(ctx, a, b, membership, "JOIN, CHAT, HELO, CHAT in one segment")


@case("requests sent one byte per TCP segment are reassembled")
async def case_byte_by_byte(ctx: Context) -> None:
    a, b, own, target = await _framing_setup(ctx)
    script, membership = _script(own, target)
    await a.send_bytewise(script)
    await _check_script(ctx, a, b, membership, "JOIN, CHAT, HELO, CHAT one byte at a time")


@case("CRLF line ends are accepted and never echoed back")
async def case_crlf(ctx: Context) -> None:
    room = ctx.room("crlf")
    a, b = await ctx.connect("a"), await ctx.connect("b")
    join = f"JOIN_CHATROOM: {room}\r\nCLIENT_IP: 0\r\nPORT: 0\r\nCLIENT_NAME: crlf\r\n"
    m = await a.join(room, "crlf", request=join.encode())
    mb = await b.join(room, "other")
    await a.expect("other joined", mb.announced)
    await a.send(
        f"CHAT: {m.room_ref}\r\nJOIN_ID: {m.join_id}\r\nCLIENT_NAME: crlf\r\n"
        f"MESSAGE: two\r\nlines\r\n\r\nHELO crlf text\r\n"
    )
    await a.expect("CRLF CHAT and HELO", m.chat("two\nlines") + ctx.helo_reply(a, "crlf text"))
    await b.expect("CRLF CHAT", m.chat("two\nlines"))
    await a.send(leave_request(m.room_ref, m.join_id, "crlf").replace(b"\n", b"\r\n"))
    left = left_reply(m.room_ref, m.join_id)
    await a.expect("CRLF LEAVE", left + m.left_announcement, left)
    await b.expect("crlf left", m.left_announcement)


@case("fields in any order, KEY:value and extra spaces, empty CLIENT_IP and PORT")
async def case_spacing(ctx: Context) -> None:
    room = ctx.room("spacing")
    a, b = await ctx.connect("a"), await ctx.connect("b")
    join = f"JOIN_CHATROOM:{room}\nCLIENT_NAME:   spaced  \nPORT:\nCLIENT_IP:\n"
    m = await a.join(room, "spaced", request=join.encode())
    mb = await b.join(room, "other")
    await a.expect("other joined", mb.announced)
    await a.send(
        f"CHAT:{m.room_ref}\nCLIENT_NAME: spaced\nJOIN_ID:   {m.join_id}  \nMESSAGE:tight\n\n"
        f"CHAT:  {m.room_ref}  \nJOIN_ID:{m.join_id}\nCLIENT_NAME:spaced\nMESSAGE:  loose\n\n"
    )
    expected = m.chat("tight") + m.chat(" loose")
    await a.expect("CHAT spellings (MESSAGE: one leading space removed)", expected)
    await b.expect("CHAT spellings", expected)
    await a.send(f"LEAVE_CHATROOM:{m.room_ref}\nCLIENT_NAME:spaced\nJOIN_ID:  {m.join_id}\n")
    left = left_reply(m.room_ref, m.join_id)
    await a.expect("LEAVE spelling", left + m.left_announcement, left)
    await b.expect("spaced left", m.left_announcement)


# -- leaving ---------------------------------------------------------------------------------


@case("LEAVE: LEFT, then the announcement (to the leaver too), then nothing from that room")
async def case_leave(ctx: Context) -> None:
    room, other_room = ctx.room("room"), ctx.room("other")
    leaver, stayer = await ctx.connect("leaver"), await ctx.connect("stayer")
    m = await leaver.join(room, "leaver")
    ms = await stayer.join(room, "stayer")
    await leaver.expect("stayer joined", ms.announced)
    mo = await leaver.join(other_room, "leaver-too")
    await leaver.leave(m)
    await leaver.expect(
        "LEAVE: LEFT, then the leaver's own announcement",
        left_reply(m.room_ref, m.join_id) + m.left_announcement,
    )
    await stayer.expect("leaver left", m.left_announcement)
    chat = await stayer.chat(ms, "after the leave")
    await expect_all("a chat in the room left", (stayer, chat), (leaver, b""))
    chat = await leaver.chat(mo, "still in the other room")
    await leaver.expect("leaving one room keeps the others", chat)


@case("a repeated LEAVE, or one for a room not joined, gets LEFT and nothing else")
async def case_leave_repeat(ctx: Context) -> None:
    room, elsewhere = ctx.room("room"), ctx.room("elsewhere")
    a, b = await ctx.connect("a"), await ctx.connect("b")
    m = await a.join(room, "repeater")
    mb = await b.join(room, "watcher")
    await a.expect("watcher joined", mb.announced)
    await b.join(elsewhere, "watcher")
    await a.leave(m)
    left = left_reply(m.room_ref, m.join_id)
    await a.expect("the first LEAVE (checked by the leave case)", left + m.left_announcement, left)
    await b.expect("repeater left", m.left_announcement)
    await a.leave(m)
    await a.expect("the same LEAVE again: the same LEFT", left)
    await b.expect_nothing("a repeated LEAVE announces nothing")
    await a.send(leave_request(UNUSED_REF, m.join_id, "repeater"))
    await a.expect("LEAVE of a ROOM_REF never assigned", left_reply(UNUSED_REF, m.join_id))
    other = await b.join(elsewhere, "watcher")  # learn the ref (a re-join changes nothing)
    await a.send(leave_request(other.room_ref, m.join_id, "repeater"))
    await a.expect("LEAVE of a room never joined", left_reply(other.room_ref, m.join_id))
    await b.expect_nothing("a stray LEAVE announces nothing")


# -- silence ---------------------------------------------------------------------------------


@case("nothing is sent on connecting, to the new client or to anyone else")
async def case_connect_silence(ctx: Context) -> None:
    member = await ctx.connect("member")
    await member.join(ctx.room("room"), "member")
    newcomer = await ctx.connect("newcomer", greeting=False)
    await newcomer.expect_nothing("a new connection is not greeted")
    await member.expect_nothing("a new connection is not announced")


@case("unknown lines get no reply at all and the connection stays usable")
async def case_unknown_lines(ctx: Context) -> None:
    room = ctx.room("room")
    a, b = await ctx.connect("a"), await ctx.connect("b")
    m = await a.join(room, "talker")
    mb = await b.join(room, "listener")
    await a.expect("listener joined", mb.announced)
    for line in (
        b"HELLO_SERVER\n",
        b"NOT_A_REQUEST with words\n",
        b"FOO: bar\n",
        b"hello world\n",
        b"\xff\xfe\x00 not UTF-8\n",
    ):
        await a.send(line)
        await a.expect(f"unknown line {line!r}", b"")
    await b.expect_nothing("another member hears nothing of it")
    chat = await a.chat(m, "still here")
    await expect_all("a CHAT after the unknown lines", (a, chat), (b, chat))


# -- errors ----------------------------------------------------------------------------------


@case("error 1: a field that must be an integer is not, or a name is empty")
async def case_error_1(ctx: Context) -> None:
    room = ctx.room("room")
    a = await ctx.connect("a")
    m = await a.join(room, "namer")
    requests = {
        "LEAVE with ROOM_REF 'abc'": "LEAVE_CHATROOM: abc\nJOIN_ID: 0\nCLIENT_NAME: namer\n",
        "CHAT with JOIN_ID 'x'": (
            f"CHAT: {m.room_ref}\nJOIN_ID: x\nCLIENT_NAME: namer\nMESSAGE: hi\n\n"
        ),
        "JOIN with an empty CLIENT_NAME": (
            f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: \n"
        ),
        "JOIN with an empty room name": "JOIN_CHATROOM: \nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: n\n",
    }
    for step, request in requests.items():
        await a.send(request)
        await a.expect(step, error_reply(1))


@case("error 2: CHAT to a ROOM_REF that was never assigned")
async def case_error_2(ctx: Context) -> None:
    a = await ctx.connect("a")
    m = await a.join(ctx.room("room"), "asker")
    await a.send(f"CHAT: {UNUSED_REF}\nJOIN_ID: {m.join_id}\nCLIENT_NAME: asker\nMESSAGE: hi\n\n")
    await a.expect("CHAT to an unknown room", error_reply(2))


@case("error 3: CHAT to a room the connection is not in; the room hears nothing")
async def case_error_3(ctx: Context) -> None:
    a, b = await ctx.connect("a"), await ctx.connect("b")
    mine = await a.join(ctx.room("mine"), "outsider")
    theirs = await b.join(ctx.room("theirs"), "insider")
    await a.send(
        f"CHAT: {theirs.room_ref}\nJOIN_ID: {mine.join_id}\nCLIENT_NAME: outsider\n"
        "MESSAGE: let me in\n\n"
    )
    await a.expect("CHAT to a room never joined", error_reply(3))
    await b.expect_nothing("the room hears nothing")
    await a.leave(mine)
    left = left_reply(mine.room_ref, mine.join_id)
    await a.expect("leave (checked by the leave case)", left + mine.left_announcement, left)
    await a.chat(mine, "gone")
    await a.expect("CHAT to a room left", error_reply(3))


@case("error 4: a line or a CHAT message over the limit; then the connection closes")
async def case_error_4(ctx: Context) -> None:
    size = ctx.settings.max_line + 6 * 1024
    line_conn = await ctx.connect("long-line")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_ignoring_errors, line_conn, b"HELO " + b"x" * size + b"\n")
        await line_conn.expect_close(f"a {size}-byte line", error_reply(4))
    message_conn = await ctx.connect("long-message")
    m = await message_conn.join(ctx.room("room"), "talker")
    body = ("y" * 1000 + "\n") * (size // 1000)
    request = (
        f"CHAT: {m.room_ref}\nJOIN_ID: {m.join_id}\nCLIENT_NAME: talker\nMESSAGE: {body}\n"
    ).encode()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_ignoring_errors, message_conn, request)
        # Whether the closed connection hears its own leave announcement is not specified.
        await message_conn.expect_close(
            f"a {len(body)}-byte message in lines of 1000 bytes",
            error_reply(4),
            error_reply(4) + m.left_announcement,
        )
    fresh = await ctx.connect("after")
    await fresh.expect_nothing("the server still answers new connections")


async def _send_ignoring_errors(conn: Conn, data: bytes) -> None:
    # The server may stop reading once the limit is passed; what happens to the rest of the
    # request is not under test.
    try:
        await conn.stream.send_all(data)
        await conn.stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


@case("error 5: one JOIN more than a connection's room limit", timeout="room_limit_timeout")
async def case_error_5(ctx: Context) -> None:
    limit = ctx.settings.room_limit
    a = await ctx.connect("a")
    requests = b"".join(
        f"JOIN_CHATROOM: {ctx.room(f'r{i}')}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: n\n".encode()
        for i in range(limit + 1)
    )
    await a.send(requests)
    step = f"{limit + 1} JOINs in a row"
    events = _parse(await a.settle(step), step)
    # In a cluster some join announcements may come after the barrier: wait for the rest.
    missing = limit - sum(isinstance(event, ChatMessage) for event in events)
    with trio.move_on_after(ctx.settings.reply_timeout):
        while a.buffer.count(b" has joined this chatroom.\n\n") < missing:
            await a.fill(step)
    if missing > 0:
        events += _parse(await a.settle(step), step)
    replies = [event for event in events if not isinstance(event, ChatMessage)]
    joins = [event for event in replies if isinstance(event, Joined)]
    announcements = len(events) - len(replies)
    last = replies[-1] if replies else None
    if (
        len(joins) != limit
        or len(replies) != limit + 1
        or not isinstance(last, Error)
        or last.code != 5
        or announcements != limit
    ):
        raise CaseFailed(
            step,
            expected=f"{limit} JOINED replies, each with its announcement, then ERROR_CODE: 5",
            arrived=(
                f"{len(joins)} JOINED replies, {announcements} announcements, "
                f"{len(replies) - len(joins)} other replies, the last: {last!r}"
            ),
        )


def _parse(arrived: bytes, step: str) -> list[Reply]:
    parser = ReplyParser()
    events: list[Reply] = []
    try:
        for line in arrived.split(b"\n")[:-1]:
            event = parser.feed_line(line)
            if event is not None:
                events.append(event)
    except ReplyError as exc:
        raise CaseFailed(f"{step}: a malformed reply ({exc})", arrived=arrived) from None
    return events


# -- connections ending ----------------------------------------------------------------------


@case("DISCONNECT: a leave announcement per room in ROOM_REF order, to the client too; close")
async def case_disconnect(ctx: Context) -> None:
    low, high = ctx.room("low"), ctx.room("high")
    owner, leaving = await ctx.connect("owner"), await ctx.connect("leaving")
    m_low = await owner.join(low, "owner")
    m_high = await owner.join(high, "owner")
    h = await leaving.join(high, "name-in-high")
    l_ = await leaving.join(low, "name-in-low")
    await owner.expect("joins", h.announced + l_.announced)
    if not m_low.room_ref < m_high.room_ref:
        raise CaseFailed(
            "ROOM_REFs count up",
            expected=f"more than {m_low.room_ref}",
            arrived=str(m_high.room_ref),
        )
    await leaving.send("DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: name-in-low\n")
    # Input after DISCONNECT is read and discarded, not answered; a server that closed with it
    # unread would reset the connection and could lose the announcements.
    await leaving.send("HELO after DISCONNECT\n")
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await leaving.stream.send_eof()
    announcements = l_.left_announcement + h.left_announcement
    await leaving.expect_close(
        "DISCONNECT, then a HELO: the announcements, lower ROOM_REF first, no HELO reply, "
        "a clean close",
        announcements,
    )
    await owner.expect("the members hear each announcement", announcements)
    chat = await owner.chat(m_low, "after the disconnect")
    await owner.expect("the room carries on", chat)


@case("a client that vanishes (end of stream, or reset) is announced as gone in each room")
async def case_eof_reset(ctx: Context) -> None:
    one, two = ctx.room("one"), ctx.room("two")
    watcher = await ctx.connect("watcher")
    w1 = await watcher.join(one, "watcher")
    await watcher.join(two, "watcher")
    quitter, crasher = await ctx.connect("quitter"), await ctx.connect("crasher")
    q1 = await quitter.join(one, "quitter")
    q2 = await quitter.join(two, "quitter-two")
    c1 = await crasher.join(one, "crasher")
    await watcher.expect("joins", q1.announced + q2.announced + c1.announced)
    await crasher.expect_nothing("joined before the others")
    await quitter.aclose()
    await watcher.expect(
        "quitter closed its end: one announcement per room",
        q1.left_announcement + q2.left_announcement,
    )
    await crasher.expect("quitter left room one", q1.left_announcement)
    await crasher.reset()
    await watcher.expect("crasher's connection was reset", c1.left_announcement)
    chat = await watcher.chat(w1, "still here")
    await watcher.expect("the room carries on", chat)


# -- load ------------------------------------------------------------------------------------


@case(
    "a member that reads nothing is cut off; the others get every message, in order",
    timeout="flood_timeout",
)
async def case_slow_reader(ctx: Context) -> None:
    settings = ctx.settings
    room = ctx.room("flood")
    sloth, writer = await ctx.connect("sloth"), await ctx.connect("writer")
    s = await sloth.join(room, "sloth")
    w = await writer.join(room, "writer")
    await sloth.expect("writer joined", w.announced)  # from here on, sloth reads nothing
    count = max(1, settings.flood_bytes // settings.flood_message)
    filler = "x" * (settings.flood_message - 16)
    texts = [f"{i:08d} {filler}" for i in range(count)]
    messages = [w.chat(text) for text in texts]
    cut_off = s.left_announcement

    # The writer reads its own echoes while it sends, and never runs more than
    # `flood_window` bytes ahead of them: it must not become a slow reader itself.
    window = max(1, settings.flood_window // settings.flood_message)
    in_flight, landed = trio.open_memory_channel[None](window)

    async def send_all() -> None:
        for text in texts:
            await in_flight.send(None)
            await writer.chat(w, text)

    seen_cut_off = False
    step = f"writer sends {count} messages of {settings.flood_message} bytes"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all)
        for index, message in enumerate(messages):
            head = await writer.receive_exactly(len(message), f"{step}: message {index}")
            if head.startswith(cut_off) and not seen_cut_off:
                seen_cut_off = True
                writer.buffer[:0] = head[len(cut_off) :]
                head = await writer.receive_exactly(len(message), f"{step}: message {index}")
            if head != message:
                raise CaseFailed(
                    f"{step}: message {index} (of {count})", expected=message, arrived=head
                )
            landed.receive_nowait()
    if not seen_cut_off:
        await writer.expect(
            f"sloth, {settings.flood_bytes // 2**20} MiB behind, is cut off and announced",
            cut_off,
        )
    else:
        await writer.expect_nothing("after the flood")


@case(
    "many clients at once: all served; every member sees the room in the same order",
    timeout="crowd_timeout",
)
async def case_crowd(ctx: Context) -> None:
    size = ctx.settings.crowd_size
    room = ctx.room("crowd")
    conns: dict[int, Conn] = {}
    members: dict[int, Membership] = {}

    async def arrive(index: int) -> None:
        conn = conns[index] = await ctx.connect(f"crowd{index}")
        await conn.send(f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: c{index}\n")
        membership = members[index] = await _take_joined(conn, room, f"c{index}")
        # Its own announcement shows the join has taken effect everywhere (in a cluster the
        # JOINED reply may come first); the chat below is sent only once all have.
        await conn.wait_for(membership.announced, f"crowd{index}: its own join announcement")

    async with trio.open_nursery() as nursery:
        for index in range(size):
            nursery.start_soon(arrive, index)
    refs = {m.room_ref for m in members.values()}
    ids = {m.join_id for m in members.values()}
    if len(refs) != 1 or len(ids) != size:
        raise CaseFailed(
            f"{size} concurrent JOINs of one room",
            expected=f"one ROOM_REF, {size} JOIN_IDs",
            arrived=f"{len(refs)} ROOM_REFs, {len(ids)} JOIN_IDs",
        )
    # A chat sent once every member has seen its own announcement comes after every join in
    # the room's one order: each member's announcements are what it received before it.
    chat = await conns[0].chat(members[0], "hello, crowd")
    seen: list[list[bytes]] = [[] for _ in range(size)]

    async def collect(index: int) -> None:
        conn = conns[index]
        await conn.wait_for(chat, f"crowd{index}: the chat after every JOIN")
        before, found, _ = bytes(conn.buffer).partition(chat)
        if not found:
            raise CaseFailed(f"crowd{index}: the chat reaches every member", arrived=conn.buffer)
        del conn.buffer[: len(before) + len(chat)]
        seen[index] = [b"CHAT: " + part for part in before.split(b"CHAT: ") if part]
        await conn.expect_nothing("nothing after the chat")

    async with trio.open_nursery() as nursery:
        for index in range(size):
            nursery.start_soon(collect, index)
    order = max(seen, key=len)
    for index, announcements in enumerate(seen):
        own = members[index].announced
        if own not in order or announcements != order[order.index(own) :]:
            raise CaseFailed(
                f"crowd{index}: the room's announcements from its own join on, as the first "
                "member saw them",
                expected=b"".join(order[order.index(own) :] if own in order else [own]),
                arrived=b"".join(announcements),
            )


async def _take_joined(conn: Conn, room: str, client_name: str) -> Membership:
    """Wait for the JOINED reply for `room` and take it out of what `conn` received, leaving
    the announcements around it to be checked later."""
    step = f"{conn.label}: JOIN {room!r}"
    with trio.move_on_after(conn.settings.reply_timeout):
        while True:
            match = JOINED_PATTERN.search(conn.buffer)
            if match is not None:
                membership = parse_joined(match[0], room, client_name)
                if membership is None:
                    raise CaseFailed(step, expected=f"JOINED_CHATROOM: {room}", arrived=match[0])
                del conn.buffer[match.start() : match.end()]
                return membership
            await conn.fill(step)
    raise CaseFailed(f"{step}: no JOINED reply", arrived=conn.buffer)


# -- identity --------------------------------------------------------------------------------


@case("HELO: text echoed verbatim, the IP and port the client reached, same as in JOINED")
async def case_helo(ctx: Context) -> None:
    a = await ctx.connect("a")
    ip, port = ctx.identity(a)
    text = "text  with: colons,  spaces and ünïcode"
    await a.send(f"HELO {text}\n")
    await _expect_helo(a, text, ip, port, "HELO before any JOIN")
    m = await a.join(ctx.room("room"), "greeter")
    if (m.server_ip, m.port) != (ip, port):
        raise CaseFailed(
            "JOINED's SERVER_IP and PORT are HELO's IP and Port",
            expected=f"SERVER_IP: {ip}, PORT: {port}",
            arrived=f"SERVER_IP: {m.server_ip}, PORT: {m.port}",
        )
    await a.send("HELO after joining\n")
    await _expect_helo(a, "after joining", ip, port, "HELO after a JOIN")
    b = await ctx.connect("b")
    await b.send("HELO second connection\n")
    await _expect_helo(b, "second connection", ip, port, "HELO on another connection")


# -- shutdown --------------------------------------------------------------------------------


@case("KILL_SERVICE: no reply; every connection closed; the port refuses", needs_kill=True)
async def case_kill(ctx: Context) -> None:
    settings = ctx.settings
    member, idle, killer = [await ctx.connect(label) for label in ("member", "idle", "killer")]
    await member.join(ctx.room("last"), "member")
    await idle.expect_nothing("an idle connection")
    await killer.send("KILL_SERVICE\n")
    deadline = trio.current_time() + settings.kill_timeout
    for conn in (killer, member, idle):
        with trio.move_on_at(deadline):
            while not conn.eof:
                try:
                    await conn.fill("KILL_SERVICE")
                except CaseFailed:
                    conn.eof = True
        if not conn.eof:
            raise CaseFailed(
                f"{conn.label}: closed within {settings.kill_timeout:g} s of KILL_SERVICE",
                expected=b"(end of stream)",
                arrived=conn.buffer,
            )
        if conn is killer and conn.buffer:
            raise CaseFailed("KILL_SERVICE gets no reply", expected=b"", arrived=conn.buffer)
    with trio.move_on_at(deadline):
        while True:
            try:
                stream = await trio.open_tcp_stream(ctx.host, ctx.port)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(KILL_POLL_INTERVAL)
    raise CaseFailed(
        f"the port refuses connections within {settings.kill_timeout:g} s of KILL_SERVICE",
        expected="connection refused",
        arrived="connection accepted",
    )
