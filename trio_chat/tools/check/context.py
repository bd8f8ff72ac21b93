"""What a case is, and what it works with: the server's address, the settings, the profile
the preamble learned, fresh names, and the connections it opens."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import trio
from attrs import define, field, frozen

from trio_chat.tools.check.profile import Profile
from trio_chat.tools.check.settings import Settings
from trio_chat.tools.check.wire import CaseFailed, Conn, describe


@define(eq=False)
class Context:
    """One case's view of the server; everything it opens is closed when it ends."""

    host: str
    port: int
    settings: Settings
    profile: Profile
    tag: str
    """Unique to this run and case: every room and client name ends with it."""
    conns: list[Conn] = field(factory=list)
    tolerated: set[str] = field(factory=set)
    """The deviations (`Profile.causes` keys) this case's setup tolerated."""

    @property
    def paced(self) -> bool:
        """Whether this is a paced run."""
        return self.profile.paced

    def room(self, label: str) -> str:
        """A room name no other case or run uses."""
        return f"{label}-{self.tag}"

    def name(self, label: str) -> str:
        """A client name no other case or run uses: a server that keys its state by client
        name sees nothing of other cases."""
        return f"{label}-{self.tag}"

    async def connect(self, label: str, *, greeting: bool = True) -> Conn:
        """Open a new connection.

        With `greeting`, anything the server sends on connecting (docs/protocol.md says: nothing)
        is read and dropped, so that only `connect_silence` (and the grader's sequence) fail
        a server that greets its clients.
        """
        timeout = self.settings.connect_timeout
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)
        except trio.TooSlowError:
            raise CaseFailed(f"{label}: cannot connect (no answer within {timeout:g} s)") from None
        except OSError as exc:
            raise CaseFailed(f"{label}: cannot connect ({describe(exc)})") from None
        conn = Conn(stream, label, self.settings, self.profile, self.tolerated)
        self.conns.append(conn)
        if greeting and self.profile.greeting:
            await conn.collect(f"{label}: connect", [b""])
        return conn

    def identity(self, conn: Conn) -> tuple[str, int]:
        """The IP and port the server should report in HELO and JOINED to `conn`."""
        host, port = conn.peer
        return self.settings.advertise_ip or host, self.settings.advertise_port or port

    def helo_reply(self, text: str) -> bytes:
        """The server's exact reply to ``HELO <text>``, as the preamble learned its shape."""
        return f"HELO {text}\n".encode() + (self.profile.helo_tail or b"")

    async def aclose(self) -> None:
        """Close every connection the case opened."""
        for conn in self.conns:
            with trio.CancelScope(shield=True):
                await conn.aclose()


CaseFunction = Callable[[Context], Awaitable[None]]


@frozen
class Case:
    """One check: its name, what it checks, which setting bounds its duration, and what it
    needs to run at all."""

    name: str
    summary: str
    run: CaseFunction
    timeout: str = "case_timeout"
    needs_kill: bool = False
    needs: frozenset[str] = frozenset({"join-reply"})
    """Basics (`Profile.causes` keys of blocking causes) or other cases it cannot run
    without: a case is NOT RUN when one of them failed."""


def case(
    summary: str,
    *,
    timeout: str = "case_timeout",
    needs_kill: bool = False,
    needs: frozenset[str] = frozenset({"join-reply"}),
) -> Callable[[CaseFunction], Case]:
    """Make the decorated function a case named after it."""

    def make(function: CaseFunction) -> Case:
        name = function.__name__.removeprefix("case_")
        return Case(name, summary, function, timeout, needs_kill, needs)

    return make


async def expect_all(step: str, *pairs: tuple[Conn, bytes], dialect: bool = True) -> None:
    """Check each connection received exactly its bytes (b"": nothing), all at once: a paced
    run waits one quiet period for them all."""
    async with trio.open_nursery() as nursery:
        for conn, expected in pairs:
            nursery.start_soon(partial(conn.expect, step, expected, dialect=dialect))
