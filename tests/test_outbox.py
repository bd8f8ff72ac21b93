"""The outbox on its own: its byte limit, both ways of writing (the writer task and direct
writes from the flusher), partial writes, shutdown, cancellation and failures."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing

from trio_chat.outbox import Outbox
from trio_chat.transport import StreamTransport, Transport


class Recording:
    """A transport that records what the writer hands it, around a real one (or none)."""

    def __init__(self, inner: Transport | None = None) -> None:
        self.inner = inner
        self.sent: list[list[bytes]] = []
        self.eof = False
        self.local = ("127.0.0.1", 7000)
        self.peer = "recording"

    async def receive(self, max_bytes: int) -> bytes | bytearray:
        """Nothing arrives."""
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(self, messages: Sequence[bytes]) -> None:
        """Record the batch, then pass it on."""
        self.sent.append(list(messages))
        if self.inner is not None:
            await self.inner.send(messages)
        else:
            await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Record the end of output."""
        self.eof = True
        if self.inner is not None:
            await self.inner.send_eof()
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close the inner transport."""
        if self.inner is not None:
            await self.inner.aclose()

    def fileno(self) -> int | None:
        """The inner transport's descriptor, if any."""
        return None if self.inner is None else self.inner.fileno()


def socket_pair(sndbuf: int | None = None) -> tuple[StreamTransport, socket.socket]:
    """A server-side transport over a real socket and the client's end (a blocking-free
    stdlib socket, read directly); `sndbuf` shrinks the server's send buffer."""
    ours, theirs = socket.socketpair()
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    theirs.setblocking(False)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    return StreamTransport(stream, local=("127.0.0.1", 7000), peer="pair"), theirs


def read_available(sock: socket.socket) -> bytes:
    """Everything the peer can read right now, without waiting."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[StreamTransport, socket.socket]]:
    """A transport over a socket pair, closed after the test."""
    transport, theirs = socket_pair()
    yield transport, theirs
    await transport.aclose()
    theirs.close()


# -- the limit ---------------------------------------------------------------------------------


def test_push_past_the_limit_drops_everything_and_reports_once() -> None:
    """A push that would pass the limit drops what is queued, marks the outbox overflowed and
    calls back once with the size refused; later pushes are ignored."""
    calls: list[tuple[int, int]] = []
    box = Outbox(10, lambda outbox, rejected: calls.append((outbox.unsent, rejected)))
    box.push(b"123456")
    box.push(b"7890")
    assert box.unsent == 10
    box.push(b"x")
    assert box.overflowed
    assert calls == [(10, 1)]
    box.push(b"y")
    assert calls == [(10, 1)]


def test_push_after_close_is_dropped() -> None:
    """Nothing is queued once the outbox is closed."""
    box = Outbox(100)
    box.close()
    box.push(b"late")
    assert box.unsent == 0


# -- the writer task (no direct writes) ----------------------------------------------------


async def test_writer_hands_the_transport_each_message_whole_in_one_batch() -> None:
    """Messages pushed while the writer waits reach the transport as one batch of separate
    messages, in push order (a message-framed transport sends each as one message)."""
    transport = Recording()
    box = Outbox(1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run_writer, transport)
        await trio.testing.wait_all_tasks_blocked()
        box.push(b"one\n")
        box.push(b"two\n")
        box.push(b"three\n")
        await trio.testing.wait_all_tasks_blocked()
        assert transport.sent == [[b"one\n", b"two\n", b"three\n"]]
        assert box.unsent == 0
        box.close()
    assert transport.eof


async def test_close_sends_what_is_queued_then_end_of_stream() -> None:
    """After `close` the writer sends what is queued, then EOF, and returns."""
    client, server = trio.testing.memory_stream_pair()
    transport = StreamTransport(server, local=("10.0.0.1", 1), peer="p")
    box = Outbox(1000)
    box.push(b"bye\n")
    box.close()
    await box.run_writer(transport)
    assert await client.receive_some() == b"bye\n"
    assert await client.receive_some() == b""


async def test_abandon_drops_what_is_queued_and_sends_no_eof() -> None:
    """After `abandon` the writer returns without sending anything more, EOF included."""
    transport = Recording()
    box = Outbox(1000)
    box.push(b"dropped\n")
    box.abandon()
    await box.run_writer(transport)
    assert transport.sent == []
    assert not transport.eof


async def test_writer_lets_a_broken_transport_raise() -> None:
    """A send to a client that is gone raises out of the writer."""
    client, server = trio.testing.memory_stream_pair()
    await client.aclose()
    box = Outbox(1000)
    box.push(b"x\n")
    with pytest.raises(trio.BrokenResourceError):
        await box.run_writer(StreamTransport(server, local=("10.0.0.1", 1), peer="p"))


async def test_direct_writes_off_sends_through_the_writer(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    """With `direct=False` even a socket's output goes through the writer task."""
    inner, theirs = pair
    transport = Recording(inner)
    box = Outbox(1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: box.run_writer(transport, direct=False))
        await trio.testing.wait_all_tasks_blocked()
        box.push(b"hello\n")
        await trio.testing.wait_all_tasks_blocked()
        assert transport.sent == [[b"hello\n"]]
        assert read_available(theirs) == b"hello\n"
        box.close()


