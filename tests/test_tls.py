"""TLS: the server context from certificate files, and the handshake on an accepted stream."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from tests.chatclient import (
    Client,
    chat_broadcast,
    chat_request,
    disconnect_request,
    helo_reply,
    join_request,
    joined_announcement,
    joined_reply,
    leave_request,
    left_announcement,
    left_reply,
)
from tests.conftest import TLSFiles, connect_tls, running_server
from tests.test_cli import assert_runtime_error, trio_chat_command
from trio_chat.config import Config
from trio_chat.limits import AddressSet
from trio_chat.server import ChatServer
from trio_chat.tls import TLSSetupError, accept_tls, server_context

# -- server_context ----------------------------------------------------------------------------


def test_context_loads_a_certificate_and_its_key(tls_files: TLSFiles) -> None:
    """Matching PEM files give a server context that asks for TLS 1.2 at least."""
    context = server_context(tls_files.cert, tls_files.key)
    assert context.minimum_version.name == "TLSv1_2"


async def test_context_takes_the_key_from_the_certificate_file(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """Without a key file, the key is read from the certificate file (one PEM bundle), and
    a client that trusts the certificate completes a handshake with it."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(tls_files.key.read_bytes() + tls_files.cert.read_bytes())
    server_stream, client_stream = trio.testing.memory_stream_pair()
    server = trio.SSLStream(server_stream, server_context(bundle), server_side=True)
    client = trio.SSLStream(client_stream, tls_files.client_context, server_hostname="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    assert client.getpeercert() is not None


def test_missing_certificate_is_one_line_naming_it(tls_files: TLSFiles, tmp_path: Path) -> None:
    """A certificate file that does not exist is named in a one-line error."""
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(TLSSetupError) as info:
        server_context(missing, tls_files.key)
    assert str(info.value) == f"--tls-cert {missing} does not exist"


def test_directory_as_key_is_one_line(tls_files: TLSFiles, tmp_path: Path) -> None:
    """A key path that is a directory is reported as not a file."""
    with pytest.raises(TLSSetupError) as info:
        server_context(tls_files.cert, tmp_path)
    assert str(info.value) == f"--tls-key {tmp_path} is not a file"


def test_garbage_certificate_is_one_line(tls_files: TLSFiles, tmp_path: Path) -> None:
    """A file that holds no certificate is a one-line error naming both files."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSSetupError) as info:
        server_context(garbage, tls_files.key)
    message = str(info.value)
    assert message.startswith(f"--tls-cert {garbage} and --tls-key {tls_files.key}: not a PEM")
    assert "\n" not in message


def test_key_of_another_certificate_is_refused(
    tls_files: TLSFiles, tls_ca: trustme.CA, tmp_path: Path
) -> None:
    """A key that does not match the certificate is refused at start-up, not at handshake."""
    other_key = tmp_path / "other.pem"
    tls_ca.issue_cert("example.test").private_key_pem.write_to_path(other_key)
    with pytest.raises(TLSSetupError, match="matching private key"):
        server_context(tls_files.cert, other_key)


# -- accept_tls ----------------------------------------------------------------------------


async def test_handshake_gives_an_encrypted_stream(tls_files: TLSFiles) -> None:
    """A client that trusts the certificate talks through the stream `accept_tls` returns."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, tls_files.client_context, server_hostname="localhost")
    context = server_context(tls_files.cert, tls_files.key)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"HELO x\n")
        server = await accept_tls(server_raw, context, handshake_timeout=10, peer="p")
        assert server is not None
        assert await server.receive_some(100) == b"HELO x\n"


