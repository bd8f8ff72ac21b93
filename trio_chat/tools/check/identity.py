"""The cases about what a server says of itself (HELO) and what it sends unasked."""

from __future__ import annotations

from trio_chat.tools.check import templates
from trio_chat.tools.check.context import Case, Context, case
from trio_chat.tools.check.wire import CaseFailed, Conn


async def expect_helo(
    conn: Conn, text: str, ip: str, port: int, step: str, *, lenient: bool = False
) -> None:
    """Check the reply to ``HELO <text>``: the text, IP and Port exact, a StudentID, a final
    newline (which `lenient` lets go, as a tolerated deviation)."""
    head = templates.helo_head(text, ip, port)
    label = f"{conn.label}: {step}"
    arrived = await conn.collect(label, [head])
    student_id, newline, rest = arrived.removeprefix(head).partition(b"\n")
    if arrived.startswith(head) and student_id.strip() and not rest:
        if newline:
            return
        if lenient:
            conn.tolerated.add("helo-newline")
            return
        raise CaseFailed(
            label,
            expected=head + "…\n".encode(),
            arrived=arrived,
            causes=frozenset({"helo-newline"}),
        )
    raise CaseFailed(label, expected=head + "…\n".encode(), arrived=arrived)


@case("HELO: text echoed verbatim, the IP and port the client reached, same as in JOINED")
async def case_helo(ctx: Context) -> None:
    a = await ctx.connect("a")
    ip, port = ctx.identity(a)
    text = "text  with: colons,  spaces and ünïcode"
    await a.send(f"HELO {text}\n")
    await expect_helo(a, text, ip, port, "HELO before any JOIN")
    m = await a.join(ctx.room("room"), ctx.name("greeter"))
    if (m.server_ip, m.port) != (ip, port):
        raise CaseFailed(
            "JOINED's SERVER_IP and PORT are HELO's IP and Port",
            expected=f"SERVER_IP: {ip}, PORT: {port}",
            arrived=f"SERVER_IP: {m.server_ip}, PORT: {m.port}",
        )
    await a.send("HELO after joining\n")
    await expect_helo(a, "after joining", ip, port, "HELO after a JOIN")
    b = await ctx.connect("b")
    await b.send("HELO second connection\n")
    await expect_helo(b, "second connection", ip, port, "HELO on another connection")


@case("nothing is sent on connecting, to the new client or to anyone else")
async def case_connect_silence(ctx: Context) -> None:
    member = await ctx.connect("member")
    await member.join(ctx.room("room"), ctx.name("member"))
    newcomer = await ctx.connect("newcomer", greeting=False)
    greeting = ctx.profile.greeting
    await newcomer.expect(
        "a new connection is not greeted", b"", blame=[(greeting, "greeting")] if greeting else ()
    )
    await member.expect_nothing("a new connection is not announced")


HELO_CASES: list[Case] = [case_helo, case_connect_silence]