# -- direct writes -----------------------------------------------------------------------------


async def test_direct_writes_reach_the_socket_without_the_writer(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    """On a socket, pushed bytes are written by the flusher in one write per batch; the
    writer task sends nothing."""
    inner, theirs = pair
    transport = Recording(inner)
    box = Outbox(1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run_writer, transport)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(5):
            box.push(b"message %d\n" % i)
        await trio.testing.wait_all_tasks_blocked()
        assert read_available(theirs) == b"".join(b"message %d\n" % i for i in range(5))
        assert transport.sent == []
        assert box.unsent == 0
        box.close()
    assert transport.eof


async def test_bytes_pushed_before_the_writer_starts_are_written_directly(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    """What was queued before the writer started goes out as soon as it starts."""
    inner, theirs = pair
    box = Outbox(1000)
    box.push(b"early\n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run_writer, inner)
        await trio.testing.wait_all_tasks_blocked()
        assert read_available(theirs) == b"early\n"
        box.close()


async def test_partial_direct_write_leaves_the_rest_to_the_writer_in_order() -> None:
    """When the socket takes only part of a batch, the writer sends the rest once the client
    reads, and what is pushed meanwhile follows it: every byte arrives once, in order."""
    inner, theirs = socket_pair(sndbuf=4096)
    transport = Recording(inner)
    box = Outbox(10 << 20)
    expected = b"".join(b"%06d" % i + b"x" * 1000 + b"\n" for i in range(2000))
    received = bytearray()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.run_writer, transport)
            await trio.testing.wait_all_tasks_blocked()
            for i in range(1000):
                box.push(expected[i * 1007 : (i + 1) * 1007])
            await trio.testing.wait_all_tasks_blocked()
            assert box.unsent > 0  # the socket could not take it all
            assert len(transport.sent) == 1  # the writer took over the rest
            for i in range(1000, 2000):
                box.push(expected[i * 1007 : (i + 1) * 1007])
            while len(received) < len(expected):
                await trio.lowlevel.wait_readable(theirs)
                received += read_available(theirs)
            box.close()
    finally:
        await inner.aclose()
        theirs.close()
    assert bytes(received) == expected
    assert box.unsent == 0


async def test_direct_write_to_a_reset_socket_ends_the_writer() -> None:
    """A direct write that fails (the client reset the connection) leaves the error to the
    writer, whose send raises."""
    inner, theirs = socket_pair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    theirs.close()
    box = Outbox(1000)
    try:
        with pytest.RaisesGroup(trio.BrokenResourceError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(box.run_writer, inner)
                await trio.testing.wait_all_tasks_blocked()
                box.push(b"x\n")
    finally:
        await inner.aclose()


async def test_flusher_survives_an_unexpected_error_in_one_outbox(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug while writing for one client is logged, cuts that client off, and the other
    clients' output still flows: the flusher never takes the run down."""
    bad, bad_peer = socket_pair()
    good, good_peer = socket_pair()
    real_write = os.write
    bad_fd = bad.fileno()

    def write(fd: int, data: bytes) -> int:
        if fd == bad_fd:
            raise RuntimeError("injected")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    cut_off: list[Outbox] = []
    bad_box = Outbox(1000, lambda outbox, rejected: cut_off.append(outbox))
    good_box = Outbox(1000)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bad_box.run_writer, bad)
            nursery.start_soon(good_box.run_writer, good)
            await trio.testing.wait_all_tasks_blocked()
            bad_box.push(b"bad\n")
            good_box.push(b"good 1\n")
            await trio.testing.wait_all_tasks_blocked()
            assert cut_off == [bad_box]
            assert bad_box.failed
            good_box.push(b"good 2\n")
            await trio.testing.wait_all_tasks_blocked()
            assert read_available(good_peer) == b"good 1\ngood 2\n"
            good_box.close()
        assert read_available(bad_peer) == b""
    finally:
        for transport, peer in ((bad, bad_peer), (good, good_peer)):
            await transport.aclose()
            peer.close()
    assert "direct write failed" in caplog.text
    assert any(record.levelno == logging.ERROR and record.exc_info for record in caplog.records)


# -- shutdown and cancellation -------------------------------------------------------------


async def test_finish_writes_what_is_pending_once_and_closes(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    """`finish` writes what is queued at once, without the flusher, and ends the writer with
    no EOF; pushes after it are dropped."""
    inner, theirs = pair
    box = Outbox(1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run_writer, inner)
        await trio.testing.wait_all_tasks_blocked()
        box.push(b"last words\n")
        box.finish()  # before the flusher gets to run
        assert read_available(theirs) == b"last words\n"
        box.push(b"too late\n")
    with pytest.raises(BlockingIOError):  # nothing more, and no end of stream either
        theirs.recv(1)


async def test_finish_writes_nothing_without_a_socket() -> None:
    """Over a transport with no descriptor, `finish` just closes: nothing is sent."""
    transport = Recording()
    box = Outbox(1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.run_writer, transport)
        await trio.testing.wait_all_tasks_blocked()
        box.push(b"x\n")
        box.finish()
    assert transport.sent == []


async def test_cancelled_send_stops_all_further_writing() -> None:
    """A writer cancelled in the middle of a send forgets the descriptor: neither `finish`
    nor the flusher writes after the torn message."""
    inner, theirs = socket_pair(sndbuf=4096)
    box = Outbox(10 << 20)
    big = b"y" * (1 << 20)
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(box.run_writer, inner)
                await trio.testing.wait_all_tasks_blocked()
                box.push(big)  # more than the socket can take: the writer waits to send
                await trio.testing.wait_all_tasks_blocked()
                assert 0 < box.unsent < len(big)
                scope.cancel()
        sent_before = len(read_available(theirs))
        box.push(b"after\n")
        box.finish()
        await trio.testing.wait_all_tasks_blocked()
        assert len(read_available(theirs)) == 0
        assert 0 < sent_before < len(big)
    finally:
        await inner.aclose()
        theirs.close()


async def test_finish_skips_a_socket_the_writer_is_sending_on() -> None:
    """While the writer waits in the middle of a send, `finish` writes nothing, so no bytes
    can land inside the message being sent."""
    inner, theirs = socket_pair(sndbuf=4096)
    box = Outbox(10 << 20)
    big = b"z" * (1 << 20)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.run_writer, inner)
            await trio.testing.wait_all_tasks_blocked()
            box.push(big)
            await trio.testing.wait_all_tasks_blocked()
            box.push(b"queued\n")
            box.finish()
            received = read_available(theirs)
            nursery.cancel_scope.cancel()
        assert set(received) <= set(b"z")
    finally:
        await inner.aclose()
        theirs.close()


async def test_writer_cancelled_while_idle_forgets_the_descriptor(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    """A writer cancelled while it waits for work returns, and later pushes are not written
    to its socket by anyone."""
    inner, theirs = pair
    box = Outbox(1000)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.run_writer, inner)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    box.push(b"orphan\n")
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(BlockingIOError):
        theirs.recv(1)
    assert box.unsent == len(b"orphan\n")


async def test_direct_write_to_a_full_socket_waits_for_the_writer() -> None:
    """When the socket takes nothing at all, the flusher hands the whole batch to the writer,
    which sends it once the client reads."""
    inner, theirs = socket_pair(sndbuf=4096)
    box = Outbox(10 << 20)
    received = bytearray()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(box.run_writer, inner)
            await trio.testing.wait_all_tasks_blocked()
            fd = inner.fileno()
            assert fd is not None
            while True:  # fill the socket buffers without the outbox
                try:
                    os.write(fd, b"f" * 65536)
                except BlockingIOError:
                    break
            box.push(b"!")
            await trio.testing.wait_all_tasks_blocked()
            assert box.unsent == 1
            while not received.endswith(b"!"):
                await trio.lowlevel.wait_readable(theirs)
                received += read_available(theirs)
            box.close()
    finally:
        await inner.aclose()
        theirs.close()
    assert box.unsent == 0
    assert set(received[:-1]) == set(b"f")


# -- a writer started only when needed ---------------------------------------------------------


class Starter:
    """Starts an outbox's writer in a nursery, and counts the starts."""

    def __init__(self, box: Outbox, transport: Transport, nursery: trio.Nursery) -> None:
        self.starts = 0
        self.box, self.transport, self.nursery = box, transport, nursery

    def __call__(self) -> None:
        self.starts += 1
        self.nursery.start_soon(self.box.run_writer, self.transport)


async def test_attached_socket_needs_no_writer_until_it_falls_behind() -> None:
    """With direct writes, an attached outbox starts no writer while the socket takes
    everything; a write the socket cannot take whole starts it, once."""
    inner, theirs = socket_pair(sndbuf=4096)
    box = Outbox(10 << 20)
    received = bytearray()
    try:
        async with trio.open_nursery() as nursery:
            starter = Starter(box, inner, nursery)
            box.attach(inner, direct=True, start_writer=starter)
            box.push(b"small\n")
            await trio.testing.wait_all_tasks_blocked()
            assert read_available(theirs) == b"small\n"
            assert starter.starts == 0
            big = b"b" * (1 << 20)
            box.push(big)
            box.push(b"after\n")
            await trio.testing.wait_all_tasks_blocked()
            assert starter.starts == 1
            while len(received) < len(big) + 6:
                await trio.lowlevel.wait_readable(theirs)
                received += read_available(theirs)
            box.close()
    finally:
        await inner.aclose()
        theirs.close()
    assert bytes(received) == big + b"after\n"
    assert starter.starts == 1


async def test_attached_socket_starts_its_writer_to_end_the_output(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    """`close` starts the writer of an attached outbox, which ends the output with EOF."""
    inner, theirs = pair
    box = Outbox(1000)
    async with trio.open_nursery() as nursery:
        starter = Starter(box, inner, nursery)
        box.attach(inner, direct=True, start_writer=starter)
        box.push(b"bye\n")
        box.close()
    assert starter.starts == 1
    assert read_available(theirs) == b"bye\n"
    assert theirs.recv(1) == b""


async def test_abandoned_outbox_never_starts_its_writer(
    pair: tuple[StreamTransport, socket.socket],
) -> None:
    """An outbox abandoned before it needed a writer (an idle client at shutdown) starts none."""
    inner, _theirs = pair
    box = Outbox(1000)
    async with trio.open_nursery() as nursery:
        starter = Starter(box, inner, nursery)
        box.attach(inner, direct=True, start_writer=starter)
        box.abandon()
    assert starter.starts == 0


async def test_attached_without_direct_writes_starts_the_writer_at_once() -> None:
    """Without direct writes (a TLS or WebSocket transport, or the setting off) the writer
    starts when the outbox is attached, and sends everything."""
    transport = Recording()
    box = Outbox(1000)
    async with trio.open_nursery() as nursery:
        starter = Starter(box, transport, nursery)
        box.push(b"early\n")
        box.attach(transport, direct=True, start_writer=starter)
        assert starter.starts == 1
        await trio.testing.wait_all_tasks_blocked()
        box.push(b"late\n")
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert transport.sent == [[b"early\n"], [b"late\n"]]
    assert transport.eof
