"""TLS for the chat protocol: the server's context from its certificate files, and the
handshake that turns an accepted stream into an encrypted one (docs/protocol.md section 7).

The bytes inside TLS are the plain protocol's; nothing above the stream knows the difference.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import trio

log = logging.getLogger("trio_chat")


class TLSSetupError(ValueError):
    """The certificate or key cannot be used; the message is one line for the operator."""


def server_context(cert: Path, key: Path | None = None) -> ssl.SSLContext:
    """A server context with the certificate chain in `cert` and its private key in `key`
    (or in `cert` too, when `key` is None). TLS 1.2 at least, the defaults of Python's
    `ssl.create_default_context` otherwise.

    Raises `TLSSetupError` naming the file and what is wrong with it.
    """
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path is not None and not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise TLSSetupError(f"{option} {path} {what}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        files = f"--tls-cert {cert}" + (f" and --tls-key {key}" if key is not None else "")
        raise TLSSetupError(
            f"{files}: not a PEM certificate chain and its matching private key "
            f"({exc.reason or exc.strerror or exc})"
        ) from None
    except OSError as exc:  # unreadable: permissions, a directory, an I/O error
        raise TLSSetupError(
            f"cannot read --tls-cert {cert} or --tls-key {key}: {exc.strerror}"
        ) from None
    return context


async def accept_tls(
    stream: trio.abc.Stream, context: ssl.SSLContext, *, handshake_timeout: float, peer: str
) -> trio.SSLStream[trio.abc.Stream] | None:
    """Complete the server side of a TLS handshake on `stream` within `handshake_timeout` seconds.

    Returns the encrypted stream; or, when the client fails the handshake, talks plain text,
    or is too slow, logs one line and returns None (the caller closes `stream`).
    """
    tls = trio.SSLStream(stream, context, server_side=True)
    reason = f"timed out after {handshake_timeout:g} s"
    with trio.move_on_after(handshake_timeout):
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLError):
                reason = f"failed: {cause.reason or cause.strerror or cause}"
            else:
                reason = f"failed: {cause or 'the client went away'}"
        else:
            return tls
    log.info("%s: TLS handshake %s; closing", peer, reason)
    return None