async def test_plain_text_on_tls_is_logged_and_closed(
    tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A client speaking the plain protocol to TLS is closed, with one log line saying why."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    context = server_context(tls_files.cert, tls_files.key)
    await client_raw.send_all(b"HELO hello\n")
    with caplog.at_level(logging.INFO, logger="trio_chat"):
        assert await accept_tls(server_raw, context, handshake_timeout=10, peer="1.2.3.4:5") is None
    [record] = caplog.records
    assert record.getMessage().startswith("1.2.3.4:5: TLS handshake failed: ")


async def test_silent_client_times_out(
    tls_files: TLSFiles, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """A client that never sends a ClientHello is closed after the handshake timeout."""
    _client_raw, server_raw = trio.testing.memory_stream_pair()
    context = server_context(tls_files.cert, tls_files.key)
    start = trio.current_time()
    with caplog.at_level(logging.INFO, logger="trio_chat"):
        assert await accept_tls(server_raw, context, handshake_timeout=7, peer="p") is None
    assert trio.current_time() - start == pytest.approx(7)
    assert [r.getMessage() for r in caplog.records] == [
        "p: TLS handshake timed out after 7 s; closing"
    ]


# -- the server over TLS (real sockets) -------------------------------------------------------


def tls_config(files: TLSFiles, **settings: object) -> Config:
    """Settings of a server on 127.0.0.1 with a plain and a TLS port, both free ones."""
    return Config(
        host="127.0.0.1",
        port=0,
        tls_port=0,
        tls_cert=files.cert,
        tls_key=files.key,
        student_id="tls-test",
        **settings,  # type: ignore[arg-type]
    )


async def test_whole_protocol_over_tls(tls_files: TLSFiles) -> None:
    """HELO, JOIN, CHAT, LEAVE and DISCONNECT over TLS, with the TLS port in HELO and JOINED,
    in the same room as a plain client."""
    async with running_server(tls_config(tls_files)) as server:
        tls_port, plain_port = server.ports["tls"], server.ports["plain"]
        assert tls_port != plain_port
        alice = await connect_tls(tls_port, tls_files)
        bob = await Client.connect(plain_port)
        await alice.send("HELO hi\n")
        await alice.expect(helo_reply("hi", "127.0.0.1", tls_port, "tls-test"))
        await alice.send(join_request("lobby", "alice"))
        await alice.expect(joined_reply("lobby", "127.0.0.1", tls_port, 0, 0))
        await alice.expect(joined_announcement(0, "alice"))
        await bob.send(join_request("lobby", "bob"))
        await bob.expect(joined_reply("lobby", "127.0.0.1", plain_port, 0, 1))
        for client in (alice, bob):
            await client.expect(joined_announcement(0, "bob"))
        await alice.send(chat_request(0, 0, "alice", "over TLS\nand two lines"))
        for client in (alice, bob):
            await client.expect(chat_broadcast(0, "alice", "over TLS\nand two lines"))
        await bob.send(chat_request(0, 1, "bob", "in the clear"))
        for client in (alice, bob):
            await client.expect(chat_broadcast(0, "bob", "in the clear"))
        await alice.send(leave_request(0, 0, "alice"))
        await alice.expect(left_reply(0, 0))
        for client in (alice, bob):
            await client.expect(left_announcement(0, "alice"))
        await alice.send(join_request("lobby", "alice"))
        await alice.expect(joined_reply("lobby", "127.0.0.1", tls_port, 0, 0))
        for client in (alice, bob):
            await client.expect(joined_announcement(0, "alice"))
        await alice.send(disconnect_request("alice"))
        for client in (alice, bob):
            await client.expect(left_announcement(0, "alice"))
        await alice.expect_eof()  # a clean TLS close: close_notify, then the end of stream
        await alice.aclose()
        await bob.expect_nothing()
        await bob.aclose()


async def test_kill_service_over_tls_stops_the_server(tls_files: TLSFiles) -> None:
    """KILL_SERVICE over TLS stops the service as it does over plain TCP."""
    async with trio.open_nursery() as nursery:
        server = ChatServer(tls_config(tls_files))
        await nursery.start(server.serve)
        client = await connect_tls(server.ports["tls"], tls_files)
        async with client:
            await client.send("KILL_SERVICE\n")
            await client.expect_eof()
    assert server.shutdown_scope.cancel_called


async def test_plain_text_on_the_tls_port_is_closed_and_nobody_notices(
    tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A plain-text client on the TLS port is closed with one log line; a TLS client in the
    middle of a conversation and new TLS clients are served as before."""
    caplog.set_level(logging.INFO, logger="trio_chat")
    async with running_server(tls_config(tls_files)) as server:
        port = server.ports["tls"]
        alice = await connect_tls(port, tls_files)
        await alice.send(join_request("lobby", "alice"))
        await alice.expect(joined_reply("lobby", "127.0.0.1", port, 0, 0))
        await alice.expect(joined_announcement(0, "alice"))
        async with await Client.connect(port) as plain:
            await plain.send(join_request("lobby", "mallory") + "HELO x\n")
            await plain.expect_eof()
        failures = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
        assert len(failures) == 1
        assert failures[0].startswith("127.0.0.1:")
        assert "TLS handshake failed: " in failures[0]
        assert server.counters.tls_failures == 1
        await alice.send(chat_request(0, 0, "alice", "still here"))
        await alice.expect(chat_broadcast(0, "alice", "still here"))
        async with await connect_tls(port, tls_files) as late:
            await late.barrier()
        await alice.expect_nothing()
        await alice.aclose()


async def test_a_stalled_handshake_holds_up_no_one(tls_files: TLSFiles) -> None:
    """A client that connects to the TLS port and sends nothing does not delay the accept
    loop: clients after it complete their handshake and are served at once."""
    async with running_server(tls_config(tls_files)) as server:
        port = server.ports["tls"]
        async with await trio.open_tcp_stream("127.0.0.1", port):
            client = await connect_tls(port, tls_files)
            await client.barrier()
            await client.aclose()


async def test_bad_certificate_is_refused_before_listening(tmp_path: Path) -> None:
    """A server with a certificate file that does not exist fails at once, in one line."""
    with pytest.raises(TLSSetupError, match="does not exist"):
        ChatServer(Config(tls_port=0, tls_cert=tmp_path / "missing.pem"))


def test_tls_settings_need_each_other(tls_files: TLSFiles) -> None:
    """A TLS port without a certificate, or a certificate without a port, is an error."""
    with pytest.raises(ValueError, match="--tls-cert"):
        Config(tls_port=0)
    with pytest.raises(ValueError, match="--tls-port"):
        Config(tls_cert=tls_files.cert)


# -- the command line -------------------------------------------------------------------------


def test_missing_certificate_is_one_line_at_start_up(tmp_path: Path) -> None:
    """``serve --tls-cert`` naming no file fails at once, in one line naming the option."""
    missing = tmp_path / "missing.pem"
    result = trio_chat_command(
        "serve", "--port", "0", "--tls-port", "0", "--tls-cert", str(missing)
    )
    assert_runtime_error(result, "--tls-cert", str(missing), "does not exist")


def test_tls_port_in_use_names_the_tls_port(tls_files: TLSFiles, busy_port: int) -> None:
    """When the TLS port is taken, the one-line error names --tls-port, not --port."""
    result = trio_chat_command(
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--tls-port",
        str(busy_port),
        "--tls-cert",
        str(tls_files.cert),
        "--tls-key",
        str(tls_files.key),
    )
    assert_runtime_error(result, f"port {busy_port}", "in use", "--tls-port")


async def test_per_address_limit_over_tls(tls_files: TLSFiles) -> None:
    """Past --max-connections-per-ip, a TLS client gets error 5 inside TLS, then a clean end."""
    config = tls_config(
        tls_files, max_connections_per_ip=1, limit_exempt=AddressSet.parse("192.0.2.0/24")
    )
    async with running_server(config) as server:
        port = server.ports["tls"]
        async with await connect_tls(port, tls_files) as first:
            await first.barrier()
            async with await connect_tls(port, tls_files) as second:
                assert "at most 1 per address" in await second.expect_error(5)
                await second.expect_eof()
            await first.barrier()
