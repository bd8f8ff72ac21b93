"""What the checker knows of the server under test: its mode of pacing, and its dialect.

The preamble (`preamble.py`) probes the basics once and records here each deviation it finds
as a `Cause`. Cases then check their subject exactly, and the steps they only use for setup
in the server's own dialect: `Profile.render` rewrites the bytes docs/protocol.md prescribes into
the bytes this server was seen to send (another announcement wording, a CHAT ended by one
newline), so a server with one such habit fails the cases about it and no others.
"""

from __future__ import annotations

import re

from attrs import define, field, frozen

from trio_chat.tools.check import templates


@frozen
class Cause:
    """A root cause: one way the server departs from docs/protocol.md, found once."""

    key: str
    text: str
    blocking: bool = False
    """Cases that need what this cause breaks are not run."""
    subject: tuple[str, ...] = ()
    """The cases about this very behaviour: a failure of theirs is put down to it."""


# Deviations a case may tolerate (in its setup) or be failed by (in its subject) without the
# preamble having seen them; the preamble adds the ones it sees, with their details.
KNOWN = {
    "join-order": Cause(
        "join-order",
        "the join announcement comes before the JOINED reply (the protocol: JOINED first)",
        subject=("join",),
    ),
    "no-own-leave": Cause(
        "no-own-leave",
        "the leaver does not receive its own leave announcement after LEFT_CHATROOM",
        subject=("leave",),
    ),
}

DIALECT = frozenset({"wording", "chat-end"})
"""The deviations `Profile.render` writes: accepted wherever they are not the subject."""

# A CHAT block in bytes the checker wrote itself: its text never holds a blank line.
_CHAT_BLOCK = re.compile(
    rb"CHAT: ([^\n]*)\nCLIENT_NAME: ([^\n]*)\nMESSAGE: ((?:[^\n]|\n(?!\n))*)\n\n"
)
NAME = "\x00"
"""Where the client's name goes in a learned announcement text."""


@define
class Profile:
    """The mode of the run and what the preamble learned about the server."""

    paced: bool = False
    """Wait for each reply and a quiet period, rather than send a HELO barrier behind it."""
    barrier: bool = True
    """Whether a HELO reply can serve as a barrier (it is answered, and its shape is known)."""
    pipelining: bool = True
    """Whether the server reads several requests from one segment: if not, a barrier is sent
    only once the reply it follows has arrived."""
    helo_tail: bytes | None = None
    """What follows ``HELO <text>\\n`` in this server's HELO reply, once learned."""
    greeting: bytes = b""
    """What the server sends on connecting (dropped, except where it is the subject)."""
    joined_message: str = templates.JOINED_MESSAGE.format(client_name=NAME)
    left_message: str = templates.LEFT_MESSAGE.format(client_name=NAME)
    chat_end: bytes = b"\n\n"
    causes: dict[str, Cause] = field(factory=dict)
    """Every deviation found, by key, in the order found."""

    @property
    def mode(self) -> str:
        """The mode of the run, as the report names it."""
        return "paced" if self.paced else "strict"

    def cause(self, key: str) -> Cause:
        """The cause `key`, as found, or as `KNOWN` describes it."""
        return self.causes.get(key) or KNOWN.get(key) or Cause(key, key)

    def add(self, cause: Cause) -> None:
        """Record a deviation (the first record of a key wins)."""
        self.causes.setdefault(cause.key, cause)

    def blocked(self, needs: frozenset[str]) -> Cause | None:
        """The blocking cause that keeps a case needing `needs` from running, if any."""
        for cause in self.causes.values():
            if cause.blocking and (cause.key in needs or cause.key in ("down", "unreachable")):
                return cause
        return None

    def render(self, canonical: bytes) -> tuple[bytes, frozenset[str]]:
        """`canonical` as this server writes it, and the causes that changed it."""
        used: set[str] = set()
        standard_join = templates.JOINED_MESSAGE.format(client_name=NAME)
        standard_left = templates.LEFT_MESSAGE.format(client_name=NAME)

        def rewrite(match: re.Match[bytes]) -> bytes:
            ref, name, message = match.groups()
            text = name.decode("utf-8", "replace")
            for standard, learned in (
                (standard_join, self.joined_message),
                (standard_left, self.left_message),
            ):
                if learned != standard and message == standard.replace(NAME, text).encode():
                    message = learned.replace(NAME, text).encode()
                    used.add("wording")
            if self.chat_end != b"\n\n":
                used.add("chat-end")
            return b"CHAT: %s\nCLIENT_NAME: %s\nMESSAGE: %s%s" % (ref, name, message, self.chat_end)

        rendered = _CHAT_BLOCK.sub(rewrite, canonical)
        return rendered, frozenset(used)
