"""The cases about what a server must refuse, and how: unknown lines, errors 1 to 5."""

from __future__ import annotations

import re

import trio

from trio_chat.tools.check import templates
from trio_chat.tools.check.context import Case, Context, case, expect_all
from trio_chat.tools.check.membership import UNUSED_REF
from trio_chat.tools.check.wire import JOINED_PATTERN, CaseFailed, Conn


@case("unknown lines get no reply at all and the connection stays usable")
async def case_unknown_lines(ctx: Context) -> None:
    room = ctx.room("room")
    a, b = await ctx.connect("a"), await ctx.connect("b")
    m = await a.join(room, ctx.name("talker"))
    mb = await b.join(room, ctx.name("listener"))
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


@case("error 1: a JOIN missing its CLIENT_NAME; then the connection still works")
async def case_missing_field(ctx: Context) -> None:
    room, name = ctx.room("room"), ctx.name("complete")
    a = await ctx.connect("a")
    await a.send(f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\n\n")
    await a.expect("a JOIN whose fields end (a blank line) before CLIENT_NAME", templates.error(1))
    await a.join(room, name)
    await a.send("HELO still working\n")
    await a.expect("HELO after the malformed JOIN", ctx.helo_reply("still working"))


@case("error 1: a field that must be an integer is not, or a name is empty")
async def case_error_1(ctx: Context) -> None:
    room, name = ctx.room("room"), ctx.name("namer")
    a = await ctx.connect("a")
    m = await a.join(room, name)
    requests = {
        "LEAVE with ROOM_REF 'abc'": templates.leave_request("abc", m.join_id, name),
        "LEAVE with ROOM_REF '1.5'": templates.leave_request("1.5", m.join_id, name),
        "CHAT with JOIN_ID 'x'": templates.chat_request(m.room_ref, "x", name, "hi"),
        "CHAT with ROOM_REF '0x1'": templates.chat_request("0x1", m.join_id, name, "hi"),
        "JOIN with an empty CLIENT_NAME": templates.join_request(room, ""),
        "JOIN with an empty room name": templates.join_request("", name),
    }
    for step, request in requests.items():
        await a.send(request)
        await a.expect(step, templates.error(1))


@case("error 2: CHAT to a ROOM_REF that was never assigned")
async def case_error_2(ctx: Context) -> None:
    a = await ctx.connect("a")
    name = ctx.name("asker")
    m = await a.join(ctx.room("room"), name)
    await a.send(templates.chat_request(UNUSED_REF, m.join_id, name, "hi"))
    await a.expect("CHAT to an unknown room", templates.error(2))


@case("ROOM_REF and JOIN_ID: integers of any size and sign; an unknown one is no such room")
async def case_integers(ctx: Context) -> None:
    a = await ctx.connect("a")
    name = ctx.name("counter")
    m = await a.join(ctx.room("room"), name)
    huge = "9" * 31
    for ref in ("-1", huge):
        await a.send(templates.chat_request(ref, m.join_id, name, "hi"))
        await a.expect(f"CHAT to ROOM_REF {ref}: no such room", templates.error(2))
    for ref, join_id in (("-0042", "-7"), (huge, "0" * 28 + "123")):
        await a.send(templates.leave_request(f"  {ref} ", join_id, name))
        await a.expect(
            f"LEAVE of ROOM_REF {ref} with JOIN_ID {join_id}: LEFT echoes both as written",
            templates.left(ref, join_id),
        )
    for join_id in ("-5", huge):
        text = f"sent with JOIN_ID {join_id}"
        await a.send(templates.chat_request(m.room_ref, join_id, name, text))
        await a.expect(f"CHAT with JOIN_ID {join_id}: relayed", m.chat(text))
    for join_id in ("", "one"):
        await a.send(templates.chat_request(m.room_ref, join_id, name, "hi"))
        await a.expect(f"CHAT with JOIN_ID {join_id!r}: not an integer", templates.error(1))


@case("error 3: CHAT to a room the connection is not in; the room hears nothing")
async def case_error_3(ctx: Context) -> None:
    a, b = await ctx.connect("a"), await ctx.connect("b")
    mine = await a.join(ctx.room("mine"), ctx.name("outsider"))
    theirs = await b.join(ctx.room("theirs"), ctx.name("insider"))
    await a.send(
        templates.chat_request(theirs.room_ref, mine.join_id, mine.client_name, "let me in")
    )
    await a.expect("CHAT to a room never joined", templates.error(3))
    await b.expect_nothing("the room hears nothing")
    await a.leave(mine)
    await a.expect_left("leave (checked by the leave case)", mine)
    await a.chat(mine, "gone")
    await a.expect("CHAT to a room left", templates.error(3))


@case("error 4: a line or a CHAT message over the limit; then the connection closes")
async def case_error_4(ctx: Context) -> None:
    size = ctx.settings.max_line + 6 * 1024
    line_conn = await ctx.connect("long-line")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_ignoring_errors, line_conn, b"HELO " + b"x" * size + b"\n")
        await line_conn.expect_close(f"a {size}-byte line", templates.error(4))
    message_conn = await ctx.connect("long-message")
    m = await message_conn.join(ctx.room("room"), ctx.name("talker"))
    body = ("y" * 1000 + "\n") * (size // 1000)
    request = templates.chat_request(m.room_ref, m.join_id, m.client_name, body).removesuffix(b"\n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_ignoring_errors, message_conn, request)
        # Whether the closed connection hears its own leave announcement is not specified.
        await message_conn.expect_close(
            f"a {len(body)}-byte message in lines of 1000 bytes",
            templates.error(4),
            templates.error(4) + m.left_announcement,
        )
    fresh = await ctx.connect("after")
    await fresh.send("HELO still serving\n")
    await fresh.expect("the server still answers new connections", ctx.helo_reply("still serving"))


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
    name = ctx.name("n")
    a = await ctx.connect("a")
    requests = [templates.join_request(ctx.room(f"r{i}"), name) for i in range(limit + 1)]
    step = f"{limit + 1} JOINs in a row"
    replies = re.compile(rb"JOINED_CHATROOM: |ERROR_CODE: ")
    if ctx.profile.pipelining:
        await a.send(b"".join(requests))
    else:  # one at a time, each once the reply to the one before it has arrived
        for index, request in enumerate(requests):
            await a.send(request)
            with trio.move_on_after(ctx.settings.reply_timeout):
                while len(replies.findall(a.buffer)) <= index:
                    await a.fill(f"{a.label}: {step}")
    # Wait for the error and every announcement (in a cluster they may come late).
    announcement = re.compile(b"CLIENT_NAME: " + re.escape(name.encode()) + rb"\nMESSAGE: [^\n]*")
    with trio.move_on_after(ctx.settings.reply_timeout):
        while b"ERROR_CODE: " not in a.buffer or len(announcement.findall(a.buffer)) < limit:
            await a.fill(f"{a.label}: {step}")
    arrived = await a.collect(f"{a.label}: {step}", [])
    joins = len(JOINED_PATTERN.findall(arrived))
    announcements = len(announcement.findall(arrived))
    errors = re.findall(rb"ERROR_CODE: ([^\n]*)\n", arrived)
    last_joined = max((m.end() for m in JOINED_PATTERN.finditer(arrived)), default=0)
    error_at = arrived.rfind(b"ERROR_CODE: ")
    if (joins, announcements, errors) != (limit, limit, [b"5"]) or error_at < last_joined:
        raise CaseFailed(
            step,
            expected=f"{limit} JOINED replies, each with its announcement, then ERROR_CODE: 5",
            arrived=(
                f"{joins} JOINED replies, {announcements} announcements, "
                f"error codes {[e.decode('utf-8', 'replace') for e in errors]}"
                + (", the error before the last JOINED" if 0 <= error_at < last_joined else "")
            ),
        )


ERROR_CASES: list[Case] = [
    case_unknown_lines,
    case_missing_field,
    case_error_1,
    case_error_2,
    case_integers,
    case_error_3,
    case_error_4,
    case_error_5,
]
