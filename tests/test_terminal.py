"""Tests for ``trio-chat client``, driven as a separate process through pipes and tmux."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
import trio

from tests.chatclient import Client
from trio_chat.config import Config
from trio_chat.server import serve
from trio_chat.tools.terminal import Screen, typed_lines

# How long to wait for the client's output or exit. Only reached when something is wrong.
OUTPUT_TIMEOUT = 20.0


def client_command(port: int, *args: str) -> list[str]:
    """The command line of the terminal client connecting to 127.0.0.1:`port`."""
    return [sys.executable, "-m", "trio_chat", "client", "127.0.0.1", str(port), *args]


async def run_script(port: int, script: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the client with `script` as its (non-terminal) stdin until it exits."""
    with trio.fail_after(OUTPUT_TIMEOUT):
        return await trio.run_process(
            client_command(port, *args),
            stdin=script.encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


class Piped:
    """A running client whose stdin and stdout are pipes the test writes and reads."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = b""

    async def type(self, text: str) -> None:
        """Write `text` to the client's stdin."""
        assert self.process.stdin is not None
        await self.process.stdin.send_all(text.encode())

    async def wait_for(self, text: str) -> None:
        """Read the client's stdout until `text` has been printed."""
        assert self.process.stdout is not None
        with trio.fail_after(OUTPUT_TIMEOUT):
            while text.encode() not in self.output:
                data = await self.process.stdout.receive_some()
                assert data, f"stdout ended before {text!r}: {self.output!r}"
                self.output += data


@pytest.fixture
async def piped(server_port: int) -> AsyncIterator[Piped]:
    """The client connected as ann to the test server, with piped stdin and stdout."""
    process = await trio.lowlevel.open_process(
        client_command(server_port, "--name", "ann"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        yield Piped(process)
    finally:
        process.kill()
        await process.wait()


async def test_script_joins_two_rooms_chats_leaves_and_quits(server_port: int) -> None:
    """A scripted session prints each reply and message as `[room] name: text`, in order."""
    script = (
        "/join lobby\n"
        "hello lobby\n"
        "/join games\n"
        "hello games\n"
        "/rooms\n"
        "/switch lobby\n"
        "back in lobby\n"
        "/helo ping\n"
        "/leave games\n"
        "/quit\n"
        "never sent\n"
    )
    result = await run_script(server_port, script, "--name", "ann")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        "* joined lobby (ROOM_REF 0, JOIN_ID 0)",
        "[lobby] ann: ann has joined this chatroom.",
        "[lobby] ann: hello lobby",
        "* joined games (ROOM_REF 1, JOIN_ID 0)",
        "[games] ann: ann has joined this chatroom.",
        "[games] ann: hello games",
        "* lobby: ROOM_REF 0",
        "* games: ROOM_REF 1 (current)",
        "* talking in lobby",
        "[lobby] ann: back in lobby",
        f"* HELO ping (IP 127.0.0.1, port {server_port}, student id trio-chat)",
        "* left games",
        "[games] ann: ann has left this chatroom.",
        "[lobby] ann: ann has left this chatroom.",
    ]


async def test_end_of_input_disconnects_like_quit(server_port: int) -> None:
    """When the script ends without /quit the client still sends DISCONNECT and exits 0."""
    async with await Client.connect(server_port) as bob:
        await bob.send("JOIN_CHATROOM: lobby\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: bob\n")
        await bob.receive_until(b"has joined this chatroom.\n\n")
        result = await run_script(server_port, "hi bob\n", "--name", "ann", "--room", "lobby")
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().splitlines()[-1] == "[lobby] ann: ann has left this chatroom."
        await bob.expect(
            "CHAT: 0\nCLIENT_NAME: ann\nMESSAGE: ann has joined this chatroom.\n\n"
            "CHAT: 0\nCLIENT_NAME: ann\nMESSAGE: hi bob\n\n"
            "CHAT: 0\nCLIENT_NAME: ann\nMESSAGE: ann has left this chatroom.\n\n"
        )


async def test_messages_from_others_print_as_they_arrive(server_port: int, piped: Piped) -> None:
    """Another member's join and chat are printed while the client waits for input."""
    await piped.type("/join lobby\n")
    await piped.wait_for("[lobby] ann: ann has joined this chatroom.\n")
    async with await Client.connect(server_port) as bob:
        await bob.send("JOIN_CHATROOM: lobby\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: bob\n")
        await bob.receive_until(b"bob has joined this chatroom.\n\n")
        await piped.wait_for("[lobby] bob: bob has joined this chatroom.\n")
        await bob.send("CHAT: 0\nJOIN_ID: 1\nCLIENT_NAME: bob\nMESSAGE: hi ann\n\n")
        await piped.wait_for("[lobby] bob: hi ann\n")
        await piped.type("hi bob\n/quit\n")
        await piped.wait_for("[lobby] ann: ann has left this chatroom.\n")
        await bob.expect(
            "CHAT: 0\nCLIENT_NAME: bob\nMESSAGE: hi ann\n\n"
            "CHAT: 0\nCLIENT_NAME: ann\nMESSAGE: hi bob\n\n"
            "CHAT: 0\nCLIENT_NAME: ann\nMESSAGE: ann has left this chatroom.\n\n"
        )
    with trio.fail_after(OUTPUT_TIMEOUT):
        assert await piped.process.wait() == 0


async def test_server_error_is_printed_and_exits_nonzero(nursery: trio.Nursery) -> None:
    """An ERROR_CODE reply (here: over the room limit) is printed and the client exits 1."""
    config = Config(host="127.0.0.1", port=0, max_rooms_per_connection=1)
    listeners = await nursery.start(serve, config)
    port = listeners[0].socket.getsockname()[1]
    result = await run_script(port, "/join a\n/join b\nnever sent\n", "--name", "ann")
    assert result.returncode == 1
    assert result.stderr.decode().startswith("error 5: ")
    assert "never sent" not in result.stdout.decode()
    assert result.stdout.decode().splitlines()[-1] == "[a] ann: ann has joined this chatroom."
    nursery.cancel_scope.cancel()


async def test_local_mistakes_are_reported_and_the_session_goes_on(server_port: int) -> None:
    """Unknown commands, a room not joined and chat before any join print a notice, not exit."""
    script = (
        "talking to no one\n/switch nowhere\n/leave nowhere\n/dance\n/join r\n//slash\n"
        "carriage\rreturn\n"
    )
    result = await run_script(server_port, script, "--name", "ann")
    assert result.returncode == 0
    assert result.stderr.decode().splitlines() == [
        "join a room first: /join ROOM",
        "not in room 'nowhere'; /join it first",
        "not in room 'nowhere'",
        "unknown command /dance (/help lists them)",
        "not sent: a message must not contain a carriage return",
    ]
    assert "[r] ann: /slash" in result.stdout.decode().splitlines()


async def test_unreachable_server_exits_nonzero() -> None:
    """A refused connection is reported and the client exits 1."""
    with trio.socket.socket() as sock:  # bound but not listening: connections are refused
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = await run_script(port, "", "--name", "ann")
    assert result.returncode == 1
    assert result.stderr.decode().startswith(f"cannot connect to 127.0.0.1 port {port}")


# -- on a real terminal ----------------------------------------------------------------------

TMUX = shutil.which("tmux")


class Tmux:
    """A private tmux server (its own socket) running one session."""

    def __init__(self) -> None:
        self.socket = f"trio-chat-test-{uuid.uuid4().hex[:8]}"

    async def run(self, *args: str, check: bool = True) -> str:
        """Run a tmux command against the private server; its stdout."""
        assert TMUX is not None
        result = await trio.run_process(
            [TMUX, "-L", self.socket, "-f", os.devnull, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=check,
        )
        return result.stdout.decode()

    async def screen(self) -> list[str]:
        """The visible lines of the session's pane, trailing blanks removed."""
        lines = (await self.run("capture-pane", "-p", "-t", "chat")).rstrip("\n").splitlines()
        return [line.rstrip() for line in lines]

    async def wait_for_screen(self, *lines: str) -> list[str]:
        """Poll the pane until its last non-blank lines are `lines`; the whole screen."""
        screen: list[str] = []
        with trio.move_on_after(OUTPUT_TIMEOUT):
            while True:
                screen = await self.screen()
                shown = [line for line in screen if line]
                if shown[-len(lines) :] == list(lines):
                    return screen
                await trio.sleep(0.05)  # polling a condition, not ordering by time
        raise AssertionError(f"screen never ended with {lines!r}; it shows {screen!r}")


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
async def test_typing_in_a_terminal_while_messages_arrive(server_port: int) -> None:
    """On a terminal, a message arriving mid-typing prints above the line being typed."""
    tmux = Tmux()
    command = shlex.join(client_command(server_port, "--name", "ann", "--room", "lobby"))
    await tmux.run("new-session", "-d", "-s", "chat", "-x", "100", "-y", "20", command)
    try:
        await tmux.wait_for_screen("[lobby] ann: ann has joined this chatroom.", "[lobby]")
        await tmux.run("send-keys", "-t", "chat", "-l", "hal")
        await tmux.wait_for_screen("[lobby] ann: ann has joined this chatroom.", "[lobby] hal")
        async with await Client.connect(server_port) as bob:
            await bob.send("JOIN_CHATROOM: lobby\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: bob\n")
            await bob.receive_until(b"bob has joined this chatroom.\n\n")
            await bob.send("CHAT: 0\nJOIN_ID: 1\nCLIENT_NAME: bob\nMESSAGE: hi ann\n\n")
            await tmux.wait_for_screen(
                "[lobby] bob: bob has joined this chatroom.", "[lobby] bob: hi ann", "[lobby] hal"
            )
            await tmux.run("send-keys", "-t", "chat", "-l", "lo")
            await tmux.run("send-keys", "-t", "chat", "Enter")
            await tmux.wait_for_screen("[lobby] bob: hi ann", "[lobby] ann: hallo", "[lobby]")
            await tmux.run("send-keys", "-t", "chat", "-l", "/quit")
            await tmux.run("send-keys", "-t", "chat", "Enter")
            await bob.expect(
                "CHAT: 0\nCLIENT_NAME: bob\nMESSAGE: hi ann\n\n"
                "CHAT: 0\nCLIENT_NAME: ann\nMESSAGE: hallo\n\n"
                "CHAT: 0\nCLIENT_NAME: ann\nMESSAGE: ann has left this chatroom.\n\n"
            )
    finally:
        await tmux.run("kill-server", check=False)  # gone already if the client exited


# -- the line editor -------------------------------------------------------------------------


async def _typed(keys: bytes) -> list[str]:
    """The lines `typed_lines` yields for `keys`."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, keys)
    os.close(write_fd)
    out = io.StringIO()
    screen = Screen(out, io.StringIO(), interactive=True)
    try:
        with trio.fail_after(OUTPUT_TIMEOUT):
            lines = [line async for line in typed_lines(read_fd, screen)]
    finally:
        os.close(read_fd)
    return lines


async def test_line_editor_keys() -> None:
    """Backspace, Ctrl-U, Ctrl-W and arrow keys edit the line; Enter submits it."""
    keys = b"helx\x7flo\r" + b"junk\x15kept\r" + b"one two\x17three\r" + b"a\x1b[Db\x1bOAc\r"
    lines = await _typed(keys)
    assert lines == ["hello", "kept", "one three", "abc"]


async def test_line_editor_ctrl_d_ends_input_only_on_an_empty_line() -> None:
    """Ctrl-D with text typed does nothing; on an empty line it ends the input."""
    lines = await _typed(b"x\x04y\r\x04ignored\r")
    assert lines == ["xy"]


def test_screen_prints_above_the_line_being_typed() -> None:
    """A message shown mid-typing wipes the input line, prints, then redraws prompt and text."""
    out = io.StringIO()
    screen = Screen(out, io.StringIO(), interactive=True)
    screen.prompt, screen.typed = "[lobby] ", "hal"
    screen.show("[lobby] bob: hi")
    assert out.getvalue() == "\r\x1b[K[lobby] bob: hi\n\r\x1b[K[lobby] hal"
