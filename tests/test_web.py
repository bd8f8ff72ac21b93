"""The web door (trio_chat/web.py): the page over HTTP, and chat members over a WebSocket.

Most tests run a real server on 127.0.0.1 with its web door on a free port and talk to it
through a real WebSocket client (tests/wsclient.py, wsproto over a trio socket) and the
plain TCP test client; timeouts are tested over in-memory streams with a virtual clock.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import h11
import pytest
import trio
import trio.testing

from tests.chatclient import Client
from tests.conftest import TLSFiles
from tests.test_cli import assert_runtime_error, trio_chat_command
from tests.wsclient import Closed, Rejected, WebSocketClient, exchange, fetch
from trio_chat.cli import build_parser
from trio_chat.cli.serve import config_from_args
from trio_chat.config import Config
from trio_chat.limits import AddressSet
from trio_chat.server import ChatServer
from trio_chat.web import Response, WebDoor, origin_allowed, route, static_file

STUDENT_ID = "web-test"


@attrs.frozen
class Running:
    """A server started for one test: its TCP port, its web door's port, and the clients
    opened to it (closed after the test)."""

    server: ChatServer
    tcp_port: int
    web_port: int
    streams: list[trio.abc.AsyncResource] = attrs.field(factory=list)

    async def websocket(self, **kwargs: Any) -> WebSocketClient:
        """A WebSocket client of the web door (`WebSocketClient.connect`'s options)."""
        client = await WebSocketClient.connect(self.web_port, **kwargs)
        self.streams.append(client.stream)
        return client

    async def tcp(self) -> Client:
        client = await Client.connect(self.tcp_port)
        self.streams.append(client.stream)
        return client


Start = Callable[..., Awaitable[Running]]
"""The type of the `start` fixture: ``await start(**config_settings) -> Running``."""


@pytest.fixture
async def start(nursery: trio.Nursery) -> AsyncIterator[Start]:
    """A function that starts a server with a web door on free ports of 127.0.0.1."""
    started: list[Running] = []

    async def start(**settings: Any) -> Running:
        config = Config(host="127.0.0.1", port=0, web_port=0, student_id=STUDENT_ID, **settings)
        server = ChatServer(config)
        listeners = await nursery.start(server.serve)
        web_port = server.ports["web"]
        started.append(Running(server, listeners[0].socket.getsockname()[1], web_port))
        return started[-1]

    yield start
    for running in started:
        for stream in running.streams:
            await trio.aclose_forcefully(stream)


@pytest.fixture
async def running(start: Start) -> Running:
    """A server with default settings and a web door."""
    return await start()


def join_request(room: str, name: str) -> str:
    return f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: {name}\n"


def joined(room: str, port: int, room_ref: int, join_id: int) -> str:
    return (
        f"JOINED_CHATROOM: {room}\nSERVER_IP: 127.0.0.1\nPORT: {port}\n"
        f"ROOM_REF: {room_ref}\nJOIN_ID: {join_id}\n"
    )


def chat(room_ref: int, name: str, message: str) -> str:
    return f"CHAT: {room_ref}\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n"


def chat_request(room_ref: int, join_id: int, name: str, message: str) -> str:
    return f"CHAT: {room_ref}\nJOIN_ID: {join_id}\nCLIENT_NAME: {name}\nMESSAGE: {message}\n\n"


def has_joined(room_ref: int, name: str) -> str:
    return chat(room_ref, name, f"{name} has joined this chatroom.")


def has_left(room_ref: int, name: str) -> str:
    return chat(room_ref, name, f"{name} has left this chatroom.")


# -- the page over HTTP ---------------------------------------------------------------------------


async def test_page_is_served_with_its_hooks(running: Running) -> None:
    """GET / serves the chat page with the message input and the log, and its own files."""
    [(status, headers, body)] = await fetch(running.web_port, "/?name=ann&room=lobby")
    assert status == 200
    assert headers[b"content-type"] == b"text/html; charset=utf-8"
    assert b"connect-src 'self'" in headers[b"content-security-policy"]
    page = body.decode()
    assert '<input id="message"' in page
    assert 'id="log"' in page
    assert 'src="chat.js"' in page
    assert 'href="chat.css"' in page
    assert "http://" not in page  # nothing from elsewhere
    assert "https://" not in page


async def test_keep_alive_serves_the_page_and_its_files_on_one_connection(
    running: Running,
) -> None:
    """A browser loads the page, its script and its style over one connection."""
    responses = await fetch(running.web_port, "/", "/chat.js", "/chat.css")
    assert [(status, headers[b"content-type"]) for status, headers, _ in responses] == [
        (200, b"text/html; charset=utf-8"),
        (200, b"text/javascript; charset=utf-8"),
        (200, b"text/css; charset=utf-8"),
    ]
    assert b"new WebSocket(" in responses[1][2]


async def test_head_gets_the_headers_only(running: Running) -> None:
    """HEAD / answers with the page's length and no body."""
    [(status, headers, body)] = await fetch(running.web_port, "/", method="HEAD")
    [(_, _, page)] = await fetch(running.web_port, "/")
    assert (status, body) == (200, b"")
    assert int(headers[b"content-length"]) == len(page)


async def test_unknown_path_is_404_and_names_the_page(running: Running) -> None:
    """A path that is not the page's gets 404 saying where the page is, and a close."""
    [(status, headers, body)] = await fetch(running.web_port, "/admin")
    assert status == 404
    assert headers[b"connection"] == b"close"
    assert body == b"404 nothing at /admin; the chat page is at /\n"


async def test_other_methods_are_405(running: Running) -> None:
    """Only GET and HEAD are served; others get 405 with an Allow header."""
    [(status, headers, _)] = await fetch(running.web_port, "/", method="DELETE")
    assert (status, headers[b"allow"]) == (405, b"GET, HEAD")


async def test_websocket_path_without_upgrade_is_426(running: Running) -> None:
    """A plain GET of /ws is told to upgrade."""
    [(status, headers, body)] = await fetch(running.web_port, "/ws")
    assert (status, headers[b"upgrade"]) == (426, b"websocket")
    assert b"WebSocket" in body


async def test_malformed_request_is_400(running: Running) -> None:
    """Bytes that are not HTTP get 400 and a close, not a crash."""
    answer = await exchange(running.web_port, b"\x00\x01 nonsense\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    await (await running.websocket()).close()  # the door still works


async def test_oversized_request_head_is_431(start: Start) -> None:
    """A request head still incomplete past web_max_request_head gets 431."""
    running = await start(web_max_request_head=1024)
    head = b"GET / HTTP/1.1\r\nhost: x\r\nx-padding: " + b"a" * 2000
    answer = await exchange(running.web_port, head)
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_bad_websocket_handshakes_get_http_errors(running: Running) -> None:
    """An upgrade without a key gets 400; one of another version gets 426 naming 13."""
    base = "GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n"
    answer = await exchange(running.web_port, (base + "sec-websocket-version: 13\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Sec-WebSocket-Key" in answer
    versioned = (
        base + "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 8\r\n\r\n"
    )
    answer = await exchange(running.web_port, versioned.encode())
    assert answer.startswith(b"HTTP/1.1 426 ")
    assert b"Sec-WebSocket-Version: 13" in answer


async def test_slow_request_head_gets_408_and_idle_connection_closes_quietly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A head still incomplete after web_request_timeout gets 408; a silent connection is
    simply closed."""
    server = ChatServer(Config(web_request_timeout=5.0))
    door = WebDoor(server.config, server.serve_transport)
    async with trio.open_nursery() as tasks:
        for sent, expected in ((b"GET / HTTP/1.1\r\nhost:", b"HTTP/1.1 408 "), (b"", b"")):
            client, server_side = trio.testing.memory_stream_pair()
            tasks.start_soon(door.handle_http, server_side, "memory")
            await client.send_all(sent)
            received = b""
            start = trio.current_time()
            while chunk := await client.receive_some():
                received += chunk
            assert received.startswith(expected)
            assert b"too long" in received if expected else not received
            assert trio.current_time() - start >= 5.0


def test_route_refuses_foreign_origins_unless_listed() -> None:
    """Only the page's own origin may open the WebSocket, plus those configured."""
    own = Config()
    listed = Config(web_origins=("https://chat.example.org",))
    assert origin_allowed("http://localhost:8080", "localhost:8080", own)
    assert not origin_allowed("http://evil.example", "localhost:8080", own)
    assert not origin_allowed("http://localhost:8081", "localhost:8080", own)
    assert origin_allowed("https://chat.example.org", "localhost:8080", listed)
    assert origin_allowed("http://localhost:8080", "localhost:8080", listed)
    assert origin_allowed("http://evil.example", "localhost:8080", Config(web_origins=("*",)))
    with pytest.raises(ValueError, match="scheme://host"):
        Config(web_origins=("chat.example.org",))


def test_route_answers_without_io() -> None:
    """`route` decides from the request alone: the page, or an error that closes."""
    page = route(h11.Request(method="GET", target="/", headers=[("host", "x")]), Config())
    missing = route(h11.Request(method="GET", target="/x", headers=[("host", "x")]), Config())
    assert isinstance(page, Response)
    assert (page.status, page.close) == (200, False)
    assert page.body == static_file("index.html")
    assert isinstance(missing, Response)
    assert (missing.status, missing.close) == (404, True)


# -- the WebSocket: handshake and origins --------------------------------------------------------


async def test_foreign_origin_is_refused_with_403(running: Running) -> None:
    """A page from another site cannot open the WebSocket; the door keeps serving others."""
    with pytest.raises(Rejected) as refused:
        await running.websocket(origin="http://evil.example")
    assert refused.value.status == 403
    assert b"http://evil.example" in refused.value.body
    own = await running.websocket(origin=f"http://127.0.0.1:{running.web_port}")
    await own.send_text("HELO own\n")
    assert (await own.receive()).startswith("HELO own\n")


async def test_listed_origin_and_non_browser_clients_are_accepted(start: Start) -> None:
    """An origin given in web_origins may connect, and so may a client sending none."""
    running = await start(web_origins=("https://chat.example.org",))
    for origin in ("https://chat.example.org", None):
        client = await running.websocket(origin=origin)
        await client.send_text("HELO x\n")
        assert (await client.receive()).startswith("HELO x\n")


# -- the WebSocket: framing ------------------------------------------------------------------------


async def test_helo_reports_the_web_doors_address_and_port(running: Running) -> None:
    """HELO over the WebSocket names the address and port of the web door."""
    client = await running.websocket()
    await client.send_text("HELO hi there\n")
    await client.expect(
        f"HELO hi there\nIP:127.0.0.1\nPort:{running.web_port}\nStudentID:{STUDENT_ID}\n"
    )


async def test_each_reply_and_broadcast_is_one_message(running: Running) -> None:
    """JOIN's reply and its announcement arrive as two messages of exactly the protocol's
    bytes, JOINED naming the web door."""
    client = await running.websocket()
    await client.send_text(join_request("lobby", "ann"))
    await client.expect(joined("lobby", running.web_port, 0, 0), has_joined(0, "ann"))


async def test_several_requests_in_one_message(running: Running) -> None:
    """One message holding several requests gets each reply as its own message, in order."""
    client = await running.websocket()
    text = "HELO a\n" + join_request("lobby", "ann") + chat_request(0, 0, "ann", "hi") + "HELO b\n"
    await client.send_text(text)
    assert (await client.receive()).startswith("HELO a\n")
    await client.expect(joined("lobby", running.web_port, 0, 0), has_joined(0, "ann"))
    await client.expect(chat(0, "ann", "hi"))
    assert (await client.receive()).startswith("HELO b\n")


async def test_one_request_over_several_messages_and_frames(running: Running) -> None:
    """A request split over several messages, or one message over several frames, is read
    as if it had come whole; so is one byte per message."""
    client = await running.websocket()
    request = join_request("lobby", "ann")
    for piece in (request[:5], request[5:23], request[23:]):
        await client.send_text(piece)
    await client.expect(joined("lobby", running.web_port, 0, 0), has_joined(0, "ann"))
    message = chat_request(0, 0, "ann", "framed")
    await client.send_text(message[:10], finished=False)
    await client.send_text(message[10:], finished=True)
    await client.expect(chat(0, "ann", "framed"))
    for char in chat_request(0, 0, "ann", "bytewise"):
        await client.send_text(char)
    await client.expect(chat(0, "ann", "bytewise"))


async def test_tcp_and_websocket_members_share_a_room(running: Running) -> None:
    """A TCP member and a WebSocket member are members alike: one room, one JOIN_ID count,
    each other's messages in one order."""
    tcp = await running.tcp()
    web = await running.websocket()
    await tcp.send(join_request("lobby", "bob"))
    await tcp.expect(joined("lobby", running.tcp_port, 0, 0) + has_joined(0, "bob"))
    await web.send_text(join_request("lobby", "ann"))
    await web.expect(joined("lobby", running.web_port, 0, 1), has_joined(0, "ann"))
    await tcp.expect(has_joined(0, "ann"))
    for turn in range(3):
        await tcp.send(chat_request(0, 0, "bob", f"tcp {turn}"))
        await web.send_text(chat_request(0, 1, "ann", f"web {turn}"))
        # A HELO round trip on each side proves both chats were handled, in this order.
        await tcp.send("HELO sync\n")
        await tcp.expect(chat(0, "bob", f"tcp {turn}") + chat(0, "ann", f"web {turn}"))
        await tcp.receive_until(b"StudentID:" + STUDENT_ID.encode() + b"\n")
        await web.expect(chat(0, "bob", f"tcp {turn}"), chat(0, "ann", f"web {turn}"))
    await web.close()
    await tcp.expect(has_left(0, "ann"))


# -- the WebSocket: rules broken, closes -----------------------------------------------------------


async def left_after(running: Running, break_rule: Any, expected_code: int) -> None:
    """A WebSocket member of a room with a TCP member breaks a rule: it gets `expected_code`,
    the TCP member hears it leave and is served on."""
    tcp = await running.tcp()
    await tcp.send(join_request("room", "bob"))
    await tcp.expect(joined("room", running.tcp_port, 0, 0) + has_joined(0, "bob"))
    web = await running.websocket()
    await web.send_text(join_request("room", "ann"))
    await web.expect(joined("room", running.web_port, 0, 1), has_joined(0, "ann"))
    await tcp.expect(has_joined(0, "ann"))
    await break_rule(web)
    assert await web.expect_close() == expected_code
    await tcp.expect(has_left(0, "ann"))
    await tcp.send("HELO still\n")
    await tcp.expect(f"HELO still\nIP:127.0.0.1\nPort:{running.tcp_port}\nStudentID:{STUDENT_ID}\n")


async def test_binary_message_is_closed_with_1003(running: Running) -> None:
    """A binary message gets close code 1003 (unsupported data); nobody else notices."""

    async def send_binary(web: WebSocketClient) -> None:
        await web.send_bytes(b"HELO binary\n")

    await left_after(running, send_binary, 1003)


async def test_oversized_message_is_closed_with_1009(start: Start) -> None:
    """A message over web_max_message gets close code 1009 (message too big)."""
    running = await start(web_max_message=1024)

    async def send_big(web: WebSocketClient) -> None:
        await web.send_text("HELO " + "x" * 2000 + "\n")

    await left_after(running, send_big, 1009)


async def test_unmasked_frame_is_closed_with_1002(running: Running) -> None:
    """A frame a client may not send (unmasked) gets close code 1002 (protocol error)."""

    async def send_unmasked(web: WebSocketClient) -> None:
        await web.send_raw(b"\x81\x07HELO x\n")

    await left_after(running, send_unmasked, 1002)


async def test_invalid_utf8_is_closed_with_1007(running: Running) -> None:
    """A text message that is not UTF-8 gets close code 1007 (invalid payload)."""

    async def send_invalid(web: WebSocketClient) -> None:
        payload = b"HELO \xff\n"
        await web.send_raw(bytes([0x81, 0x80 | len(payload)]) + bytes(4) + payload)  # mask 0

    await left_after(running, send_invalid, 1007)


async def test_chat_over_the_message_limit_is_error_4_as_over_tcp(start: Start) -> None:
    """The protocol's own limits hold over the WebSocket: error 4, then a normal close."""
    running = await start(max_message=100)
    web = await running.websocket()
    await web.send_text(join_request("r", "ann") + chat_request(0, 0, "ann", "x" * 101))
    await web.expect(joined("r", running.web_port, 0, 0), has_joined(0, "ann"))
    error = await web.receive()
    assert error.startswith("ERROR_CODE: 4\nERROR_DESCRIPTION: ")
    assert await web.expect_close() == 1000


async def test_disconnect_announces_then_closes_with_1000(running: Running) -> None:
    """DISCONNECT: the member hears its own leave announcement, then a normal close."""
    web = await running.websocket()
    await web.send_text(join_request("r", "ann") + "DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: ann\n")
    await web.expect(joined("r", running.web_port, 0, 0), has_joined(0, "ann"), has_left(0, "ann"))
    assert await web.expect_close() == 1000


async def test_ping_gets_pong(running: Running) -> None:
    """A ping is answered with a pong carrying its payload, between chat messages."""
    web = await running.websocket()
    await web.ping(b"are you there")
    await web.send_text("HELO after\n")
    assert (await web.receive()).startswith("HELO after\n")
    assert web.pongs == [b"are you there"]


async def test_kill_service_over_websocket_stops_everything(start: Start) -> None:
    """KILL_SERVICE from a WebSocket stops the service; other WebSocket members are told
    the server is going away (1001) and TCP members see their connection end."""
    running = await start()
    bystander = await running.websocket()
    tcp = await running.tcp()
    await bystander.send_text("HELO first\n")
    assert (await bystander.receive()).startswith("HELO first\n")
    killer = await running.websocket()
    await killer.send_text("KILL_SERVICE\n")
    assert await bystander.expect_close() == 1001
    with pytest.raises(EOFError):
        await tcp.receive_until(b"\n")


async def test_websocket_member_that_does_not_read_is_cut_off(start: Start) -> None:
    """A WebSocket member that stops reading while its room is busy is disconnected once
    max_outbound is queued for it; the room goes on."""
    running = await start(max_outbound=256 * 1024)
    web = await running.websocket()
    await web.send_text(join_request("busy", "slow"))
    await web.expect(joined("busy", running.web_port, 0, 0), has_joined(0, "slow"))
    tcp = await running.tcp()
    await tcp.send(join_request("busy", "fast"))
    await tcp.expect(joined("busy", running.tcp_port, 0, 1) + has_joined(0, "fast"))
    text = "z" * 4000
    left = has_left(0, "slow").encode()
    received = bytearray()

    async def read(done: trio.CancelScope) -> None:
        while left not in received:
            received.extend(await tcp.stream.receive_some(1 << 20))
        done.cancel()

    with trio.fail_after(30):
        async with trio.open_nursery() as flood:
            flood.start_soon(read, flood.cancel_scope)
            while True:  # until the socket buffers are full, then the outbound limit
                await tcp.send(chat_request(0, 1, "fast", text))
    assert left in received


async def test_rule_broken_is_logged_with_the_close_code(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """A rule broken is logged with the peer and the close code."""
    caplog.set_level(logging.INFO, "trio_chat")
    web = await running.websocket()
    await web.send_bytes(b"x")
    assert await web.expect_close() == 1003
    assert any("1003" in record.getMessage() for record in caplog.records)


async def test_websocket_closed_by_client_ends_quietly(running: Running) -> None:
    """A close from the client is answered and ends the membership like end-of-stream."""
    web = await running.websocket()
    await web.send_text(join_request("r", "ann"))
    await web.expect(joined("r", running.web_port, 0, 0), has_joined(0, "ann"))
    await web.send_close()
    with pytest.raises(Closed) as closed:
        await web.receive()
    assert closed.value.code == 1000  # the server's answer echoes the client's code


def test_web_options_reach_the_config() -> None:
    """--web-port, --web-host and a comma-separated --web-origins become Config settings."""
    argv = ["serve", "--port", "7000", "--web-port", "8080", "--web-host", "127.0.0.1"]
    argv += ["--web-origins", "https://chat.example.org, http://localhost:3000"]
    config = config_from_args(build_parser().parse_args(argv))
    assert (config.web_port, config.web_host) == (8080, "127.0.0.1")
    assert config.web_origins == ("https://chat.example.org", "http://localhost:3000")
    assert config_from_args(build_parser().parse_args(argv[:3])).web_port is None


def test_largest_chat_always_fits_in_one_websocket_message() -> None:
    """Unless set, web_max_message follows max_message (through max_line), from the command
    line too, so the largest CHAT the protocol accepts is never refused by the web door."""
    for argv in (["--port", "0"], ["--port", "0", "--max-message", "1000000"]):
        config = config_from_args(build_parser().parse_args(["serve", *argv]))
        request = chat_request(0, 0, "n" * config.max_name, "x" * config.max_message)
        assert len(request.encode()) <= config.web_max_message
    argv = ["serve", "--port", "0", "--max-message", "1000000", "--web-max-message", "9000"]
    assert config_from_args(build_parser().parse_args(argv)).web_max_message == 9000


def test_web_port_in_use_is_one_line_naming_web_port() -> None:
    """A web port another process listens on is reported in one line naming --web-port."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        argv = ("serve", "--host", "127.0.0.1", "--port", "0", "--web-port", port)
        result = trio_chat_command(*argv)
    assert_runtime_error(result, "--web-port", "in use", port)


# -- operator policies apply to the web door as to every door ---------------------------------


async def test_websocket_members_count_against_the_per_address_limit(start: Start) -> None:
    """WebSocket and TCP connections from one address share --max-connections-per-ip; the
    one past it gets error 5 as one message, then a normal close."""
    running = await start(max_connections_per_ip=2, limit_exempt=AddressSet.parse("none"))
    first = await running.websocket()
    await first.send_text("HELO one\n")
    assert (await first.receive()).startswith("HELO one\n")
    tcp = await running.tcp()
    await tcp.send("HELO two\n")
    await tcp.receive_until(b"StudentID:" + STUDENT_ID.encode() + b"\n")
    refused = await running.websocket()
    error = await refused.receive()
    assert error.startswith("ERROR_CODE: 5\nERROR_DESCRIPTION: too many connections from ")
    assert error.count("\n") == 2  # exactly the protocol's two lines
    assert await refused.expect_close() == 1000


async def test_kill_service_over_websocket_honours_kill_allow(start: Start) -> None:
    """From an address outside --kill-allow, KILL_SERVICE over the WebSocket is ignored like
    an unknown line: no reply, the member is served on, the service runs."""
    running = await start(kill_allow=AddressSet.parse("192.0.2.0/24"))
    web = await running.websocket()
    await web.send_text("KILL_SERVICE\nHELO after\n")
    assert (await web.receive()).startswith("HELO after\n")
    assert not running.server.shutdown_scope.cancel_called


# -- the web door over TLS ------------------------------------------------------------------------


async def test_web_tls_serves_the_page_and_secure_websockets(
    start: Start, tls_files: TLSFiles
) -> None:
    """With --web-tls the page comes over HTTPS and members over wss://, their own page's
    https:// origin accepted, HELO and JOINED naming the web door."""
    running = await start(web_tls=True, tls_cert=tls_files.cert, tls_key=tls_files.key)
    tls = tls_files.client_context
    [(status, headers, page)] = await fetch(running.web_port, "/", tls=tls)
    assert (status, headers[b"content-type"]) == (200, b"text/html; charset=utf-8")
    assert b'id="message"' in page
    origin = f"https://127.0.0.1:{running.web_port}"
    web = await running.websocket(tls=tls, origin=origin)
    await web.send_text("HELO secure\n" + join_request("lobby", "ann"))
    await web.expect(
        f"HELO secure\nIP:127.0.0.1\nPort:{running.web_port}\nStudentID:{STUDENT_ID}\n",
        joined("lobby", running.web_port, 0, 0),
        has_joined(0, "ann"),
    )
    await web.send_text("DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: ann\n")
    await web.expect(has_left(0, "ann"))
    assert await web.expect_close() == 1000


async def test_web_tls_counts_a_failed_handshake(start: Start, tls_files: TLSFiles) -> None:
    """A client that speaks plain HTTP to a --web-tls door is closed, and its failed
    handshake is counted as on the TLS port."""
    running = await start(web_tls=True, tls_cert=tls_files.cert, tls_key=tls_files.key)
    stream = await trio.open_tcp_stream("127.0.0.1", running.web_port)
    running.streams.append(stream)
    await stream.send_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
    with trio.fail_after(10):
        while await stream.receive_some():
            pass
    assert running.server.counters.tls_failures == 1


async def test_web_tls_needs_a_web_port_and_a_certificate(tls_files: TLSFiles) -> None:
    """--web-tls without --web-port or without --tls-cert is refused when the settings are
    made, and so is a certificate with neither --tls-port nor --web-tls."""
    with pytest.raises(ValueError, match="--web-tls needs"):
        Config(web_tls=True, web_port=0)
    with pytest.raises(ValueError, match="--web-tls needs"):
        Config(web_tls=True, tls_cert=tls_files.cert)
    with pytest.raises(ValueError, match="--tls-port or --web-tls"):
        Config(tls_cert=tls_files.cert)
