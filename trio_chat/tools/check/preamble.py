"""The preamble: the basics probed once, before any case, and every deviation named once.

It connects, sends a HELO, two HELOs in one segment, two JOINs, a CHAT and a LEAVE, reading
each answer until a quiet period, and records in the `Profile` what this server does where it
departs from docs/protocol.md: whether it greets, the shape of its HELO reply, whether it reads
pipelined requests, the order of JOINED and the announcement, the wording of announcements,
how a CHAT ends. Cases use that knowledge to check their setup in the server's dialect and
to attribute a failure of their subject to its root cause.
"""

from __future__ import annotations

import re

import trio

from trio_chat.tools.check import templates
from trio_chat.tools.check.context import Context
from trio_chat.tools.check.profile import NAME, Cause, Profile
from trio_chat.tools.check.wire import JOINED_PATTERN, CaseFailed, Conn, parse_joined


async def probe(ctx: Context) -> None:
    """Fill `ctx.profile` with what the basics show; a failure becomes a blocking cause."""
    profile = ctx.profile
    try:
        a = await ctx.connect("probe", greeting=False)
    except CaseFailed as failure:
        profile.add(Cause("unreachable", failure.step.removeprefix("probe: "), blocking=True))
        return
    try:
        await _greeting(a, profile)
        if await _helo(ctx, a, profile):
            await _pipelining(ctx, a, profile)
        await _unknown(a, profile)
        await _join_leave(ctx, a, profile)
    except CaseFailed as failure:
        profile.add(Cause("basics", f"the preamble stopped: {failure.step}"))


async def _answer(conn: Conn, step: str, until: bytes | re.Pattern[bytes]) -> bytes:
    """Everything that arrives until `until` is among it (or the reply timeout passes) and
    then nothing more for a quiet period."""
    with trio.move_on_after(conn.settings.reply_timeout):
        while not (until in conn.buffer if isinstance(until, bytes) else until.search(conn.buffer)):
            await conn.fill(step)
    await conn.quiet(step)
    arrived = bytes(conn.buffer)
    conn.buffer.clear()
    return arrived


async def _greeting(a: Conn, profile: Profile) -> None:
    await a.quiet("probe: connect")
    if a.buffer:
        profile.greeting = bytes(a.buffer)
        a.buffer.clear()
        profile.add(
            Cause(
                "greeting",
                f"sends {profile.greeting!r} on connecting (the protocol: nothing)",
                subject=("connect_silence",),
            )
        )


async def _helo(ctx: Context, a: Conn, profile: Profile) -> bool:
    """Learn the shape of the HELO reply; whether there is one."""
    await a.send("HELO probe\n")
    marker = b"HELO probe\n"
    arrived = await _answer(a, "probe: HELO", marker)
    if marker not in arrived:
        profile.barrier = False
        profile.add(
            Cause(
                "helo",
                f"no reply to HELO within {ctx.settings.reply_timeout:g} s: every step waits "
                "for a quiet period instead of a HELO barrier",
            )
        )
        return False
    tail = arrived.partition(marker)[2]
    profile.helo_tail = tail
    if tail.count(b"\n") == 2 and not tail.endswith(b"\n"):
        profile.add(
            Cause(
                "helo-newline",
                f"the HELO reply lacks its final newline: {arrived!r}",
                subject=("helo",),
            )
        )
    return True


async def _pipelining(ctx: Context, a: Conn, profile: Profile) -> None:
    """Whether two requests in one segment are both answered."""
    await a.send("HELO pipelined-1\nHELO pipelined-2\n")
    second = b"HELO pipelined-2\n"
    arrived = await _answer(a, "probe: two HELOs in one segment", second)
    if second not in arrived:
        profile.pipelining = False
        profile.add(
            Cause(
                "pipelining",
                "reads one request per recv: of two HELOs sent in one segment, "
                f"{arrived.count(b'HELO pipelined-')} got a reply",
                subject=("pipelining", "byte_by_byte"),
            )
        )


