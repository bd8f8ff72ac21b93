"""The cases about load: a member that does not read, many connections, a crowd in one room."""

from __future__ import annotations

import trio

from trio_chat.tools.check import templates
from trio_chat.tools.check.context import Case, Context, case
from trio_chat.tools.check.wire import JOINED_PATTERN, CaseFailed, Conn, Membership, parse_joined


@case(
    "a member that reads nothing is cut off; the others get every message, in order",
    timeout="flood_timeout",
)
async def case_slow_reader(ctx: Context) -> None:
    settings = ctx.settings
    room = ctx.room("flood")
    sloth, writer = await ctx.connect("sloth"), await ctx.connect("writer")
    s = await sloth.join(room, ctx.name("sloth"))
    w = await writer.join(room, ctx.name("writer"))
    await sloth.expect("writer joined", w.announced)  # from here on, sloth reads nothing
    count = max(1, settings.flood_bytes // settings.flood_message)
    filler = "x" * (settings.flood_message - 16)
    texts = [f"{i:08d} {filler}" for i in range(count)]
    messages = [ctx.profile.render(w.chat(text))[0] for text in texts]
    cut_off, _ = ctx.profile.render(s.left_announcement)

    # The writer reads its own echoes while it sends, and never runs more than
    # `flood_window` bytes ahead of them: it must not become a slow reader itself. To a server
    # that reads one request per recv, it sends each message once the one before came back.
    window = max(1, settings.flood_window // settings.flood_message)
    if not ctx.profile.pipelining:
        window = 1
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
            s.left_announcement,
        )
    else:
        await writer.expect_nothing("after the flood")


@case(
    "many clients at once: all served; every member sees the room in the same order",
    timeout="crowd_timeout",
    needs=frozenset({"join-reply", "many_connections"}),
)
async def case_crowd(ctx: Context) -> None:
    size = ctx.settings.crowd_size
    room = ctx.room("crowd")
    conns: dict[int, Conn] = {}
    members: dict[int, Membership] = {}

    async def arrive(index: int) -> None:
        conn = conns[index] = await ctx.connect(f"crowd{index}")
        name = ctx.name(f"c{index}")
        await conn.send(templates.join_request(room, name))
        membership = members[index] = await _take_joined(conn, room, name)
        # Its own announcement shows the join has taken effect everywhere (in a cluster the
        # JOINED reply may come first); the chat below is sent only once all have.
        announced = ctx.profile.render(membership.announced)[0]
        await conn.wait_for(announced, f"crowd{index}: its own join announcement")

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
    await conns[0].chat(members[0], "hello, crowd")
    chat = ctx.profile.render(members[0].chat("hello, crowd"))[0]
    seen: list[list[bytes]] = [[] for _ in range(size)]

    async def collect(index: int) -> None:
        conn = conns[index]
        await conn.wait_for(chat, f"crowd{index}: the chat after every JOIN")
        before, found, _ = bytes(conn.buffer).partition(chat)
        if not found:
            raise CaseFailed(f"crowd{index}: the chat reaches every member", arrived=conn.buffer)
        del conn.buffer[: len(before) + len(chat)]
        seen[index] = [b"CHAT: " + part for part in before.split(b"CHAT: ") if part]
        await conn.expect("nothing after the chat", b"")

    async with trio.open_nursery() as nursery:
        for index in range(size):
            nursery.start_soon(collect, index)
    order = max(seen, key=len)
    for index, announcements in enumerate(seen):
        own = ctx.profile.render(members[index].announced)[0]
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


@case(
    "many connections open at once: each one is answered",
    timeout="crowd_timeout",
    needs=frozenset(),
)
async def case_many_connections(ctx: Context) -> None:
    size = ctx.settings.connections
    conns = [await ctx.connect(f"conn{index}") for index in range(size)]
    answered: list[int] = []

    async def ask(index: int) -> None:
        conn = conns[index]
        await conn.send(f"HELO connection {index}\n")
        marker = ctx.helo_reply(f"connection {index}")
        with trio.move_on_after(ctx.settings.reply_timeout):
            while marker not in conn.buffer:
                try:
                    await conn.fill(f"{conn.label}: HELO")
                except CaseFailed:
                    return
            answered.append(index)

    async with trio.open_nursery() as nursery:
        for index in range(size):
            nursery.start_soon(ask, index)
    if len(answered) < size:
        silent = sorted(set(range(size)) - set(answered))
        raise CaseFailed(
            f"{size} connections open at once, each sends HELO",
            expected=f"{size} HELO replies within {ctx.settings.reply_timeout:g} s",
            arrived=f"{len(answered)} replies; none on connections {_ranges(silent)}",
        )


def _ranges(numbers: list[int]) -> str:
    """`numbers` (sorted) as "0-3, 7": each run of consecutive numbers as one range."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and runs[-1][-1] == number - 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


LOAD_CASES: list[Case] = [case_slow_reader, case_many_connections, case_crowd]
