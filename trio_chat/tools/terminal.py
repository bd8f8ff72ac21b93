"""``trio-chat client``: a terminal chat client on `trio_chat.client`.

On a terminal it edits the input line itself (cbreak mode), so messages that arrive while you
type are printed above the line you are typing, which is then redrawn. When stdin is not a
terminal it reads one command per line and waits for each command's reply before reading the
next, so a script's output comes out in a fixed order.
"""

from __future__ import annotations

import argparse
import codecs
import os
import stat
import sys
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import ClassVar, TextIO

import trio

from trio_chat.client import (
    ChatClient,
    ChatMessage,
    Error,
    HeloReply,
    Joined,
    Left,
    ReplyError,
    Unrecognized,
)
from trio_chat.protocol import Chat, Disconnect, Helo, Join, Leave

REPLY_WAIT = 10.0
"""Seconds a command that expects a reply (/join, /leave, /helo; in a script, a chat's echo)
waits for it before the next command is read. A server answers in milliseconds; this only
bounds the wait on a server that never answers, after which the client carries on."""
QUIT_WAIT = 5.0
"""Seconds to wait, after /quit sends DISCONNECT, for the server's last announcements and its
closing of the connection (it flushes and closes at once; this only bounds a stuck server)."""
CONNECT_TIMEOUT = 10.0
"""Seconds to wait for the TCP connection to the server to open."""

HELP = """\
commands:
  /join ROOM      join ROOM and talk there
  /leave ROOM     leave ROOM
  /switch ROOM    talk in ROOM (one you have joined)
  /rooms          list the rooms you are in
  /helo TEXT      ask the server to identify itself
  /quit           leave every room and disconnect (also end of input, Ctrl-D)
  /help           this text
anything else is sent to the current room (start it with // to send a leading /)"""

# Exit statuses.
OK = 0
FAILED = 1  # the server sent ERROR_CODE, closed the connection, or could not be reached
INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


class Screen:
    """Where output goes. On a terminal it keeps the input line below everything printed."""

    def __init__(self, out: TextIO, err: TextIO, *, interactive: bool) -> None:
        self.out = out
        self.err = err
        self.interactive = interactive
        self.prompt = "> "
        self.typed = ""

    def show(self, text: str) -> None:
        """Print a line of output (a message or a notice)."""
        self._write(self.out, text)

    def error(self, text: str) -> None:
        """Print a line to stderr."""
        self._write(self.err, text)

    def _write(self, stream: TextIO, text: str) -> None:
        if self.interactive:
            self.out.write("\r\x1b[K")  # wipe the input line, print, then redraw it
            self.out.flush()
        stream.write(text + "\n")
        stream.flush()
        if self.interactive:
            self.redraw()

    def redraw(self) -> None:
        """Draw the prompt and what has been typed so far."""
        self.out.write("\r\x1b[K" + self.prompt + self.typed)
        self.out.flush()


