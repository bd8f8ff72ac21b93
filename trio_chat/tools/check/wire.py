"""The checker's side of a connection: raw bytes out, exact bytes expected back.

How the checker knows a step's replies are all in depends on the mode (`Profile`):

- strict (the default): behind the requests of a step the checker sends ``HELO <unique
  token>`` and reads up to that HELO's reply. A server answers a connection's requests in
  order, so what arrived before it is what the step caused: anything extra (an answer to an
  unknown line, a duplicate, a message for another room) shows up, and a missing reply fails
  without waiting for a timeout. If what arrived is only the start of what is expected, the
  rest is awaited (a broadcast may cross the nodes of a cluster more slowly than a HELO
  reply). A server that reads only one request per `recv` gets its barrier only once the
  reply it follows has arrived.
- paced (``--paced``): no barrier, as the lab's grader did: the checker reads until what is
  expected has arrived, then for a quiet period, so that anything extra shows up.
"""

from __future__ import annotations

import itertools
import re
import socket
import struct
from collections.abc import Sequence

import trio
from attrs import frozen

from trio_chat.tools.check import templates
from trio_chat.tools.check.profile import DIALECT, Profile
from trio_chat.tools.check.settings import Settings

_barrier_ids = itertools.count()

_DESCRIPTION = re.compile(rb"ERROR_DESCRIPTION: *[^\n]*\S[^\n]*\n")

Shown = bytes | bytearray | str


