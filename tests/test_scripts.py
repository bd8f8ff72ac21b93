"""`scripts/start.sh` as an operator runs it: a real process on a real port, stopped cleanly."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.chatclient import (
    Client,
    expect_refused,
    free_port,
    helo_reply,
    join_request,
    joined_announcement,
    joined_reply,
)
from tests.wsclient import WebSocketClient, fetch
from trio_chat.config import Config

START = Path(__file__).resolve().parent.parent / "scripts" / "start.sh"

# The first start may have to create the project's .venv and pip-install the package into it
# (a fresh clone): that can take minutes on a slow package index. Only the first start in a
# test run gets this long; once it has succeeded the venv exists and later starts take about
# as long as Python takes to import trio.
FIRST_START_TIMEOUT = 180.0
START_TIMEOUT = 30.0
# docs/protocol.md: KILL_SERVICE stops the service promptly ("well under a second with no backlog").
KILL_EXIT_TIMEOUT = 2.0
# Signals must stop it cleanly too; how fast matters less than that it exits 0.
SIGNAL_EXIT_TIMEOUT = 10.0
# Pause between attempts to connect while the server starts up.
CONNECT_RETRY_DELAY = 0.05

_started_once = False


class ServerProcess:
    """A server started by start.sh, with its port and everything it wrote to stderr."""

    def __init__(self, process: trio.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.stderr = bytearray()
        self.stderr_closed = trio.Event()

    async def collect_stderr(self) -> None:
        assert self.process.stderr is not None
        try:
            while data := await self.process.stderr.receive_some():
                self.stderr += data
        finally:
            self.stderr_closed.set()

    async def wait_until_accepting(self) -> None:
        """Wait until the port accepts connections; fail if the process exits first."""
        while True:
            if self.process.poll() is not None:
                await self.stderr_closed.wait()
                pytest.fail(f"start.sh exited early:\n{self.stderr.decode(errors='replace')}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            except OSError:
                await trio.sleep(CONNECT_RETRY_DELAY)
            else:
                await stream.aclose()
                return

    async def wait_for_exit(self) -> int:
        """The exit status, once the process has exited and its stderr is all read."""
        status = await self.process.wait()
        await self.stderr_closed.wait()
        return status

    def assert_clean_stderr(self) -> None:
        """Nothing in stderr suggests a crash."""
        text = self.stderr.decode(errors="replace")
        assert "Traceback" not in text, text


@asynccontextmanager
async def start_server(
    nursery: trio.Nursery, cwd: Path, *options: str
) -> AsyncIterator[ServerProcess]:
    """Run ``scripts/start.sh PORT [options]`` from `cwd` until it accepts; kill it at the end."""
    global _started_once
    port = free_port()
    process = await trio.lowlevel.open_process(
        [str(START), str(port), *options],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = ServerProcess(process, port)
    try:
        nursery.start_soon(server.collect_stderr)
        with trio.fail_after(START_TIMEOUT if _started_once else FIRST_START_TIMEOUT):
            await server.wait_until_accepting()
        _started_once = True
        yield server
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def test_kill_service_stops_the_process(nursery: trio.Nursery, tmp_path: Path) -> None:
    """After KILL_SERVICE the process exits 0 promptly, every client reads EOF, the port closes."""
    async with start_server(nursery, tmp_path) as server:
        port = server.port
        async with await Client.connect(port) as talker, await Client.connect(port) as member:
            await talker.send("HELO hi\n")
            await talker.expect(helo_reply("hi", "127.0.0.1", port, Config().student_id))
            await member.send(join_request("room", "amy"))
            await member.expect(
                joined_reply("room", "127.0.0.1", port, 0, 0) + joined_announcement(0, "amy")
            )
            await talker.send("KILL_SERVICE\n")
            with trio.fail_after(KILL_EXIT_TIMEOUT):
                assert await server.wait_for_exit() == 0
            await talker.expect_eof()
            await member.expect_eof()
        await expect_refused(port)
        server.assert_clean_stderr()
        assert str(port).encode() in server.stderr, "the server logs where it listens to stderr"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_stops_the_process_cleanly(
    nursery: trio.Nursery, tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM and SIGINT make the server exit 0 without a traceback and close every client."""
    async with start_server(nursery, tmp_path) as server:
        async with await Client.connect(server.port) as member:
            await member.send(join_request("room", "amy"))
            await member.receive_until(b"has joined this chatroom.\n\n")
            server.process.send_signal(signum)
            with trio.fail_after(SIGNAL_EXIT_TIMEOUT):
                assert await server.wait_for_exit() == 0
            await member.expect_eof()
        await expect_refused(server.port)
        server.assert_clean_stderr()


