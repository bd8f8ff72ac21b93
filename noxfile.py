"""Development sessions. Plain ``nox`` runs tests, lint and typecheck (what CI runs)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")

# Every default session installs against these exact versions: a release of any test tool
# cannot turn the suite red until someone updates this file on purpose.
CONSTRAINTS = ("-c", "constraints.txt")


def _install(
    session: nox.Session, *groups: str, editable: bool = True, pinned: bool = True
) -> None:
    """Install the project (editable) and the named dependency groups into `session`."""
    requirements = [
        dep for group in groups for dep in nox.project.dependency_groups(PYPROJECT, group)
    ]
    project = ["-e", "."] if editable else []
    session.install(*(CONSTRAINTS if pinned else ()), *project, *requirements)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (pytest-trio), protocol through real sockets and scripts."""
    _install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session
def faults(session: nox.Session) -> None:
    """Run the long Redis fault tests (repeated pauses and dropped subscriptions)."""
    _install(session, "test")
    session.run("pytest", "-m", "faults", "tests/test_redis.py", *session.posargs)


@nox.session
def latest(session: nox.Session) -> None:
    """Run the tests on the newest release of every dependency, to learn of breakage early."""
    _install(session, "test", pinned=False)
    session.run("pytest", *session.posargs, env={"HYPOTHESIS_PROFILE": "dev"})


@nox.session
def lock(session: nox.Session) -> None:
    """Rewrite constraints.txt from the newest releases that the default sessions need."""
    _install(session, "test", "lint", "typing", pinned=False)
    session.install("nox")
    frozen = session.run("python", "-m", "pip", "freeze", "--exclude-editable", silent=True)
    assert isinstance(frozen, str)
    path = Path("constraints.txt")
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    pins = sorted(line for line in frozen.splitlines() if line and not line.startswith("#"))
    path.write_text("\n".join([*header, *pins]) + "\n")


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and async pitfalls with ruff (lint and format)."""
    _install(session, "lint", editable=False)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package, tests and this file with mypy --strict."""
    _install(session, "typing")
    session.install(*CONSTRAINTS, "nox")
    session.run("mypy")


@nox.session
def soak(session: nox.Session) -> None:
    """Chat at a fixed rate beside 1000 churning clients for minutes (``-- --minutes N``)."""
    session.install("-e", ".")
    session.run("python", "scripts/soak.py", *session.posargs)


@nox.session
def membench(session: nox.Session) -> None:
    """Measure server memory per connection with 10,000 clients, each in a room."""
    session.install("-e", ".")
    session.run("python", "scripts/membench.py", *session.posargs)


@nox.session
def shutdownbench(session: nox.Session) -> None:
    """Time the shutdown of a server holding 10,000 idle connections (KILL_SERVICE, SIGTERM)."""
    session.install("-e", ".")
    session.run("python", "scripts/shutdownbench.py", *session.posargs)


@nox.session
def webbench(session: nox.Session) -> None:
    """Fan out to WebSocket members; the server's CPU per delivery (``-- --members N``)."""
    session.install("-e", ".")
    session.run("python", "scripts/webbench.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Start a server on a free port and run the fan-out scenarios at it (``-- big --json``)."""
    session.install("-e", ".")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [f"{session.bin}/trio-chat", "--log-level", "WARNING", "serve"]
    server = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)])
    try:
        deadline = time.monotonic() + 30  # a cold start imports trio: seconds at most
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    session.error("the server did not start")
                time.sleep(0.1)
        session.run("trio-chat", "bench", "127.0.0.1", str(port), *session.posargs)
    finally:
        server.terminate()
        server.wait(timeout=10)
