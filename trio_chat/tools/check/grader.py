"""The `grader` case: the sequence the lab's automated grader ran, every socket checked after
every step.

In strict mode every reply is checked byte for byte, with a HELO barrier behind each step.
In paced mode it runs as the grader did, waiting for replies instead of sending barriers, and
accepts what the grader accepted: another announcement wording, a CHAT ended by one newline,
a HELO reply without its final newline (each still reported as a deviation).
"""

from __future__ import annotations

from collections.abc import Mapping

from trio_chat.tools.check import templates
from trio_chat.tools.check.context import Context, case, expect_all
from trio_chat.tools.check.identity import expect_helo
from trio_chat.tools.check.wire import CaseFailed, Conn, Membership


class _Run:
    """The open connections of the sequence, and a step checked on all of them."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.open: list[Conn] = []

    async def connect(self, label: str) -> Conn:
        conn = await self.ctx.connect(label, greeting=False)
        self.open.append(conn)
        return conn

    async def others(self, step: str, expected: Mapping[Conn, bytes], skip: Conn | None) -> None:
        """Each open connection but `skip` receives its bytes of `expected`, or nothing."""
        pairs = [(conn, expected.get(conn, b"")) for conn in self.open if conn is not skip]
        await expect_all(step, *pairs, dialect=self.ctx.paced)

    async def join(self, conn: Conn, room: str, name: str, members: list[Conn]) -> Membership:
        """`conn` joins `room` as `name`: its JOINED and announcement; `members` hear it."""
        m = await conn.join(room, name, strict=not self.ctx.paced, dialect=self.ctx.paced)
        await self.others(f"{name} joined {room}", dict.fromkeys(members, m.announced), conn)
        return m

    async def chat(self, conn: Conn, m: Membership, text: str, receivers: list[Conn]) -> None:
        """`conn` chats in the room of `m`; exactly `receivers` get the message."""
        message = await conn.chat(m, text)
        await self.others(f"{m.client_name} chats: {text}", dict.fromkeys(receivers, message), None)


@case(
    "the sequence the lab's grader runs: HELO, joins, chats, leaves, disconnect, rejoin",
    needs=frozenset({"join-reply"}),
)
async def case_grader(ctx: Context) -> None:
    run = _Run(ctx)
    lenient = ctx.paced
    base = await run.connect("base")
    ip, port = ctx.identity(base)
    await base.send("HELO BASE_TEST\n")
    await expect_helo(base, "BASE_TEST", ip, port, "HELO on the base connection", lenient=lenient)
    await base.send("UNKNOWN_MESSAGE from the grader\n")
    await base.expect_nothing("an unknown line gets no reply")

    room1, room2 = ctx.room("room1"), ctx.room("room2")
    c1, c2, c3, c4 = [await run.connect(f"client{i}") for i in range(1, 5)]
    n1, n2, n3, n4 = [ctx.name(f"client{i}") for i in range(1, 5)]
    m1 = await run.join(c1, room1, n1, [])
    m2 = await run.join(c2, room1, n2, [c1])
    m3 = await run.join(c3, room1, n3, [c1, c2])
    m4 = await run.join(c4, room1, n4, [c1, c2, c3])
    first = [m1, m2, m3, m4]
    ids = [m.join_id for m in first]
    if len({m.room_ref for m in first}) != 1 or len(set(ids)) != 4:
        raise CaseFailed(
            "four connections join room1: one ROOM_REF, four JOIN_IDs",
            expected=f"ROOM_REF {m1.room_ref} four times, four different JOIN_IDs",
            arrived=f"ROOM_REFs {[m.room_ref for m in first]}, JOIN_IDs {ids}",
        )
    m1b = await run.join(c1, room2, n1, [])
    m2b = await run.join(c2, room2, n2, [c1])
    if m1b.room_ref == m1.room_ref or (m1b.join_id, m2b.join_id) != (m1.join_id, m2.join_id):
        raise CaseFailed(
            "client1 and client2 join room2: a new ROOM_REF, their JOIN_IDs kept",
            expected=f"ROOM_REF not {m1.room_ref}, JOIN_IDs {m1.join_id} and {m2.join_id}",
            arrived=f"ROOM_REF {m1b.room_ref}, JOIN_IDs {m1b.join_id} and {m2b.join_id}",
        )

    await run.chat(c1, m1, "hello room1", [c1, c2, c3, c4])
    await run.chat(c2, m2b, "hello room2", [c1, c2])
    m3b = await run.join(c3, room2, n3, [c1, c2])
    # The grader sends another client's JOIN_ID here: the server must not check it.
    borrowed = Membership(room2, n3, m3b.server_ip, m3b.port, m3b.room_ref, m1.join_id)
    await run.chat(c3, borrowed, "someone else's JOIN_ID", [c1, c2, c3])

    for leaver, m, remaining in ((c1, m1, [c2, c3, c4]), (c2, m2, [c3, c4])):
        await leaver.leave(m)
        step = f"{m.client_name} leaves room1: LEFT, then its own announcement"
        own = [(m.left, "no-own-leave")]
        await leaver.expect(step, m.left + m.left_announcement, dialect=lenient, blame=own)
        await run.others(step, dict.fromkeys(remaining, m.left_announcement), leaver)
    await run.chat(c4, m4, "just us", [c3, c4])
    await c1.leave(m1b)
    step = f"{n1} leaves room2"
    await c1.expect(step, m1b.left + m1b.left_announcement, dialect=lenient)
    await run.others(step, dict.fromkeys([c2, c3], m1b.left_announcement), c1)
    await c1.leave(m1b)
    await run.others(f"{n1} leaves room2 again: LEFT only", {c1: m1b.left}, None)
    await run.chat(c2, m2b, "client1 is gone", [c2, c3])

    await c3.send(templates.disconnect_request(n3))
    gone = (m3, m3b) if m3.room_ref < m3b.room_ref else (m3b, m3)
    await c3.expect_close(
        f"{n3} disconnects: its announcements, lower ROOM_REF first, then the close",
        gone[0].left_announcement + gone[1].left_announcement,
        dialect=lenient,
    )
    run.open.remove(c3)
    await run.others(
        f"{n3} disconnected", {c4: m3.left_announcement, c2: m3b.left_announcement}, None
    )
    await run.chat(c4, m4, "after the disconnect", [c4])
    await run.chat(c2, m2b, "still here", [c2])

    c5 = await run.connect("client3-again")
    m5 = await run.join(c5, room1, n3, [c4])
    if m5.room_ref != m1.room_ref or m5.join_id in ids:
        raise CaseFailed(
            "a new connection joins room1 under client3's name",
            expected=f"ROOM_REF {m1.room_ref}, a JOIN_ID not in {ids}",
            arrived=f"ROOM_REF {m5.room_ref}, JOIN_ID {m5.join_id}",
        )
    await run.chat(c5, m5, "back again", [c4, c5])
