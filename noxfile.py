"""Development sessions. Plain ``nox`` runs tests, lint and typecheck (what CI runs)."""

from __future__ import annotations

import socket
import subprocess
import time

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (pytest-trio), protocol through real sockets and scripts."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and async pitfalls with ruff (lint and format)."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package, tests and this file with mypy --strict."""
    session.install("-e", ".", "nox", *nox.project.dependency_groups(PYPROJECT, "typing"))
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
