"""TLS: the server context from certificate files, and the handshake on an accepted stream."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from tests.conftest import TLSFiles
from trio_chat.tls import TLSSetupError, accept_tls, server_context

# -- server_context ----------------------------------------------------------------------------


def test_context_loads_a_certificate_and_its_key(tls_files: TLSFiles) -> None:
    """Matching PEM files give a server context that asks for TLS 1.2 at least."""
    context = server_context(tls_files.cert, tls_files.key)
    assert context.minimum_version.name == "TLSv1_2"


def test_context_takes_the_key_from_the_certificate_file(
    tls_files: TLSFiles, tmp_path: Path
) -> None:
    """Without a key file, the key is read from the certificate file (one PEM bundle)."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(tls_files.key.read_bytes() + tls_files.cert.read_bytes())
    server_context(bundle)


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
    assert await client_raw.receive_some(100) == b""  # closed


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
