"""The `kill` case: KILL_SERVICE ends the service (run only when asked to)."""

from __future__ import annotations

import trio

from trio_chat.tools.check.context import Case, Context, case
from trio_chat.tools.check.wire import CaseFailed

# How often, after KILL_SERVICE, the kill case tries to connect until the port refuses.
KILL_POLL_INTERVAL = 0.05


@case(
    "KILL_SERVICE: no reply; every connection closed; the port refuses",
    needs_kill=True,
)
async def case_kill(ctx: Context) -> None:
    settings = ctx.settings
    member, idle, killer = [await ctx.connect(label) for label in ("member", "idle", "killer")]
    await member.join(ctx.room("last"), ctx.name("member"))
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


KILL_CASES: list[Case] = [case_kill]
