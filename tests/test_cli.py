"""The ``trio-chat`` command as a user meets it: real processes, their stderr and exit status.

A usage error is the command's usage line and one line naming the option, status 2; a failure
to start is one line naming the problem and the option, status 1; neither shows a traceback
unless asked for with ``--log-level DEBUG``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import trio_chat
from tests.chatclient import Client, free_port
from tests.redisserver import RedisProcess
from trio_chat.workers import worker_argv

PACKAGE = Path(trio_chat.__file__).parent

# A command that fails at once still starts Python and imports trio: well under a second,
# but a loaded two-core machine can take several.
COMMAND_TIMEOUT = 30.0
# Workers start, connect to Redis and listen; then one KILL_SERVICE ends them all.
WORKERS_TIMEOUT = 30.0

USAGE_ERROR = 2
RUNTIME_ERROR = 1


def trio_chat_command(*argv: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``trio-chat ARGV`` (as ``python -m trio_chat``), after the Python code `prelude`."""
    code = f"{prelude}\nimport runpy\nrunpy.run_module('trio_chat', run_name='__main__')"
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def assert_usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Status 2; the serve command's usage, then one line holding every one of `words`."""
    assert result.returncode == USAGE_ERROR, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("usage: trio-chat serve "), result.stderr
    assert lines[1].startswith("trio-chat serve: error: "), result.stderr
    for word in words:
        assert word in lines[1], result.stderr


def assert_runtime_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Status 1; one line naming the problem, holding every one of `words`, no traceback."""
    assert result.returncode == RUNTIME_ERROR, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trio-chat serve: error: "), result.stderr
    for word in words:
        assert word in lines[0], result.stderr


# -- start-up failures -------------------------------------------------------------------------


def test_port_in_use_is_one_line(busy_port: int) -> None:
    """A port another process listens on is reported in one line naming --port, status 1."""
    result = trio_chat_command("serve", "--host", "127.0.0.1", "--port", str(busy_port))
    assert_runtime_error(result, "--port", "in use", str(busy_port))


def test_host_not_of_this_machine_is_one_line() -> None:
    """An address that belongs to no interface here is reported as such, naming --host."""
    result = trio_chat_command("serve", "--host", "10.255.255.1", "--port", "0")
    assert_runtime_error(result, "--host 10.255.255.1", "not an address of this machine")


def test_unknown_host_is_one_line() -> None:
    """A host name that does not resolve is reported in one line naming --host."""
    result = trio_chat_command("serve", "--host", "nosuchhost.invalid", "--port", "0")
    assert_runtime_error(result, "--host nosuchhost.invalid", "no such host")


def test_debug_log_level_adds_the_traceback(busy_port: int) -> None:
    """With --log-level DEBUG the same failure also shows its traceback, then the message."""
    result = trio_chat_command(
        "serve", "--log-level", "DEBUG", "--host", "127.0.0.1", "--port", str(busy_port)
    )
    assert result.returncode == RUNTIME_ERROR
    assert "Traceback" in result.stderr
    assert "Errno 98" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("trio-chat serve: error: ")


def test_missing_redis_extra_names_the_install_command() -> None:
    """--redis without the redis extra installed says how to install it, in one line."""
    # Importing either of the extra's packages fails, as where it was never installed.
    hide = "import sys\nsys.modules['coredis'] = sys.modules['anyio'] = None"
    result = trio_chat_command(
        "serve", "--port", "0", "--redis", "redis://127.0.0.1:1/0", prelude=hide
    )
    assert_runtime_error(result, "--redis", "pip install 'trio-chat[redis]'")


async def test_a_signal_while_starting_stops_cleanly() -> None:
    """SIGTERM while the server still waits for Redis ends it with status 0 and one log line."""
    with socket.socket() as silent:  # a "Redis" that takes connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        command = [sys.executable, "-m", "trio_chat", "serve", "--port", "0", "--redis", url]
        process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                # Its connection to Redis is the sign that it is starting (signals are
                # handled from before that).
                accepted, _ = await trio.to_thread.run_sync(silent.accept)
                with accepted:
                    process.send_signal(signal.SIGTERM)
                    assert await process.wait() == 0
        finally:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    stderr = (await process.stderr.receive_some()).decode()
    assert "shutting down: SIGTERM while starting" in stderr, stderr
    assert "Traceback" not in stderr, stderr


# -- usage errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["-1", "70000", "65536", "seven"])
def test_ports_outside_the_range_are_refused(port: str) -> None:
    """--port takes 0-65535 only; anything else is a usage error naming --port."""
    result = trio_chat_command("serve", "--port", port)
    assert_usage_error(result, "argument --port:", port)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-line", "0"),
        ("--max-outbound", "-5"),
        ("--disconnect-grace", "0"),
        ("--node-timeout", "-1"),
    ],
)
def test_a_setting_that_must_be_positive_names_its_option(option: str, value: str) -> None:
    """A zero or negative limit is refused under the option's name, not the setting's."""
    result = trio_chat_command("serve", "--port", "0", option, value)
    assert_usage_error(result, f"argument {option}: must be positive")
    assert option.lstrip("-").replace("-", "_") not in result.stderr


def test_workers_without_redis_is_a_usage_error_of_serve() -> None:
    """--workers 2 needs --redis: the error shows serve's usage, not the top-level one."""
    assert_usage_error(trio_chat_command("serve", "--port", "7", "--workers", "2"), "--redis")