class TerminalClient:
    """One chat session: the rooms joined, the current room, and the replies awaited."""

    def __init__(self, client: ChatClient, name: str, screen: Screen) -> None:
        self.client = client
        self.name = name
        self.screen = screen
        self.rooms: dict[str, Joined] = {}  # by room name, in joining order
        self.room_names: dict[int, str] = {}  # ROOM_REF -> name; refs are never reused
        self.current: str | None = None
        # The replies that commands wait for, in the order the server will send them: each is
        # the event it waits for (a reply class, or the exact echo of a chat) and its signal.
        self._awaiting: deque[tuple[type | ChatMessage, trio.Event]] = deque()
        self.quitting = False

    # -- incoming --------------------------------------------------------------------------

    async def receive_all(self) -> int:
        """Print every event until the connection ends; return the exit status."""
        screen = self.screen
        try:
            async for event in self.client:
                if isinstance(event, Error):
                    screen.error(f"error {event.code}: {event.description}")
                    return FAILED
                self._handle(event)
        except ReplyError as exc:
            screen.error(f"bad reply from the server: {exc}")
            return FAILED
        except (trio.BrokenResourceError, OSError) as exc:
            screen.error(f"connection lost: {exc}")
            return FAILED
        if self.quitting:
            return OK
        screen.error("the server closed the connection")
        return FAILED

    def _handle(self, event: ChatMessage | Joined | Left | HeloReply | Unrecognized) -> None:
        self._show(event)
        if self._awaiting:
            awaited, arrived = self._awaiting[0]
            if awaited == event or (isinstance(awaited, type) and isinstance(event, awaited)):
                self._awaiting.popleft()
                arrived.set()

    def _show(self, event: ChatMessage | Joined | Left | HeloReply | Unrecognized) -> None:
        show = self.screen.show
        if isinstance(event, ChatMessage):
            room = self.room_names.get(event.room_ref, str(event.room_ref))
            show(f"[{room}] {event.client_name}: {event.message}")
        elif isinstance(event, Joined):
            self.rooms[event.room_name] = event
            self.room_names[event.room_ref] = event.room_name
            self._set_current(event.room_name)
            show(f"* joined {event.room_name} (ROOM_REF {event.room_ref}, JOIN_ID {event.join_id})")
        elif isinstance(event, Left):
            room = self.room_names.get(event.room_ref, str(event.room_ref))
            self.rooms.pop(room, None)
            if self.current == room:
                self._set_current(next(reversed(self.rooms), None))
            show(f"* left {room}")
        elif isinstance(event, HeloReply):
            show(
                f"* HELO {event.text} (IP {event.ip}, port {event.port}, "
                f"student id {event.student_id})"
            )
        else:
            show(f"* unrecognised line from the server: {event.line!r}")

    def _set_current(self, room: str | None) -> None:
        self.current = room
        self.screen.prompt = f"[{room}] " if room is not None else "> "

    # -- outgoing --------------------------------------------------------------------------

    async def run_commands(self, lines: AsyncGenerator[str, None]) -> None:
        """Carry out each input line; at end of input, disconnect as /quit does."""
        async with aclosing(lines):
            async for line in lines:
                if await self.command(line):
                    return
        await self._quit()

    async def command(self, line: str) -> bool:
        """Carry out one input line; True once the session is ending."""
        try:
            if not line.startswith("/") or line.startswith("//"):
                await self._say(line[1:] if line.startswith("//") else line)
                return False
            verb, _, argument = line[1:].partition(" ")
            handler = self._commands.get(verb)
            if handler is None:
                self.screen.error(f"unknown command /{verb} (/help lists them)")
                return False
            return await handler(self, argument.strip())
        except ValueError as exc:  # text the protocol cannot carry, such as a carriage return
            self.screen.error(f"not sent: {exc}")
            return False

    async def _say(self, text: str) -> None:
        if not text:
            return
        joined = self.rooms.get(self.current) if self.current is not None else None
        if joined is None:
            self.screen.error("join a room first: /join ROOM")
            return
        request = Chat(joined.room_ref, joined.join_id, self.name, text)
        if self.screen.interactive:
            await self.client.send(request)
        else:  # a script's output keeps its order: wait for the server's echo of the chat
            echo = ChatMessage(joined.room_ref, self.name, text.replace("\r\n", "\n"))
            await self._request_and_wait(request, echo)

    async def _request_and_wait(
        self, request: Join | Leave | Helo | Chat, awaited: type | ChatMessage
    ) -> None:
        arrived = trio.Event()
        self._awaiting.append((awaited, arrived))
        await self.client.send(request)
        with trio.move_on_after(REPLY_WAIT):
            await arrived.wait()
            return
        self._awaiting.remove((awaited, arrived))
        self.screen.error(f"no reply within {REPLY_WAIT:g} s; carrying on")

    async def _join(self, room: str) -> bool:
        if not room:
            self.screen.error("usage: /join ROOM")
        else:
            await self._request_and_wait(Join(room, self.name), Joined)
        return False

    async def _leave(self, room: str) -> bool:
        joined = self.rooms.get(room or self.current or "")
        if joined is None:
            self.screen.error(f"not in room {room!r}" if room else "usage: /leave ROOM")
        else:
            await self._request_and_wait(Leave(joined.room_ref, joined.join_id, self.name), Left)
        return False

    async def _switch(self, room: str) -> bool:
        if room not in self.rooms:
            self.screen.error(f"not in room {room!r}; /join it first")
        else:
            self._set_current(room)
            self.screen.show(f"* talking in {room}")
        return False

    async def _rooms(self, _: str) -> bool:
        if not self.rooms:
            self.screen.show("* in no rooms")
        for name, joined in self.rooms.items():
            mark = " (current)" if name == self.current else ""
            self.screen.show(f"* {name}: ROOM_REF {joined.room_ref}{mark}")
        return False

    async def _helo(self, text: str) -> bool:
        await self._request_and_wait(Helo(text), HeloReply)
        return False

    async def _help(self, _: str) -> bool:
        for line in HELP.splitlines():
            self.screen.show(line)
        return False

    async def _quit_command(self, _: str) -> bool:
        await self._quit()
        return True

    async def _quit(self) -> None:
        self.quitting = True
        await self.client.send(Disconnect(self.name))

    _commands: ClassVar[dict[str, Callable[[TerminalClient, str], Awaitable[bool]]]] = {
        "join": _join,
        "leave": _leave,
        "switch": _switch,
        "rooms": _rooms,
        "helo": _helo,
        "help": _help,
        "quit": _quit_command,
    }


# -- reading stdin ---------------------------------------------------------------------------