async def test_options_reach_the_server(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Options after PORT are passed to the server: here the advertised IP and student id."""
    options = ("--advertise-ip", "192.0.2.1", "--student-id", "s-123", "--log-level", "DEBUG")
    async with start_server(nursery, tmp_path, *options) as server:
        async with await Client.connect(server.port) as client:
            await client.send("HELO x\n" + join_request("room", "amy"))
            await client.expect(
                helo_reply("x", "192.0.2.1", server.port, "s-123")
                + joined_reply("room", "192.0.2.1", server.port, 0, 0)
                + joined_announcement(0, "amy")
            )
            await client.send("KILL_SERVICE\n")
            with trio.fail_after(KILL_EXIT_TIMEOUT):
                assert await server.wait_for_exit() == 0
        assert b"DEBUG" in server.stderr
        server.assert_clean_stderr()


async def test_web_port_serves_the_page_and_websocket_members(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """``start.sh PORT --web-port WEB`` (the README's browser command) serves the chat page,
    and a WebSocket member chats with a TCP member in one room."""
    web_port = free_port()
    async with start_server(nursery, tmp_path, "--web-port", str(web_port)) as server:
        with trio.fail_after(START_TIMEOUT):
            while True:  # the web door opens just after the TCP port
                try:
                    [(status, _, page)] = await fetch(web_port, "/?name=ann&room=lobby")
                    break
                except OSError:
                    await trio.sleep(CONNECT_RETRY_DELAY)
        assert status == 200
        assert b'id="log"' in page
        web = await WebSocketClient.connect(web_port)
        async with await Client.connect(server.port) as telnet:
            await telnet.send(join_request("lobby", "tom"))
            await telnet.expect(
                joined_reply("lobby", "127.0.0.1", server.port, 0, 0)
                + joined_announcement(0, "tom")
            )
            await web.send_text(join_request("lobby", "ann"))
            await web.expect(
                joined_reply("lobby", "127.0.0.1", web_port, 0, 1), joined_announcement(0, "ann")
            )
            await telnet.expect(joined_announcement(0, "ann"))
            await web.send_text("CHAT: 0\nJOIN_ID: 1\nCLIENT_NAME: ann\nMESSAGE: hi tom\n\n")
            said = "CHAT: 0\nCLIENT_NAME: ann\nMESSAGE: hi tom\n\n"
            await web.expect(said)
            await telnet.expect(said)
            await telnet.send("KILL_SERVICE\n")
            with trio.fail_after(KILL_EXIT_TIMEOUT):
                assert await server.wait_for_exit() == 0
            assert await web.expect_close() == 1001
        await web.stream.aclose()
        server.assert_clean_stderr()


@pytest.mark.parametrize("args", [[], ["not-a-port"]], ids=["no-port", "bad-port"])
def test_start_without_a_port_prints_usage(args: list[str]) -> None:
    """start.sh without a numeric PORT exits 2 with a usage line and starts nothing."""
    result = subprocess.run(
        [str(START), *args], capture_output=True, text=True, timeout=START_TIMEOUT, check=False
    )
    assert result.returncode == 2
    assert "usage" in result.stderr


def test_start_with_a_port_out_of_range_is_a_usage_error() -> None:
    """A PORT past 65535 reaches the server's own check: its usage and the reason, status 2."""
    result = subprocess.run(
        [str(START), "70000"],
        capture_output=True,
        text=True,
        timeout=FIRST_START_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert "trio-chat serve: error: argument --port: must be 0-65535, not 70000" in result.stderr
    assert "Traceback" not in result.stderr
