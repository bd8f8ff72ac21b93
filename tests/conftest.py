"""Fixtures shared by the test modules: a server on a real socket and line-protocol clients."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from tests.chatclient import Client
from trio_chat.config import Config
from trio_chat.server import ChatServer, serve


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


@pytest.fixture
def connect_memory(memory_server: ChatServer, nursery: trio.Nursery) -> object:
    """A function that opens a new in-memory connection to `memory_server`."""

    def connect(peer: str = "memory") -> Client:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        nursery.start_soon(
            lambda: memory_server.handle_stream(server_stream, local=("10.1.2.3", 7000), peer=peer)
        )
        return Client(client_stream)

    return connect