async def _unknown(a: Conn, profile: Profile) -> None:
    """Whether a line that starts no request gets a reply."""
    await a.send("UNKNOWN_PROBE from the checker\n")
    await a.quiet("probe: an unknown line")
    if a.buffer:
        profile.add(
            Cause(
                "answers-unknown",
                f"replies to a line that starts no request (the protocol: no reply at all): "
                f"{bytes(a.buffer)[:200]!r}",
                subject=("unknown_lines", "grader"),
            )
        )
        a.buffer.clear()


def _announcement(arrived: bytes, name: str) -> re.Match[bytes] | None:
    return re.search(
        rb"CHAT: [^\n]*\nCLIENT_NAME: " + re.escape(name.encode()) + rb"\nMESSAGE: ([^\n]*)\n(\n?)",
        arrived,
    )


async def _join_leave(ctx: Context, a: Conn, profile: Profile) -> None:
    """Learn JOINED, the announcements and the end of a CHAT from two members of a room."""
    room, alpha, beta = ctx.room("probe"), ctx.name("alpha"), ctx.name("beta")
    await a.send(templates.join_request(room, alpha))
    arrived = await _answer(a, "probe: JOIN", JOINED_PATTERN)
    joined = parse_joined(arrived, room, alpha)
    if joined is None:
        profile.add(
            Cause(
                "join-reply",
                f"no JOINED_CHATROOM reply for room {room!r} understood: {arrived[:300]!r}",
                blocking=True,
            )
        )
        return
    own = _announcement(arrived, alpha)
    if own is None:
        profile.add(Cause("no-own-join", "the joiner does not receive its own announcement"))
    else:
        if own.start() < arrived.find(b"JOINED_CHATROOM"):
            profile.add(profile.cause("join-order"))
        _learn_wording(profile, own[1].decode("utf-8", "replace"), alpha, "joined")
        if not own[2]:
            profile.chat_end = b"\n"
            profile.add(
                Cause(
                    "chat-end",
                    "CHAT messages end with one newline where the protocol ends them with a "
                    "blank line (\\n\\n)",
                    subject=("broadcasts",),
                )
            )
    b = await ctx.connect("probe-2", greeting=False)
    await b.quiet("probe-2: connect")
    b.buffer.clear()
    await b.send(templates.join_request(room, beta))
    second = parse_joined(await _answer(b, "probe-2: JOIN", JOINED_PATTERN), room, beta)
    await a.quiet("probe: beta joins")
    a.buffer.clear()
    if second is None:
        return
    await b.send(templates.leave_request(second.room_ref, second.join_id, beta))
    left = await _answer(b, "probe-2: LEAVE", b"LEFT_CHATROOM")
    seen = await _answer(a, "probe: beta leaves", b"MESSAGE")
    gone = _announcement(seen, beta)
    if gone is not None:
        _learn_wording(profile, gone[1].decode("utf-8", "replace"), beta, "left")
        if _announcement(left, beta) is None:
            profile.add(profile.cause("no-own-leave"))
    await a.aclose()
    await b.aclose()


def _learn_wording(profile: Profile, message: str, name: str, verb: str) -> None:
    standard = (templates.JOINED_MESSAGE if verb == "joined" else templates.LEFT_MESSAGE).format(
        client_name=name
    )
    keyword = "join" if verb == "joined" else "left"
    if message == standard or keyword not in message.lower():
        return  # the standard wording, or not recognisably an announcement: checked as is
    learned = message.replace(name, NAME)
    if verb == "joined":
        profile.joined_message = learned
    else:
        profile.left_message = learned
    shown, expected = message.replace(name, "<name>"), standard.replace(name, "<name>")
    said = f"{shown!r} where the protocol says {expected!r}"
    earlier = profile.causes.pop("wording", None)
    text = f"{earlier.text}; {said}" if earlier else f"announcements say {said}"
    profile.add(Cause("wording", text, subject=("broadcasts",)))
