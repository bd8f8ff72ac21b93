"""The cases about membership: joining, leaving, names, and connections that end."""

from __future__ import annotations

import contextlib

import trio

from trio_chat.tools.check import templates
from trio_chat.tools.check.context import Case, Context, case, expect_all
from trio_chat.tools.check.wire import CaseFailed

# A ROOM_REF no server will have assigned while being checked.
UNUSED_REF = 999_999_999


@case("JOINED comes before the join announcement, which the joiner receives too")
async def case_join(ctx: Context) -> None:
    room, other_room = ctx.room("a"), ctx.room("b")
    ann, bob = ctx.name("ann"), ctx.name("bob")
    first, second = await ctx.connect("first"), await ctx.connect("second")
    m1 = await first.join(room, ann, strict=True)
    m2 = await second.join(room, bob, strict=True)
    await first.expect("bob joined", m2.announced)
    again = await first.join(room, ann, strict=True)
    if (again.room_ref, again.join_id) != (m1.room_ref, m1.join_id):
        raise CaseFailed(
            "joining a room again: the same ROOM_REF and JOIN_ID",
            expected=f"ROOM_REF {m1.room_ref}, JOIN_ID {m1.join_id}",
            arrived=f"ROOM_REF {again.room_ref}, JOIN_ID {again.join_id}",
        )
    await second.expect("ann joined again: announced again", m1.announced)
    chat = await second.chat(m2, "members are not duplicated")
    await expect_all("a chat after the second join arrives once", (second, chat), (first, chat))
    alias = await first.join(other_room, ctx.name("ann-elsewhere"), strict=True)
    if alias.join_id != m1.join_id or alias.room_ref == m1.room_ref:
        raise CaseFailed(
            "a second room: the same JOIN_ID, a new ROOM_REF",
            expected=f"JOIN_ID {m1.join_id}, ROOM_REF not {m1.room_ref}",
            arrived=f"JOIN_ID {alias.join_id}, ROOM_REF {alias.room_ref}",
        )


@case("two connections using the same CLIENT_NAME in one room are two members")
async def case_same_name(ctx: Context) -> None:
    room, name = ctx.room("twins"), ctx.name("twin")
    a, b = await ctx.connect("a"), await ctx.connect("b")
    ma = await a.join(room, name)
    mb = await b.join(room, name)
    await a.expect("the second twin joined", mb.announced)
    if ma.join_id == mb.join_id:
        raise CaseFailed(
            "JOIN_IDs of two connections using one name",
            expected="two different JOIN_IDs",
            arrived=f"{ma.join_id} and {mb.join_id}",
        )
    chat = await a.chat(ma, "from the first twin")
    await expect_all("the first twin chats: both receive it", (a, chat), (b, chat))
    chat = await b.chat(mb, "from the second twin")
    await expect_all("the second twin chats: both receive it", (a, chat), (b, chat))
    await b.leave(mb)
    await b.expect_left("the second twin leaves", mb)
    await a.expect("the second twin left", mb.left_announcement)
    chat = await a.chat(ma, "the first twin is still a member")
    await expect_all("after one twin left, the other is still a member", (a, chat), (b, b""))


@case("LEAVE: LEFT, then the announcement (to the leaver too), then nothing from that room")
async def case_leave(ctx: Context) -> None:
    room, other_room = ctx.room("room"), ctx.room("other")
    leaver, stayer = await ctx.connect("leaver"), await ctx.connect("stayer")
    m = await leaver.join(room, ctx.name("leaver"))
    ms = await stayer.join(room, ctx.name("stayer"))
    await leaver.expect("stayer joined", ms.announced)
    mo = await leaver.join(other_room, ctx.name("leaver-too"))
    await leaver.leave(m)
    await leaver.expect(
        "LEAVE: LEFT, then the leaver's own announcement",
        m.left + m.left_announcement,
        blame=[(m.left, "no-own-leave")],
    )
    await stayer.expect("leaver left", m.left_announcement)
    chat = await stayer.chat(ms, "after the leave")
    await expect_all("a chat in the room left", (stayer, chat), (leaver, b""))
    chat = await leaver.chat(mo, "still in the other room")
    await leaver.expect("leaving one room keeps the others", chat)


@case("a repeated LEAVE, or one for a room not joined, gets LEFT and nothing else")
async def case_leave_repeat(ctx: Context) -> None:
    room, elsewhere = ctx.room("room"), ctx.room("elsewhere")
    repeater, watcher = ctx.name("repeater"), ctx.name("watcher")
    a, b = await ctx.connect("a"), await ctx.connect("b")
    m = await a.join(room, repeater)
    mb = await b.join(room, watcher)
    await a.expect("watcher joined", mb.announced)
    other = await b.join(elsewhere, watcher)
    await a.leave(m)
    await a.expect_left("the first LEAVE (checked by the leave case)", m)
    await b.expect("repeater left", m.left_announcement)
    await a.leave(m)
    await a.expect("the same LEAVE again: the same LEFT", m.left)
    await b.expect_nothing("a repeated LEAVE announces nothing")
    await a.send(templates.leave_request(UNUSED_REF, m.join_id, repeater))
    await a.expect("LEAVE of a ROOM_REF never assigned", templates.left(UNUSED_REF, m.join_id))
    await a.send(templates.leave_request(other.room_ref, m.join_id, repeater))
    await a.expect("LEAVE of a room never joined", templates.left(other.room_ref, m.join_id))
    await b.expect_nothing("a stray LEAVE announces nothing")


@case("DISCONNECT: a leave announcement per room in ROOM_REF order, to the client too; close")
async def case_disconnect(ctx: Context) -> None:
    low, high = ctx.room("low"), ctx.room("high")
    owner, leaving = await ctx.connect("owner"), await ctx.connect("leaving")
    m_low = await owner.join(low, ctx.name("owner"))
    m_high = await owner.join(high, ctx.name("owner"))
    h = await leaving.join(high, ctx.name("name-in-high"))
    l_ = await leaving.join(low, ctx.name("name-in-low"))
    await owner.expect("joins", h.announced + l_.announced)
    if not m_low.room_ref < m_high.room_ref:
        raise CaseFailed(
            "ROOM_REFs count up",
            expected=f"more than {m_low.room_ref}",
            arrived=str(m_high.room_ref),
        )
    await leaving.send(templates.disconnect_request(l_.client_name))
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
    w1 = await watcher.join(one, ctx.name("watcher"))
    await watcher.join(two, ctx.name("watcher"))
    quitter, crasher = await ctx.connect("quitter"), await ctx.connect("crasher")
    q1 = await quitter.join(one, ctx.name("quitter"))
    q2 = await quitter.join(two, ctx.name("quitter-two"))
    c1 = await crasher.join(one, ctx.name("crasher"))
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


MEMBERSHIP_CASES: list[Case] = [
    case_join,
    case_same_name,
    case_leave,
    case_leave_repeat,
    case_disconnect,
    case_eof_reset,
]