READ_SIZE = 4096


async def _read_chunks(fd: int) -> AsyncGenerator[bytes, None]:
    mode = os.fstat(fd).st_mode
    pollable = os.isatty(fd) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
    while True:
        if pollable:  # regular files and /dev/null cannot be polled; they never block
            await trio.lowlevel.wait_readable(fd)
        data = os.read(fd, READ_SIZE)
        if not data:
            return
        yield data


async def piped_lines(fd: int) -> AsyncGenerator[str, None]:
    """The lines of a non-terminal input, without their terminators."""
    pending = b""
    async with aclosing(_read_chunks(fd)) as chunks:
        async for data in chunks:
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.removesuffix(b"\r").decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")


async def typed_lines(fd: int, screen: Screen) -> AsyncGenerator[str, None]:
    """The lines typed on a terminal in cbreak mode, echoed and edited on `screen`.

    Backspace, Ctrl-U (erase line) and Ctrl-W (erase word) edit; Ctrl-D on an empty line ends
    the input; escape sequences (arrow keys) are ignored.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    escape = 0  # 1: after ESC; 2: inside a CSI/SS3 sequence
    screen.redraw()
    async with aclosing(_read_chunks(fd)) as chunks:
        async for data in chunks:
            for char in decoder.decode(data):
                if escape:
                    if escape == 1 and char in "[O":
                        escape = 2
                    elif escape == 1 or "@" <= char <= "~":
                        escape = 0
                    continue
                if char in "\r\n":
                    line, screen.typed = screen.typed, ""
                    screen.redraw()
                    yield line
                elif char in "\x7f\x08":
                    screen.typed = screen.typed[:-1]
                elif char == "\x15":
                    screen.typed = ""
                elif char == "\x17":
                    screen.typed = screen.typed.rstrip()
                    screen.typed = screen.typed[: screen.typed.rfind(" ") + 1]
                elif char == "\x04":
                    if not screen.typed:
                        return
                elif char == "\x1b":
                    escape = 1
                elif char >= " ":
                    screen.typed += char
            screen.redraw()


# -- the command -----------------------------------------------------------------------------


async def run_client(
    host: str, port: int, name: str, room: str | None, *, stdin_fd: int, screen: Screen
) -> int:
    """Connect, optionally join `room`, then chat until /quit or an error; the exit status."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            client = await ChatClient.connect(host, port)
    except (OSError, trio.TooSlowError) as exc:
        screen.error(f"cannot connect to {host} port {port}: {exc or 'timed out'}")
        return FAILED
    session = TerminalClient(client, name, screen)
    status = OK
    async with client, trio.open_nursery() as nursery:

        async def receive() -> None:
            nonlocal status
            status = await session.receive_all()
            nursery.cancel_scope.cancel()

        nursery.start_soon(receive)
        try:
            if room is not None:
                await session.command(f"/join {room}")
            lines = typed_lines(stdin_fd, screen) if screen.interactive else piped_lines(stdin_fd)
            await session.run_commands(lines)
            # The server closes the connection once DISCONNECT is done; do not wait forever.
            nursery.cancel_scope.deadline = trio.current_time() + QUIT_WAIT
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # The receiver reports a lost connection; a failed send only means the same.
            if not session.quitting:
                screen.error(f"connection lost: {exc}")
                status = FAILED
                nursery.cancel_scope.cancel()
    return status


def run(args: argparse.Namespace) -> int:
    """Run ``trio-chat client``; returns the exit status."""
    fd = sys.stdin.fileno()
    interactive = os.isatty(fd)
    screen = Screen(sys.stdout, sys.stderr, interactive=interactive)
    saved = None
    if interactive:
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
    try:
        return trio.run(
            lambda: run_client(
                args.host, args.port, args.name, args.room, stdin_fd=fd, screen=screen
            )
        )
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:
        # Ctrl-C inside the nursery arrives wrapped in an exception group.
        if isinstance(exc, BaseExceptionGroup):
            interrupts, others = exc.split(KeyboardInterrupt)
            if interrupts is None or others is not None:
                raise
        return INTERRUPTED
    finally:
        if saved is not None:
            import termios

            sys.stdout.write("\r\x1b[K")  # leave no half-typed line behind
            sys.stdout.flush()
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``client`` command to the ``trio-chat`` command line."""
    parser = commands.add_parser(
        "client",
        usage="%(prog)s HOST PORT --name NAME [--room ROOM]",
        help="chat from the terminal",
        description="A terminal chat client. Messages print as [room] name: text.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    parser.add_argument("host", help="the server's host name or address")
    parser.add_argument("port", type=int, help="the server's port")
    parser.add_argument("--name", required=True, help="your CLIENT_NAME in every room")
    parser.add_argument("--room", default=None, help="a room to join on connecting")