def test_an_unknown_option_shows_serve_usage() -> None:
    """A misspelt option is a usage error of serve that names it."""
    assert_usage_error(trio_chat_command("serve", "--port", "0", "--max-lines", "9"), "--max-lines")


def test_a_tool_usage_error_shows_the_tool_usage() -> None:
    """An unknown benchmark scenario is reported with bench's own usage, status 2."""
    result = trio_chat_command("bench", "127.0.0.1", "1", "huge")
    assert result.returncode == USAGE_ERROR
    assert result.stderr.splitlines() == [
        "usage: trio-chat bench HOST PORT [SCENARIO ...] [options]",
        "trio-chat bench: error: unknown scenario 'huge' (known: big, small, paced)",
    ]


def test_a_tool_failure_at_run_time_is_one_line() -> None:
    """A benchmark that cannot reach its server says so in one line, status 1."""
    result = trio_chat_command("bench", "127.0.0.1", str(free_port()), "small")
    assert result.returncode == RUNTIME_ERROR, result.stderr
    assert result.stderr.splitlines() == [
        f"trio-chat bench: small: cannot connect to 127.0.0.1:{result.args[-2]}: Connection refused"
    ]


# -- the command itself ------------------------------------------------------------------------


def test_version_is_the_installed_distribution_version() -> None:
    """--version prints the one version the package and its metadata share."""
    result = trio_chat_command("--version")
    assert result.returncode == 0
    assert result.stdout == f"trio-chat {importlib.metadata.version('trio-chat')}\n"
    assert trio_chat.__version__ == importlib.metadata.version("trio-chat")


def test_serving_imports_no_tool() -> None:
    """Parsing a serve command line imports none of the tools; a tool's command imports it."""
    code = (
        "import sys\nfrom trio_chat.cli import build_parser\n"
        "build_parser(sys.argv[1:]).parse_args(sys.argv[1:])\n"
        "print(sorted(m for m in sys.modules if m.startswith('trio_chat.tools.')))"
    )

    def tools_imported(*argv: str) -> str:
        command = [sys.executable, "-c", code, *argv]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    assert tools_imported("serve", "--port", "0") == "[]\n"
    assert tools_imported("--log-level", "INFO", "client", "h", "1", "--name", "n") == (
        "['trio_chat.tools.terminal']\n"
    )