class CaseFailed(Exception):
    """A step of a case did not go as docs/protocol.md says."""

    def __init__(
        self,
        step: str,
        *,
        expected: Shown = b"",
        arrived: Shown = b"",
        causes: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(step)
        self.step = step
        self.expected = _text(expected)
        self.arrived = _text(arrived)
        self.causes = causes
        """Root causes (`Profile.causes` keys) that explain this failure."""


def _text(data: Shown) -> str:
    return data if isinstance(data, str) else data.decode("utf-8", "replace")


def describe(exc: BaseException) -> str:
    """`exc` in a few words, never empty."""
    return str(exc) or type(exc).__name__


def normalize(arrived: bytes) -> bytes:
    """`arrived` with each non-empty ERROR_DESCRIPTION written as `templates.error` writes it."""
    return _DESCRIPTION.sub(f"ERROR_DESCRIPTION: {templates.ANY_DESCRIPTION}\n".encode(), arrived)


@frozen
class Membership:
    """What a JOINED reply said."""

    room_name: str
    client_name: str
    server_ip: str
    port: int
    room_ref: int
    join_id: int

    @property
    def joined(self) -> bytes:
        """The exact JOINED_CHATROOM reply."""
        return templates.joined(
            self.room_name, self.server_ip, self.port, self.room_ref, self.join_id
        )

    @property
    def announced(self) -> bytes:
        """The join announcement."""
        return templates.joined_announcement(self.room_ref, self.client_name)

    @property
    def left_announcement(self) -> bytes:
        """The leave announcement."""
        return templates.left_announcement(self.room_ref, self.client_name)

    @property
    def left(self) -> bytes:
        """The LEFT_CHATROOM reply to a LEAVE of this membership."""
        return templates.left(self.room_ref, self.join_id)

    def chat(self, message: str, client_name: str | None = None) -> bytes:
        """A CHAT broadcast in this room."""
        return templates.chat(self.room_ref, client_name or self.client_name, message)


class Conn:
    """One TCP connection to the server under test."""

    def __init__(
        self,
        stream: trio.SocketStream,
        label: str,
        settings: Settings,
        profile: Profile,
        tolerated: set[str],
    ) -> None:
        self.stream = stream
        self.label = label
        self.settings = settings
        self.profile = profile
        self.tolerated = tolerated
        """The case's record of deviations its setup tolerated."""
        self.buffer = bytearray()
        self.eof = False
        self.closed = False

    @property
    def peer(self) -> tuple[str, int]:
        """The server address this connection reached."""
        host, port = self.stream.socket.getpeername()[:2]
        return host.removeprefix("::ffff:") if "." in host else host, port

    # -- sending ---------------------------------------------------------------------------

    async def send(self, data: bytes | str, step: str = "") -> None:
        """Send `data` as it is."""
        payload = data.encode() if isinstance(data, str) else data
        try:
            await self.stream.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise CaseFailed(
                f"{self.label}: sending failed ({describe(exc)})"
                + (f" during: {step}" if step else ""),
                arrived=self.buffer,
            ) from None

    async def send_bytewise(self, data: bytes | str) -> None:
        """Send `data` one byte per TCP segment, pausing between bytes."""
        payload = data.encode() if isinstance(data, str) else data
        for index in range(len(payload)):
            await self.send(payload[index : index + 1])
            await trio.sleep(self.settings.byte_pause)

    async def reset(self) -> None:
        """Close abruptly: the server sees a connection reset (RST), not an end of stream."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection (an end of stream for the server)."""
        if not self.closed:
            self.closed = True
            await trio.aclose_forcefully(self.stream)

    # -- receiving -------------------------------------------------------------------------

    async def fill(self, step: str) -> None:
        """Receive more bytes into the buffer; an end of stream or an error fails `step`."""
        if self.eof:
            raise CaseFailed(f"{step}: the server closed the connection", arrived=self.buffer)
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise CaseFailed(
                f"{step}: connection error ({describe(exc)})", arrived=self.buffer
            ) from None
        if not data:
            self.eof = True
            raise CaseFailed(f"{step}: the server closed the connection", arrived=self.buffer)
        self.buffer += data

    async def receive_exactly(self, size: int, step: str) -> bytes:
        """The next `size` bytes."""
        with trio.move_on_after(self.settings.reply_timeout):
            while len(self.buffer) < size:
                await self.fill(step)
            data = bytes(self.buffer[:size])
            del self.buffer[:size]
            return data
        raise CaseFailed(
            f"{step}: {size} bytes did not arrive within {self.settings.reply_timeout:g} s",
            arrived=self.buffer,
        )

    async def quiet(self, step: str) -> None:
        """Read until nothing has arrived for `quiet_period`."""
        while True:
            with trio.move_on_after(self.settings.quiet_period) as scope:
                await self.fill(step)
            if scope.cancelled_caught:
                return

    async def gather(self, step: str, accepted: Sequence[bytes], *, quiet: bool = True) -> None:
        """Read until the buffer holds one of `accepted` (or cannot become one), then, if
        `quiet` or nothing was awaited, for a quiet period."""
        with trio.move_on_after(self.settings.reply_timeout):
            while True:
                current = normalize(bytes(self.buffer))
                if current in accepted:
                    break
                if not any(option.startswith(current) for option in accepted):
                    break
                await self.fill(step)
        if quiet or not self.buffer:
            await self.quiet(step)

    async def settle(self, step: str) -> bytes:
        """Everything the server sent before answering a HELO barrier sent now."""
        token = f"check-barrier-{next(_barrier_ids)}"
        await self.send(f"HELO {token}\n", step)
        marker = f"HELO {token}\n".encode()
        known = self.profile.helo_tail
        with trio.move_on_after(self.settings.reply_timeout):
            while True:
                start = self.buffer.find(marker)
                if start >= 0:
                    end = start + len(marker)
                    if known is not None:
                        end = end + len(known) if len(self.buffer) >= end + len(known) else 0
                    else:
                        for _ in range(3):  # IP, Port, StudentID
                            end = self.buffer.find(b"\n", end) + 1
                            if not end:
                                break
                    if end:
                        arrived = bytes(self.buffer[:start])
                        del self.buffer[:end]
                        return arrived
                await self.fill(f"{step} (waiting for the reply to HELO {token})")
        raise CaseFailed(
            f"{step}: no complete reply to HELO {token} within {self.settings.reply_timeout:g} s",
            arrived=self.buffer,
        )

    async def collect(self, step: str, accepted: Sequence[bytes]) -> bytes:
        """What arrived in answer to the requests sent since the last check."""
        profile = self.profile
        if profile.paced or not profile.barrier:
            await self.gather(step, accepted)
            arrived = bytes(self.buffer)
            self.buffer.clear()
            return arrived
        if not profile.pipelining:
            # The server must have read the last request on its own before the barrier goes.
            await self.gather(step, accepted, quiet=False)
        return await self.settle(step)

    async def expect(
        self,
        step: str,
        *alternatives: bytes,
        dialect: bool = True,
        tolerate: Sequence[tuple[bytes, str]] = (),
        blame: Sequence[tuple[bytes, str]] = (),
    ) -> None:
        """Assert what arrives next is one of `alternatives` and nothing more.

        The first alternative is what docs/protocol.md describes; others are tolerated variants.
        With `dialect`, each is accepted as this server writes it too (`Profile.render`: its
        announcement wording, how it ends a CHAT), for the steps whose subject that is not.
        `tolerate` lists known deviations accepted here, each with its cause; `blame` lists
        known deviations that fail here, so that the failure names its cause. Whatever
        deviation is accepted is recorded as tolerated.
        """
        label = f"{self.label}: {step}"
        canonical = alternatives[0]
        known: dict[bytes, frozenset[str]] = {}
        for option in alternatives:
            rendered, used = self.profile.render(option)
            known.setdefault(rendered, used)
        for option, key in (*tolerate, *blame):
            rendered, used = self.profile.render(option)
            known.setdefault(option, frozenset({key}))
            known.setdefault(rendered, used | {key})
        accepted = [
            option for option, used in known.items() if self._allowed(used, dialect, tolerate)
        ]
        arrived = normalize(await self.collect(label, accepted))
        if not self.profile.paced and self.profile.barrier:
            arrived = await self._complete(label, arrived, accepted, known)
        if arrived in accepted:
            self.tolerated.update(known.get(arrived, frozenset()))
            return
        raise CaseFailed(
            label, expected=canonical, arrived=arrived, causes=known.get(arrived, frozenset())
        )

    @staticmethod
    def _allowed(
        used: frozenset[str], dialect: bool, tolerate: Sequence[tuple[bytes, str]]
    ) -> bool:
        """Whether a form that departs from docs/protocol.md by `used` is accepted."""
        tolerated = {key for _, key in tolerate}
        return all(key in tolerated or (dialect and key in DIALECT) for key in used)

    async def _complete(
        self,
        label: str,
        arrived: bytes,
        accepted: Sequence[bytes],
        known: dict[bytes, frozenset[str]],
    ) -> bytes:
        """After a barrier: if `arrived` is the start of an accepted reply, wait for the rest
        (for `optional_wait` if it is already a complete accepted one) and look again."""
        if arrived in accepted and not _incomplete(arrived, accepted):
            return arrived
        if not _incomplete(arrived, accepted) or (arrived in known and arrived not in accepted):
            return arrived
        if not self.profile.pipelining and arrived not in accepted:
            return arrived  # the rest was awaited before the barrier was sent
        settings = self.settings
        wait = settings.optional_wait if arrived in accepted else settings.reply_timeout
        with trio.move_on_after(wait):
            while _incomplete(arrived + normalize(bytes(self.buffer)), accepted):
                await self.fill(label)
        return arrived + normalize(await self.settle(label))

    async def expect_nothing(self, step: str) -> None:
        """Assert nothing arrived since the last check (as far as the mode can tell)."""
        await self.expect(step, b"")

    async def wait_for(self, marker: bytes, step: str) -> None:
        """Wait until `marker` is among the bytes received (or the reply timeout passes)."""
        with trio.move_on_after(self.settings.reply_timeout):
            while marker not in self.buffer:
                await self.fill(f"{self.label}: {step}")

    async def expect_close(
        self, step: str, expected: bytes, *tolerated: bytes, dialect: bool = True
    ) -> None:
        """Assert `expected` (or one of `tolerated`) arrives, then the server closes.

        A reset after everything expected arrived is tolerated: it loses nothing. With
        `dialect`, each is accepted as this server writes it too.
        """
        accepted = [expected, *tolerated]
        renders: dict[bytes, frozenset[str]] = {}
        for option in accepted:
            rendered, used = self.profile.render(option)
            if used:
                renders.setdefault(rendered, used)
        if dialect:
            accepted += renders
        with trio.move_on_after(self.settings.reply_timeout):
            while not self.eof:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    if normalize(bytes(self.buffer)) in accepted:
                        break
                    raise CaseFailed(
                        f"{self.label}: {step}: connection reset before the close "
                        f"({describe(exc)})",
                        expected=expected,
                        arrived=self.buffer,
                    ) from None
                if not data:
                    self.eof = True
                self.buffer += data
        arrived = normalize(bytes(self.buffer))
        if not self.eof and arrived in accepted:
            raise CaseFailed(
                f"{self.label}: {step}: the server did not close the connection within "
                f"{self.settings.reply_timeout:g} s",
                expected=expected + b"(end of stream)",
                arrived=arrived,
            )
        if arrived not in accepted:
            raise CaseFailed(
                f"{self.label}: {step}",
                expected=expected,
                arrived=arrived,
                causes=renders.get(arrived, frozenset()),
            )
        if arrived in renders and arrived not in (expected, *tolerated):
            self.tolerated.update(renders[arrived])
        self.buffer.clear()

    # -- requests with their expected replies ----------------------------------------------

    async def join(
        self,
        room_name: str,
        client_name: str,
        *,
        request: bytes | None = None,
        bytewise: bool = False,
        strict: bool = False,
        dialect: bool = True,
    ) -> Membership:
        """JOIN `room_name` and check the JOINED reply and the joiner's own announcement.

        `request` replaces the plain JOIN request (to test a spelling of it). Unless `strict`
        (the cases about joining), the announcement may come first; with `dialect`, in the
        server's own wording: a server with one such fault fails only the cases about it.
        """
        step = f"JOIN {room_name!r} as {client_name!r}"
        if request is None:
            request = templates.join_request(room_name, client_name)
        if bytewise:
            await self.send_bytewise(request)
        else:
            await self.send(request, step)
        with trio.move_on_after(self.settings.reply_timeout):
            while not JOINED_PATTERN.search(self.buffer) and b"ERROR_CODE:" not in self.buffer:
                await self.fill(f"{self.label}: {step}")
        membership = parse_joined(bytes(self.buffer), room_name, client_name)
        if membership is None:
            raise CaseFailed(
                f"{self.label}: {step}",
                expected=templates.JOINED.format(
                    room_name=room_name, ip="…", port="…", room_ref="…", join_id="…"
                )
                + "CHAT: …",
                arrived=self.buffer,
            )
        reverse = [(membership.announced + membership.joined, "join-order")]
        await self.expect(
            step,
            membership.joined + membership.announced,
            dialect=dialect,
            tolerate=() if strict else reverse,
            blame=reverse if strict else (),
        )
        return membership

    async def chat(self, membership: Membership, message: str, client_name: str = "") -> bytes:
        """Send a CHAT to the room of `membership`; returns the broadcast it should cause."""
        name = client_name or membership.client_name
        await self.send(
            templates.chat_request(membership.room_ref, membership.join_id, name, message)
        )
        return membership.chat(message, name)

    async def leave(self, membership: Membership) -> None:
        """Send a LEAVE for the room of `membership`."""
        await self.send(
            templates.leave_request(membership.room_ref, membership.join_id, membership.client_name)
        )

    async def expect_left(self, step: str, membership: Membership) -> None:
        """A LEAVE's reply, in a case about something else: LEFT with or without the leaver's
        own announcement."""
        await self.expect(
            step,
            membership.left + membership.left_announcement,
            tolerate=[(membership.left, "no-own-leave")],
        )


def _incomplete(arrived: bytes, alternatives: Sequence[bytes]) -> bool:
    """Whether `arrived` is the start of an alternative, short of its end."""
    return any(len(arrived) < len(option) and option.startswith(arrived) for option in alternatives)


JOINED_PATTERN = re.compile(
    rb"JOINED_CHATROOM: (?P<room>[^\n]*)\nSERVER_IP: (?P<ip>[^\n]*)\nPORT: (?P<port>[0-9]+)\n"
    rb"ROOM_REF: (?P<ref>-?[0-9]+)\nJOIN_ID: (?P<join_id>-?[0-9]+)\n"
)


def parse_joined(arrived: bytes, room_name: str, client_name: str) -> Membership | None:
    """The membership a JOINED reply for `room_name` in `arrived` describes, if there is one."""
    for match in JOINED_PATTERN.finditer(arrived):
        if match["room"] == room_name.encode():
            return Membership(
                room_name,
                client_name,
                match["ip"].decode("utf-8", "replace"),
                int(match["port"]),
                int(match["ref"]),
                int(match["join_id"]),
            )
    return None
