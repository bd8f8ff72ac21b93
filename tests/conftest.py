"""Fixtures shared by the test modules: a server on a real socket and line-protocol clients."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
import trustme
from hypothesis import HealthCheck, Phase, settings

from tests.chatclient import RECEIVE_TIMEOUT, Client
from trio_chat.config import Config
from trio_chat.server import ChatServer, serve

# The default profile makes property tests a fixed set of examples: derandomised, no example
# database to replay (a stored failure would make one red run red forever), no deadline on a
# loaded machine, and no shrinking (a failure is reported as found, with its example, rather
# than after minutes of shrinking). HYPOTHESIS_PROFILE=dev explores new examples, with a
# database and shrinking, when you are hunting bugs on purpose.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
async def server_port(nursery: trio.Nursery) -> AsyncIterator[int]:
    """A trio-chat server on 127.0.0.1 and a free port, stopped after the test."""
    listeners = await nursery.start(serve, Config(host="127.0.0.1", port=0))
    yield listeners[0].socket.getsockname()[1]
    nursery.cancel_scope.cancel()


@pytest.fixture
def memory_server() -> ChatServer:
    """A server with default settings, to be driven over in-memory streams."""
    return ChatServer(Config(student_id="test-id"))


# The address an in-memory client "connected to": what HELO and JOINED report for it.
MEMORY_IP = "10.1.2.3"
MEMORY_PORT = 7000


def open_memory_connection(
    server: ChatServer, nursery: trio.Nursery, peer: str = "memory"
) -> tuple[Client, trio.Event]:
    """Serve a new in-memory connection on `server` in `nursery`.

    Returns the client and an event set once the server has finished with the connection
    (its `handle_stream` returned), for tests of when a connection ends.
    """
    client_stream, server_stream = trio.testing.memory_stream_pair()
    finished = trio.Event()

    async def handle() -> None:
        try:
            await server.handle_stream(server_stream, local=(MEMORY_IP, MEMORY_PORT), peer=peer)
        finally:
            finished.set()

    nursery.start_soon(handle)
    return Client(client_stream), finished


ConnectMemory = Callable[..., Client]
"""The type of the `connect_memory` fixture: ``connect(peer="memory") -> Client``."""


@pytest.fixture
def connect_memory(memory_server: ChatServer, nursery: trio.Nursery) -> ConnectMemory:
    """A function that opens a new in-memory connection to `memory_server`."""

    def connect(peer: str = "memory") -> Client:
        return open_memory_connection(memory_server, nursery, peer)[0]

    return connect


# -- TLS: a certificate authority made for the test run, and a server certificate from it ----


@attrs.frozen
class TLSFiles:
    """A server certificate and key on disk, and a client context that trusts them."""

    cert: Path
    key: Path
    client_context: ssl.SSLContext


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority (made once per run: key generation takes time)."""
    return trustme.CA()


@pytest.fixture
def tls_files(tls_ca: trustme.CA, tmp_path: Path) -> TLSFiles:
    """A certificate for 127.0.0.1 and localhost in PEM files, and a context that trusts it."""
    issued = tls_ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    for blob in issued.cert_chain_pems:
        blob.write_to_path(cert, append=True)
    issued.private_key_pem.write_to_path(key)
    client_context = ssl.create_default_context()
    tls_ca.configure_trust(client_context)
    return TLSFiles(cert, key, client_context)


@asynccontextmanager
async def running_server(config: Config) -> AsyncIterator[ChatServer]:
    """A server listening as `config` says (use host 127.0.0.1 and port 0); its `ports`
    name each listener's port. Stopped at the end of the block."""
    server = ChatServer(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        server.shutdown("test over")


async def connect_tls(port: int, files: TLSFiles, local_address: str | None = None) -> Client:
    """A client that completes a TLS handshake with the server on 127.0.0.1:`port`."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address)
    encrypted = trio.SSLStream(stream, files.client_context, server_hostname="127.0.0.1")
    with trio.fail_after(RECEIVE_TIMEOUT):
        await encrypted.do_handshake()
    return Client(encrypted)


async def connect_from(port: int, local_address: str) -> Client:
    """A plain client whose connection comes from `local_address` (e.g. 127.0.0.2)."""
    return Client(await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address))


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]