def test_log_level_before_or_after_the_command_in_any_case() -> None:
    """--log-level is accepted before or after the command, in upper or lower case."""
    from trio_chat.cli import build_parser

    for argv in (["--log-level", "debug", "serve"], ["serve", "--log-level", "DEBUG"]):
        args = build_parser(argv).parse_args([*argv, "--port", "0"])
        assert args.log_level == "DEBUG"
    args = build_parser(["serve"]).parse_args(["serve", "--port", "0"])
    assert args.log_level == "INFO"


def _imports(path: Path) -> set[str]:
    """The trio_chat modules that the module at `path` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("trio_chat")}


def test_no_import_cycles() -> None:
    """No module of the package imports, even for type checking, one that imports it back."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    # A package's own __init__ runs before any of its modules, and ``from package import
    # module`` in that __init__ names the package itself: neither is a cycle.
    graph = {
        name: {
            other
            for other in _imports(path) & modules.keys()
            if other != name and not name.startswith(other + ".")
        }
        for name, path in modules.items()
    }

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for other in sorted(graph[path[-1]]):
            if other == start:
                return [*path, other]
            if other not in path and other > start:
                found = cycle_from(start, [*path, other])
                if found:
                    return found
        return None

    cycles = [cycle for name in sorted(graph) if (cycle := cycle_from(name, [name]))]
    assert not cycles, cycles


def test_worker_command_line_is_the_parent_one_for_one_worker() -> None:
    """A worker runs the parent's arguments without --workers, with reuse-port and its number."""
    argv = ["--log-level", "DEBUG", "serve", "--port", "7", "--workers", "3", "--workers=3"]
    command = worker_argv(argv, 2)
    assert command[:3] == [sys.executable, "-m", "trio_chat"]
    assert command[3:] == [
        *("--log-level", "DEBUG", "serve", "--port", "7"),
        *("--reuse-port", "--worker-index", "2"),
    ]


class TwoWorkers:
    """A running ``serve --workers 2`` through a real Redis, and its stderr so far."""

    def __init__(self, supervisor: trio.Process, port: int) -> None:
        assert supervisor.stderr is not None
        self._stderr = supervisor.stderr
        self._supervisor = supervisor
        self.port = port
        self.log = bytearray()

    async def wait_for(self, marker: bytes, count: int = 2) -> None:
        """Read stderr until `marker` has appeared `count` times (once per worker)."""
        while self.log.count(marker) < count:
            data = await self._stderr.receive_some()
            assert data, self.log.decode()
            self.log += data

    async def kill_service(self) -> None:
        """One KILL_SERVICE stops every worker; the supervisor exits 0 once stderr ends."""
        async with await Client.connect(self.port) as client:
            await client.send("KILL_SERVICE\n")
            while data := await self._stderr.receive_some():
                self.log += data
            assert await self._supervisor.wait() == 0


@asynccontextmanager
async def two_workers(tmp_path: Path, *options: str) -> AsyncIterator[TwoWorkers]:
    """Start ``serve --workers 2 OPTIONS`` on a free port through a Redis of its own."""
    redis = RedisProcess(tmp_path)
    redis.start()
    port = free_port()
    command = [sys.executable, "-m", "trio_chat", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--redis", redis.url, "--workers", "2", *options]
    try:
        supervisor = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE)
        try:
            with trio.fail_after(WORKERS_TIMEOUT):
                yield TwoWorkers(supervisor, port)
        finally:
            supervisor.kill()
            await supervisor.wait()
    finally:
        redis.stop()


async def test_worker_log_lines_carry_the_worker_number(tmp_path: Path) -> None:
    """serve --workers 2: each worker's log lines say which worker wrote them."""
    async with two_workers(tmp_path) as workers:
        await workers.wait_for(b"listening on")
        await workers.kill_service()
    port = workers.port
    text = workers.log.decode()
    for number in (1, 2):
        assert f" worker {number} INFO listening on 127.0.0.1 port {port}" in text, text
        assert f"started worker {number}: process " in text, text
