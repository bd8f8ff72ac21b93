"""The cases about framing: how requests are read (pipelined, split byte by byte, CRLF,
spacing) and how broadcasts are written (byte for byte)."""

from __future__ import annotations

from trio_chat.tools.check import templates
from trio_chat.tools.check.context import Case, Context, case, expect_all
from trio_chat.tools.check.wire import Conn, Membership


async def _framing_setup(ctx: Context) -> tuple[Conn, Conn, Membership, Membership]:
    """A connection `a` in a room of its own, and `b` in a room `a` is about to join."""
    a, b = await ctx.connect("a"), await ctx.connect("b")
    own = await a.join(ctx.room("own"), ctx.name("alpha"))
    target = await b.join(ctx.room("target"), ctx.name("beta"))
    return a, b, own, target


def _script(own: Membership, target: Membership) -> tuple[bytes, Membership]:
    """Requests a's framing cases send: JOIN, CHAT, HELO, a two-line CHAT, blank lines."""
    name = own.client_name
    membership = Membership(
        target.room_name, name, own.server_ip, own.port, target.room_ref, own.join_id
    )
    ref, join_id = target.room_ref, own.join_id
    script = (
        templates.join_request(target.room_name, name)
        + b"\n"
        + templates.chat_request(ref, join_id, name, "one")
        + b"HELO framed\n"
        + templates.chat_request(ref, join_id, name, "two\nlines")
    )
    return script, membership


async def _check_script(ctx: Context, a: Conn, b: Conn, m: Membership, step: str) -> None:
    tail = m.chat("one") + ctx.helo_reply("framed") + m.chat("two\nlines")
    await a.expect(
        step,
        m.joined + m.announced + tail,
        tolerate=[(m.announced + m.joined + tail, "join-order")],
    )
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
    room, name = ctx.room("crlf"), ctx.name("crlf")
    a, b = await ctx.connect("a"), await ctx.connect("b")
    join = templates.join_request(room, name).replace(b"\n", b"\r\n")
    m = await a.join(room, name, request=join)
    mb = await b.join(room, ctx.name("other"))
    await a.expect("other joined", mb.announced)
    chat = templates.chat_request(m.room_ref, m.join_id, name, "two\nlines")
    await a.send(chat.replace(b"\n", b"\r\n"))
    await a.expect("a CRLF CHAT", m.chat("two\nlines"))
    await b.expect("a CRLF CHAT", m.chat("two\nlines"))
    await a.send("HELO crlf text\r\n")
    await a.expect("a CRLF HELO", ctx.helo_reply("crlf text"))
    await a.send(templates.leave_request(m.room_ref, m.join_id, name).replace(b"\n", b"\r\n"))
    await a.expect_left("a CRLF LEAVE", m)
    await b.expect("crlf left", m.left_announcement)


@case("fields in any order, KEY:value and extra spaces, empty CLIENT_IP and PORT")
async def case_spacing(ctx: Context) -> None:
    room, name = ctx.room("spacing"), ctx.name("spaced")
    a, b = await ctx.connect("a"), await ctx.connect("b")
    join = f"JOIN_CHATROOM:{room}\nCLIENT_NAME:   {name}  \nPORT:\nCLIENT_IP:\n"
    m = await a.join(room, name, request=join.encode())
    mb = await b.join(room, ctx.name("other"))
    await a.expect("other joined", mb.announced)
    await a.send(
        f"CHAT:{m.room_ref}\nCLIENT_NAME: {name}\nJOIN_ID:   {m.join_id}  \nMESSAGE:tight\n\n"
    )
    await expect_both(a, b, "CHAT with KEY:value and JOIN_ID before CLIENT_NAME", m.chat("tight"))
    await a.send(
        f"CHAT:  {m.room_ref}  \nJOIN_ID:{m.join_id}\nCLIENT_NAME:{name}\nMESSAGE:  loose\n\n"
    )
    await expect_both(
        a, b, "CHAT with spaces (MESSAGE: one leading space removed)", m.chat(" loose")
    )
    await a.send(f"LEAVE_CHATROOM:{m.room_ref}\nCLIENT_NAME:{name}\nJOIN_ID:  {m.join_id}\n")
    await a.expect_left("LEAVE spelling", m)
    await b.expect("spaced left", m.left_announcement)


async def expect_both(a: Conn, b: Conn, step: str, expected: bytes) -> None:
    """Both connections receive exactly `expected`."""
    await a.expect(step, expected)
    await b.expect(step, expected)


@case("announcements and CHATs byte for byte: the protocol's wording, a blank line after each")
async def case_broadcasts(ctx: Context) -> None:
    room = ctx.room("words")
    a, b = await ctx.connect("a"), await ctx.connect("b")
    ma = await a.join(room, ctx.name("first"), dialect=False)
    mb = await b.join(room, ctx.name("second"), dialect=False)
    await a.expect("the second member's join announcement", mb.announced, dialect=False)
    chat = await a.chat(ma, "two\nlines, with  spaces: and ünïcode")
    await expect_all("a two-line CHAT, relayed exactly", (a, chat), (b, chat), dialect=False)
    await b.leave(mb)
    await b.expect(
        "LEAVE: LEFT, then the leave announcement",
        mb.left + mb.left_announcement,
        dialect=False,
        tolerate=[(mb.left, "no-own-leave")],
    )
    await a.expect("the second member's leave announcement", mb.left_announcement, dialect=False)


FRAMING_CASES: list[Case] = [
    case_broadcasts,
    case_pipelining,
    case_byte_by_byte,
    case_crlf,
    case_spacing,
]
