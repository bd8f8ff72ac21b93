"""The protocol layer on its own: framing, parsing and encoding, with no I/O at all."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_chat.protocol import (
    NO_SUCH_ID,
    Chat,
    Disconnect,
    ErrorCode,
    Event,
    Helo,
    Join,
    KillService,
    Leave,
    LineBuffer,
    ProtocolError,
    Request,
    RequestParser,
    Unknown,
    encode_chat,
    encode_error,
    encode_helo,
    encode_joined,
    encode_joined_announcement,
    encode_left,
    encode_left_announcement,
)
from trio_chat.reader import NEED_DATA, TURN_OVER, RequestReader, Signal

# Limits large enough that nothing in these tests reaches them unless it means to.
BIG = 1 << 20

# What a parsed stream is compared as: requests as they are, errors by their code.
Parsed = Request | Unknown | tuple[str, ErrorCode]


def _comparable(event: Event) -> Parsed:
    if isinstance(event, ProtocolError):
        return ("error", event.code)
    return event


def parse(chunks: Iterable[bytes], *, max_line: int = BIG, max_message: int = BIG) -> list[Parsed]:
    """Every event the chunks produce, in order, as a client's connection would see them;
    error 4, which ends the connection, is raised."""
    reader = RequestReader(max_line=max_line, max_message=max_message)
    events: list[Parsed] = []
    for chunk in chunks:
        reader.receive_data(chunk)
        while (event := reader.next_event()) is not NEED_DATA:
            if event is TURN_OVER:
                continue
            assert not isinstance(event, Signal)
            if isinstance(event, ProtocolError) and event.closes_connection:
                raise event
            events.append(_comparable(event))
    return events


def parse_lines(chunks: Iterable[bytes]) -> list[Parsed]:
    """Every event the chunks produce through `LineBuffer` and `RequestParser` alone, which
    (unlike a connection's reader) go on parsing after DISCONNECT."""
    buffer = LineBuffer(BIG)
    parser = RequestParser(BIG)
    events: list[Parsed] = []
    for chunk in chunks:
        for line in buffer.feed(chunk):
            events.extend(_comparable(event) for event in parser.feed_line(line))
    return events


def split_at(data: bytes, points: Sequence[int]) -> list[bytes]:
    """`data` cut at each of the (sorted) `points`."""
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


# A byte string holding one of each request, with blank lines between some of them.
SESSION = (
    b"HELO hello there\n"
    b"JOIN_CHATROOM: room one\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: alice\n"
    b"\n\n"
    b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: alice\nMESSAGE: first line\nsecond line\n\n"
    b"LEAVE_CHATROOM: 0\nJOIN_ID: 0\nCLIENT_NAME: alice\n"
    b"\n"
    b"DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: alice\n"
    b"KILL_SERVICE\n"
)
SESSION_EVENTS: list[Parsed] = [
    Helo("hello there"),
    Join("room one", "alice"),
    Chat(0, 0, "alice", "first line\nsecond line"),
    Leave(0, 0, "alice"),
    Disconnect("alice"),
    KillService(),
]


# -- framing and splitting -------------------------------------------------------------------


def test_session_in_one_chunk() -> None:
    """A byte string of several pipelined requests parses into each request, in order."""
    assert parse([SESSION]) == SESSION_EVENTS


@pytest.mark.parametrize("point", range(1, len(SESSION)))
def test_session_split_at_every_point(point: int) -> None:
    """Wherever the bytes are cut in two, the requests parsed are the same."""
    assert parse(split_at(SESSION, [point])) == SESSION_EVENTS


def test_session_one_byte_at_a_time() -> None:
    """Requests arriving one byte per chunk parse the same as in one chunk."""
    assert parse(SESSION[i : i + 1] for i in range(len(SESSION))) == SESSION_EVENTS


def test_session_with_crlf() -> None:
    """CRLF line endings parse the same as LF, even when the CR and LF arrive apart."""
    data = SESSION.replace(b"\n", b"\r\n")
    assert parse([data]) == SESSION_EVENTS
    assert parse(data[i : i + 1] for i in range(len(data))) == SESSION_EVENTS


def test_line_buffer_strips_only_one_trailing_cr() -> None:
    """A line loses its LF and one CR before it; other CRs stay."""
    buffer = LineBuffer(BIG)
    assert list(buffer.feed(b"a\r\r\nb\rc\n\r\n")) == [b"a\r", b"b\rc", b""]


def test_line_buffer_keeps_an_incomplete_line() -> None:
    """Bytes after the last newline wait for the rest of their line."""
    buffer = LineBuffer(BIG)
    assert list(buffer.feed(b"one\ntw")) == [b"one"]
    assert len(buffer) == 2
    assert list(buffer.feed(b"o\n")) == [b"two"]
    assert len(buffer) == 0


def test_blank_lines_between_requests_are_ignored() -> None:
    """Empty and whitespace-only lines between requests produce no events."""
    assert parse([b"\n\r\n   \n\t\nHELO x\n\n\n"]) == [Helo("x")]


# -- field syntax ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"JOIN_CHATROOM:room\nCLIENT_IP:0\nPORT:0\nCLIENT_NAME:bob\n",
        b"JOIN_CHATROOM:  room \nCLIENT_IP:  0 \nPORT:  0 \nCLIENT_NAME:  bob \n",
        b"JOIN_CHATROOM : room\n CLIENT_IP : 0\n\tPORT\t: 0\nCLIENT_NAME\t:\tbob\t\n",
        b"JOIN_CHATROOM: room\r\nCLIENT_IP: 0\r\nPORT: 0\r\nCLIENT_NAME: bob \r\n",
    ],
    ids=["no-space", "extra-spaces", "spaced-keys", "crlf"],
)
def test_spacing_variants(data: bytes) -> None:
    """Whitespace around keys and values is stripped: `KEY:value` and `KEY:  value ` work."""
    assert parse([data]) == [Join("room", "bob")]


def test_value_keeps_inner_spaces_and_colons() -> None:
    """A value is split from its key at the first colon only and keeps its inner spaces."""
    data = b"JOIN_CHATROOM: a: b  c\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: x:y z\n"
    assert parse([data]) == [Join("a: b  c", "x:y z")]


@pytest.mark.parametrize(
    "data",
    [
        b"JOIN_CHATROOM: r\nCLIENT_NAME: n\nPORT: 0\nCLIENT_IP: 0\n",
        b"JOIN_CHATROOM: r\nPORT: 0\nCLIENT_NAME: n\nCLIENT_IP: 0\n",
    ],
)
def test_join_fields_in_any_order(data: bytes) -> None:
    """JOIN's fields may come in any order."""
    assert parse([data]) == [Join("r", "n")]


def test_leave_fields_in_any_order() -> None:
    """LEAVE's fields may come in any order."""
    data = b"LEAVE_CHATROOM: 3\nCLIENT_NAME: n\nJOIN_ID: 4\n"
    assert parse([data]) == [Leave(3, 4, "n")]


def test_disconnect_fields_in_any_order() -> None:
    """DISCONNECT's fields may come in any order."""
    assert parse([b"DISCONNECT: 0\nCLIENT_NAME: n\nPORT: 0\n"]) == [Disconnect("n")]


def test_chat_fields_in_any_order() -> None:
    """CHAT's fields may come in any order, MESSAGE included; the body still ends at a blank."""
    data = b"CHAT: 1\nMESSAGE: hi\nCLIENT_NAME: n\nJOIN_ID: 2\nmore\n\n"
    assert parse([data]) == [Chat(1, 2, "n", "hi\nmore")]


def test_join_and_disconnect_accept_any_ip_and_port() -> None:
    """CLIENT_IP and PORT may be 0, empty or anything else: over TCP they are ignored."""
    data = (
        b"JOIN_CHATROOM: r\nCLIENT_IP:\nPORT: 80\nCLIENT_NAME: n\n"
        b"DISCONNECT: 1.2.3.4\nPORT:\nCLIENT_NAME: n\n"
    )
    assert parse([data]) == [Join("r", "n"), Disconnect("n")]


def test_integers_allow_surrounding_spaces() -> None:
    """Integer fields are read after stripping surrounding whitespace."""
    assert parse([b"LEAVE_CHATROOM:  7 \nJOIN_ID:\t8\nCLIENT_NAME: n\n"]) == [Leave(7, 8, "n")]


def test_helo_text_is_verbatim() -> None:
    """HELO's text is everything after `HELO `, spaces included."""
    assert parse([b"HELO  two  spaces \n", b"HELO\n", b"HELO text\r\n"]) == [
        Helo(" two  spaces "),
        Helo(""),
        Helo("text"),
    ]


def test_kill_service_with_surrounding_spaces() -> None:
    """KILL_SERVICE is recognised with surrounding whitespace and CRLF."""
    assert parse([b"  KILL_SERVICE \r\n"]) == [KillService()]


# -- CHAT bodies -------------------------------------------------------------------------------


def test_multi_line_message() -> None:
    """A CHAT message runs to the first blank line; its lines are joined with a newline."""
    data = b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: one\n two\nthree \n\nHELO after\n"
    assert parse([data]) == [Chat(0, 0, "n", "one\n two\nthree "), Helo("after")]


def test_multi_line_message_with_crlf() -> None:
    """With CRLF endings the message lines lose their CRs and the body ends at CRLF CRLF."""
    data = b"CHAT: 0\r\nJOIN_ID: 0\r\nCLIENT_NAME: n\r\nMESSAGE: one\r\ntwo\r\n\r\n"
    assert parse([data]) == [Chat(0, 0, "n", "one\ntwo")]


def test_message_loses_exactly_one_leading_space() -> None:
    """After `MESSAGE:` one leading space is removed and the rest of the text kept as is."""
    data = (
        b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE:   indented  \n\n"
        b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE:tight\n\n"
    )
    assert parse([data]) == [Chat(0, 0, "n", "  indented  "), Chat(0, 0, "n", "tight")]


def test_message_lines_look_like_requests() -> None:
    """Inside a CHAT body, lines that look like requests are message text."""
    data = b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: a\nKILL_SERVICE\nHELO x\n\n"
    assert parse([data]) == [Chat(0, 0, "n", "a\nKILL_SERVICE\nHELO x")]


def test_empty_message() -> None:
    """A CHAT with an empty message is a CHAT with empty text."""
    assert parse([b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE:\n\n"]) == [Chat(0, 0, "n", "")]


# -- limits ----------------------------------------------------------------------------------


def test_line_at_the_limit_is_accepted() -> None:
    """A line of exactly max_line bytes, with LF or CRLF, is accepted."""
    buffer = LineBuffer(8)
    assert list(buffer.feed(b"12345678\n12345678\r\n")) == [b"12345678", b"12345678"]


def test_line_at_the_limit_with_cr_arriving_before_lf() -> None:
    """A line of max_line bytes whose CR arrives before its LF is not taken for too long."""
    buffer = LineBuffer(8)
    assert list(buffer.feed(b"12345678\r")) == []
    assert list(buffer.feed(b"\n")) == [b"12345678"]


def test_oversize_line_raises_error_4() -> None:
    """A complete line over max_line bytes raises ProtocolError with code TOO_LARGE."""
    buffer = LineBuffer(8)
    with pytest.raises(ProtocolError) as info:
        list(buffer.feed(b"123456789\n"))
    assert info.value.code is ErrorCode.TOO_LARGE
    assert info.value.closes_connection


def test_oversize_line_raises_before_its_newline() -> None:
    """An incomplete line is rejected as soon as it cannot fit, so the buffer stays bounded."""
    buffer = LineBuffer(8)
    held: list[int] = []
    code = None
    try:
        for _ in range(100):
            list(buffer.feed(b"x"))
            held.append(len(buffer))
    except ProtocolError as error:
        code = error.code
    assert code is ErrorCode.TOO_LARGE
    assert max(held) <= 9  # the line so far, and room for the CR that may end it


def test_oversize_line_after_good_lines_in_one_chunk() -> None:
    """The lines before an oversize line in the same chunk are yielded before it raises."""
    buffer = LineBuffer(8)
    lines = buffer.feed(b"ok\nalso ok\n" + b"x" * 20 + b"\n")
    assert next(lines) == b"ok"
    assert next(lines) == b"also ok"
    with pytest.raises(ProtocolError) as info:
        next(lines)
    assert info.value.code is ErrorCode.TOO_LARGE


def test_message_at_the_limit_is_accepted() -> None:
    """A CHAT message of exactly max_message bytes (joining newlines counted) is accepted."""
    data = b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: 1234\n12345\n\n"
    assert parse([data], max_message=10) == [Chat(0, 0, "n", "1234\n12345")]


@pytest.mark.parametrize(
    "message",
    [b"12345678901", b"12345\n12345", b"1\n2\n3\n4\n5\n6"],
    ids=["one-line", "two-lines", "many-lines"],
)
def test_oversize_message_raises_error_4(message: bytes) -> None:
    """A CHAT message over max_message bytes raises ProtocolError with code TOO_LARGE."""
    data = b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: " + message + b"\n\n"
    with pytest.raises(ProtocolError) as info:
        parse([data], max_message=10)
    assert info.value.code is ErrorCode.TOO_LARGE


def test_oversize_message_counts_utf8_bytes() -> None:
    """The message limit counts encoded bytes, not characters."""
    data = "CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: ééééééé\n\n".encode()  # 14 bytes
    with pytest.raises(ProtocolError) as info:
        parse([data], max_message=10)
    assert info.value.code is ErrorCode.TOO_LARGE


# -- malformed requests ------------------------------------------------------------------------

MALFORMED = ("error", ErrorCode.MALFORMED)


@pytest.mark.parametrize(
    "data",
    [
        b"JOIN_CHATROOM: r\nCLIENT_IP: 0\nPORT: 0\n\n",
        b"JOIN_CHATROOM: r\nCLIENT_IP: 0\nCLIENT_NAME: n\n\n",
        b"LEAVE_CHATROOM: 0\nCLIENT_NAME: n\n\n",
        b"LEAVE_CHATROOM: 0\nJOIN_ID: 0\n\n",
        b"DISCONNECT: 0\nPORT: 0\n\n",
        b"CHAT: 0\nJOIN_ID: 0\nMESSAGE: hi\n\n",
        b"CHAT: 0\nCLIENT_NAME: n\nMESSAGE: hi\n\n",
        b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\n\n",
    ],
    ids=[
        "join-no-name",
        "join-no-port",
        "leave-no-join-id",
        "leave-no-name",
        "disconnect-no-name",
        "chat-no-name",
        "chat-no-join-id",
        "chat-no-message",
    ],
)
def test_missing_field_is_error_1(data: bytes) -> None:
    """A request missing a required field (ended by a blank line) is a code 1 error event."""
    assert parse([data]) == [MALFORMED]


def test_repeated_field_is_error_1() -> None:
    """A field given twice ends the request as malformed; the repeated line is read afresh."""
    data = b"LEAVE_CHATROOM: 0\nJOIN_ID: 0\nJOIN_ID: 0\nCLIENT_NAME: n\n"
    assert parse([data]) == [MALFORMED, Unknown("JOIN_ID: 0"), Unknown("CLIENT_NAME: n")]


@pytest.mark.parametrize(
    "data",
    [
        b"LEAVE_CHATROOM: zero\nJOIN_ID: 0\nCLIENT_NAME: n\n",
        b"LEAVE_CHATROOM: 0\nJOIN_ID: +1\nCLIENT_NAME: n\n",
        b"LEAVE_CHATROOM: 1.5\nJOIN_ID: 0\nCLIENT_NAME: n\n",
        b"LEAVE_CHATROOM:\nJOIN_ID: 0\nCLIENT_NAME: n\n",
        b"LEAVE_CHATROOM: -\nJOIN_ID: 0\nCLIENT_NAME: n\n",
        b"LEAVE_CHATROOM: 1 2\nJOIN_ID: 0\nCLIENT_NAME: n\n",
        b"CHAT: x\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: hi\n\n",
        b"CHAT: 0\nJOIN_ID: 0x1\nCLIENT_NAME: n\nMESSAGE: hi\n\n",
        b"CHAT: --1\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: hi\n\n",
        "CHAT: \u0661\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: hi\n\n".encode(),
    ],
    ids=[
        "word",
        "plus",
        "fraction",
        "empty",
        "sign-only",
        "two",
        "chat-ref",
        "hex",
        "minus-minus",
        "arabic-digit",
    ],
)
def test_non_integer_field_is_error_1(data: bytes) -> None:
    """A ROOM_REF or JOIN_ID that is not an optional '-' and decimal digits is error 1, and
    the next request is read as usual."""
    assert parse([data + b"HELO x\n"]) == [MALFORMED, Helo("x")]


@pytest.mark.parametrize(
    ("written", "value"),
    [
        ("0", 0),
        ("007", 7),
        ("-0", 0),
        ("-1", -1),
        ("999999999999999999", 10**18 - 1),
        ("-999999999999999999", -(10**18) + 1),
        ("0000000000000000000000000000042", 42),
        ("1000000000000000000", NO_SUCH_ID),
        ("-1000000000000000000", NO_SUCH_ID),
        ("1000000000000000000000000000000", NO_SUCH_ID),
        ("9" * 60_000, NO_SUCH_ID),
    ],
)
def test_integers_of_any_length_and_sign(written: str, value: int) -> None:
    """Any optional '-' and digits is an integer: up to 18 significant digits it is read as
    its value, beyond that as NO_SUCH_ID (no identifier is that large); LEAVE keeps the
    spelling to echo it."""
    chat = f"CHAT: {written}\nJOIN_ID: {written}\nCLIENT_NAME: n\nMESSAGE: m\n\n"
    leave = f"LEAVE_CHATROOM: {written}\nJOIN_ID:  {written} \nCLIENT_NAME: n\n"
    chat_event, leave_event = parse([(chat + leave).encode()])
    assert chat_event == Chat(value, value, "n", "m")
    assert leave_event == Leave(value, value, "n")
    assert isinstance(leave_event, Leave)
    assert leave_event.written == (written, written)


@pytest.mark.parametrize(
    "data",
    [
        b"JOIN_CHATROOM: \nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: n\n",
        b"JOIN_CHATROOM: r\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME:   \n",
        b"LEAVE_CHATROOM: 0\nJOIN_ID: 0\nCLIENT_NAME:\n",
        b"DISCONNECT: 0\nPORT: 0\nCLIENT_NAME:\n",
        b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME:\nMESSAGE: hi\n\n",
    ],
    ids=["join-room", "join-name", "leave-name", "disconnect-name", "chat-name"],
)
def test_empty_name_is_error_1(data: bytes) -> None:
    """An empty room name or client name is a code 1 error event."""
    assert parse([data]) == [MALFORMED]


@pytest.mark.parametrize(
    "bad",
    [
        b"JOIN_CHATROOM: r\nCLIENT_NAME: n\n",
        b"LEAVE_CHATROOM: 0\n",
        b"DISCONNECT: 0\nPORT: 0\n",
        b"CHAT: 0\nJOIN_ID: 0\n",
        b"LEAVE_CHATROOM: x\nJOIN_ID: 0\nCLIENT_NAME: n\n",
    ],
    ids=["join", "leave", "disconnect", "chat", "non-integer"],
)
def test_malformed_request_does_not_swallow_the_next(bad: bytes) -> None:
    """A malformed request followed at once by a good one: an error, then the good request."""
    good = b"JOIN_CHATROOM: r\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: n\nHELO x\n"
    assert parse([bad + good]) == [MALFORMED, Join("r", "n"), Helo("x")]


def test_malformed_request_ended_by_kill_service() -> None:
    """KILL_SERVICE arriving in place of a missing field ends the request and is honoured."""
    assert parse([b"DISCONNECT: 0\nKILL_SERVICE\n"]) == [MALFORMED, KillService()]


def test_parser_recovers_after_oversize_message() -> None:
    """After an oversize CHAT message, a fresh parser state reads the next request."""
    parser = RequestParser(4)
    for line in (b"CHAT: 0", b"JOIN_ID: 0", b"CLIENT_NAME: n"):
        assert parser.feed_line(line) == ()
    with pytest.raises(ProtocolError):
        parser.feed_line(b"MESSAGE: too long")
    assert parser.feed_line(b"HELO x") == (Helo("x"),)


# -- unknown lines and bad bytes -------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "hello",
        "HELOx",
        "helo x",
        "kill_service",
        "KILL_SERVICE now",
        "join_chatroom: r",
        "JOIN_ID: 0",
        "MESSAGE: hi",
        "CLIENT_NAME: n",
        "JOINED_CHATROOM: r",
        ":",
    ],
)
def test_unknown_first_line(line: str) -> None:
    """A first line naming no request is an Unknown event carrying the line."""
    assert parse([line.encode() + b"\n"]) == [Unknown(line)]


def test_unknown_line_between_requests() -> None:
    """An unknown line does not disturb the requests around it."""
    assert parse([b"HELO a\nwhatever\nHELO b\n"]) == [Helo("a"), Unknown("whatever"), Helo("b")]


def test_invalid_utf8_is_replaced() -> None:
    """Invalid UTF-8 is decoded with replacement characters, in names and in messages."""
    data = (
        b"\xff\xfe\n"
        b"JOIN_CHATROOM: r\xc3\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: \x80n\n"
        b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: a\xff\n\xfeb\n\n"
    )
    assert parse([data]) == [
        Unknown("\ufffd\ufffd"),
        Join("r\ufffd", "\ufffdn"),
        Chat(0, 0, "n", "a\ufffd\n\ufffdb"),
    ]


@settings(deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10))
def test_arbitrary_bytes_never_raise(data: bytes, points: list[int]) -> None:
    """Any bytes at all, cut anywhere, give events and never raise (within the limits)."""
    cuts = sorted({p for p in points if p <= len(data)})
    parse(split_at(data, cuts))


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_over_small_limits_raise_only_error_4(data: bytes) -> None:
    """Any bytes over tight limits either parse or raise ProtocolError with code TOO_LARGE."""
    codes = set()
    try:
        parse([data], max_line=16, max_message=16)
    except ProtocolError as error:
        codes.add(error.code)
    assert codes <= {ErrorCode.TOO_LARGE}


# -- round trips -----------------------------------------------------------------------------

# Text a client can put on one line: no line breaks, no surrogates (which UTF-8 cannot encode).
line_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)
names = line_text.map(str.strip).filter(bool)
ids = st.integers(0, 10**18 - 1)
# A message's first line (after `MESSAGE: `) may be anything; later lines must not be empty,
# since an empty line ends the message.
messages = st.builds(
    lambda first, rest: "\n".join([first, *rest]),
    line_text,
    st.lists(line_text.filter(bool), max_size=3),
)
requests: st.SearchStrategy[Request] = st.one_of(
    st.builds(Helo, line_text),
    st.just(KillService()),
    st.builds(Join, names, names),
    st.builds(Leave, ids, ids, names),
    st.builds(Disconnect, names),
    st.builds(Chat, ids, ids, names, messages),
)
spacings = st.sampled_from(["{}: {}", "{}:{}", "{}:  {} ", " {} :\t{}"])
ip_or_port = st.sampled_from(["0", "", "127.0.0.1", "8080"])


@st.composite
def wire_text(draw: st.DrawFn, request: Request) -> list[str]:
    """The lines a client could send for `request`: any field order, any spacing."""

    def field(key: str, value: object) -> str:
        return draw(spacings).format(key, value)

    if isinstance(request, Helo):
        return [f"HELO {request.text}"]
    if isinstance(request, KillService):
        return [draw(st.sampled_from(["KILL_SERVICE", " KILL_SERVICE "]))]
    if isinstance(request, Join):
        first = field("JOIN_CHATROOM", request.room_name)
        fields = [
            field("CLIENT_IP", draw(ip_or_port)),
            field("PORT", draw(ip_or_port)),
            field("CLIENT_NAME", request.client_name),
        ]
        return [first, *draw(st.permutations(fields))]
    if isinstance(request, Leave):
        first = field("LEAVE_CHATROOM", request.room_ref)
        fields = [field("JOIN_ID", request.join_id), field("CLIENT_NAME", request.client_name)]
        return [first, *draw(st.permutations(fields))]
    if isinstance(request, Disconnect):
        first = field("DISCONNECT", draw(ip_or_port))
        fields = [field("PORT", draw(ip_or_port)), field("CLIENT_NAME", request.client_name)]
        return [first, *draw(st.permutations(fields))]
    first_line, *more_lines = request.message.split("\n")
    first = field("CHAT", request.room_ref)
    fields = [
        field("JOIN_ID", request.join_id),
        field("CLIENT_NAME", request.client_name),
        f"MESSAGE: {first_line}",
    ]
    return [first, *draw(st.permutations(fields)), *more_lines, ""]


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[Request], bytes]:
    """Some requests and the bytes a client sends for them, blank lines and CRLFs mixed in."""
    drawn = draw(st.lists(requests, max_size=8))
    lines: list[str] = []
    for request in drawn:
        lines.extend([""] * draw(st.integers(0, 2)))
        lines.extend(draw(wire_text(request)))
    data = b"".join(line.encode() + draw(st.sampled_from([b"\n", b"\r\n"])) for line in lines)
    return drawn, data


@settings(deadline=None)
@given(sessions(), st.data())
def test_round_trip(session: tuple[list[Request], bytes], data: st.DataObject) -> None:
    """Requests rendered as a client sends them and cut into random chunks parse back equal."""
    sent, wire = session
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=20).map(sorted))
    assert parse_lines(split_at(wire, points)) == sent


@settings(deadline=None)
@given(sessions(), st.data())
def test_reader_round_trip(session: tuple[list[Request], bytes], data: st.DataObject) -> None:
    """Through the reader, requests cut into random chunks parse back equal up to the first
    DISCONNECT, and after it only KILL_SERVICE counts."""
    sent, wire = session
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=20).map(sorted))
    cut = next((i + 1 for i, r in enumerate(sent) if isinstance(r, Disconnect)), len(sent))
    expected = sent[:cut] + [r for r in sent[cut:] if isinstance(r, KillService)]
    assert parse(split_at(wire, points)) == expected


# Lines that name no request: they start with a lower-case letter, and keys are upper-case.
unknown_lines = line_text.map(lambda text: "x" + text)


@st.composite
def truncated(draw: st.DrawFn) -> list[str]:
    """The lines of a multi-line request with its last field left out, then a blank line."""
    request = draw(requests.filter(lambda r: not isinstance(r, Helo | KillService)))
    lines = draw(wire_text(request))
    field_count = {Join: 4, Leave: 3, Disconnect: 3, Chat: 4}[type(request)]
    cut = draw(st.integers(1, field_count - 1))
    return [*lines[:cut], ""]


@st.composite
def mixed_sessions(draw: st.DrawFn) -> tuple[list[Parsed], bytes]:
    """Good requests, unknown lines and requests missing a field, as a client sends them."""
    expected: list[Parsed] = []
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["request", "unknown", "truncated"]))
        if kind == "request":
            request = draw(requests)
            expected.append(request)
            lines.extend(draw(wire_text(request)))
        elif kind == "unknown":
            line = draw(unknown_lines)
            expected.append(Unknown(line))
            lines.append(line)
        else:
            expected.append(MALFORMED)
            lines.extend(draw(truncated()))
    data = b"".join(line.encode() + draw(st.sampled_from([b"\n", b"\r\n"])) for line in lines)
    return expected, data


@settings(deadline=None)
@given(mixed_sessions(), st.data())
def test_round_trip_with_bad_input(
    session: tuple[list[Parsed], bytes], data: st.DataObject
) -> None:
    """Unknown lines and malformed requests among good ones each give their one event, in order."""
    expected, wire = session
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=20).map(sorted))
    assert parse_lines(split_at(wire, points)) == expected


# -- encoders --------------------------------------------------------------------------------


def test_encode_joined() -> None:
    """JOINED_CHATROOM carries the room name, server address, ROOM_REF and JOIN_ID."""
    assert encode_joined("room1", "10.0.0.1", 7000, 3, 4) == (
        b"JOINED_CHATROOM: room1\nSERVER_IP: 10.0.0.1\nPORT: 7000\nROOM_REF: 3\nJOIN_ID: 4\n"
    )


def test_encode_left() -> None:
    """LEFT_CHATROOM carries the ROOM_REF and JOIN_ID."""
    assert encode_left(3, 4) == b"LEFT_CHATROOM: 3\nJOIN_ID: 4\n"


def test_encode_chat() -> None:
    """A CHAT broadcast ends with a blank line and keeps a multi-line message as it is."""
    assert encode_chat(2, "bob", "hi\nthere") == (
        b"CHAT: 2\nCLIENT_NAME: bob\nMESSAGE: hi\nthere\n\n"
    )


def test_encode_chat_utf8() -> None:
    """A CHAT broadcast is UTF-8."""
    assert encode_chat(0, "zoë", "café") == "CHAT: 0\nCLIENT_NAME: zoë\nMESSAGE: café\n\n".encode()


def test_encode_announcements() -> None:
    """Join and leave announcements are CHATs from the client, in the protocol's words."""
    assert encode_joined_announcement(1, "amy") == (
        b"CHAT: 1\nCLIENT_NAME: amy\nMESSAGE: amy has joined this chatroom.\n\n"
    )
    assert encode_left_announcement(1, "amy") == (
        b"CHAT: 1\nCLIENT_NAME: amy\nMESSAGE: amy has left this chatroom.\n\n"
    )


def test_encode_error() -> None:
    """ERROR_CODE carries the numeric code and the description."""
    error = ProtocolError(ErrorCode.NO_SUCH_ROOM, "no room has ROOM_REF 9")
    assert encode_error(error) == b"ERROR_CODE: 2\nERROR_DESCRIPTION: no room has ROOM_REF 9\n"


@given(st.sampled_from(ErrorCode), st.text(st.characters(codec="utf-8")))
def test_encode_error_is_always_two_lines(code: ErrorCode, description: str) -> None:
    """Whatever the description holds, an error reply is exactly two lines."""
    data = encode_error(ProtocolError(code, description))
    assert data.startswith(f"ERROR_CODE: {int(code)}\nERROR_DESCRIPTION: ".encode())
    assert data.count(b"\n") == 2
    assert data.endswith(b"\n")
    assert b"\r" not in data


def test_encode_helo() -> None:
    """The HELO reply echoes the text and gives IP, Port and StudentID with no spaces."""
    assert encode_helo(" two  words ", "10.1.2.3", 7000, "id-1") == (
        b"HELO  two  words \nIP:10.1.2.3\nPort:7000\nStudentID:id-1\n"
    )


# -- the message limit as relayed ------------------------------------------------------------


def test_message_limit_counts_the_newline_after_an_empty_first_line() -> None:
    """A message whose first line is empty is refused once its text is over the limit."""
    data = b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE:\n1234\n\n"  # text "\n1234": 5 bytes
    with pytest.raises(ProtocolError) as info:
        parse([data], max_message=4)
    assert info.value.code is ErrorCode.TOO_LARGE


def test_message_limit_counts_continuation_lines_as_relayed() -> None:
    """Invalid UTF-8 in a later message line counts as the replacement text that is relayed."""
    data = b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: a\n\xff\xff\n\n"  # "a\n\ufffd\ufffd": 8
    with pytest.raises(ProtocolError) as info:
        parse([data], max_message=4)
    assert info.value.code is ErrorCode.TOO_LARGE


def test_message_lines_after_the_first_are_held_to_the_message_limit_only() -> None:
    """A later line of a message may be longer than max_line: only max_message applies."""
    data = b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: a\n" + b"b" * 50 + b"\n\n"
    assert parse([data], max_line=20, max_message=60) == [Chat(0, 0, "n", "a\n" + "b" * 50)]


message_line_bytes = st.binary(max_size=12).filter(lambda line: b"\n" not in line)


@settings(deadline=None)
@given(message_line_bytes, st.lists(message_line_bytes.filter(bool), max_size=4))
def test_accepted_message_never_exceeds_the_limit(first: bytes, more: list[bytes]) -> None:
    """Whatever its bytes, a CHAT message that is accepted is at most max_message as relayed."""
    limit = 8
    data = b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: " + b"\n".join([first, *more])
    try:
        events = parse([data + b"\n\n"], max_message=limit)
    except ProtocolError as error:
        events = [("error", error.code)]
    for event in events:
        if isinstance(event, Chat):
            assert len(event.message.encode()) <= limit, event.message


# -- name limits ------------------------------------------------------------------------------


def test_names_up_to_max_name_bytes_are_accepted_and_longer_ones_refused() -> None:
    """Room and client names of max_name bytes parse; one byte more is error 1."""
    parser = RequestParser(65536, max_name=4)
    ok = b"JOIN_CHATROOM: abcd\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: \xc3\xa9\xc3\xa9\n"
    events = [event for line in ok.split(b"\n") for event in parser.feed_line(line)]
    assert events == [Join("abcd", "éé")]
    for room, name in ((b"abcde", b"n"), (b"r", b"\xc3\xa9\xc3\xa9x")):
        request = b"JOIN_CHATROOM: %s\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: %s\n" % (room, name)
        (error,) = [event for line in request.split(b"\n") for event in parser.feed_line(line)]
        assert isinstance(error, ProtocolError)
        assert error.code == ErrorCode.MALFORMED
        assert "longer than 4 bytes" in error.description


# -- the plain CHAT shortcut ------------------------------------------------------------------


def line_by_line(data: bytes, max_message: int, max_name: int) -> list[object]:
    """The events a fresh parser gives for `data` fed one line at a time."""
    parser = RequestParser(max_message, max_name)
    return [event for line in data.split(b"\n") for event in parser.feed_line(line)]


@given(
    ref=st.from_regex(rb"\A[0-9]{1,20}\Z"),
    join_id=st.from_regex(rb"\A[0-9]{1,20}\Z"),
    name=st.binary(max_size=12) | st.from_regex(rb"\A[!-~][ -~]{0,10}[!-~]\Z"),
    message=st.binary(max_size=24),
    after=st.binary(max_size=12),
    max_message=st.integers(1, 30),
    max_name=st.integers(1, 12),
)
def test_plain_chat_gives_what_line_by_line_parsing_gives(
    ref: bytes,
    join_id: bytes,
    name: bytes,
    message: bytes,
    after: bytes,
    max_message: int,
    max_name: int,
) -> None:
    """Whenever the one-step CHAT shortcut takes a request, the result is exactly the Chat
    that feeding its lines to the parser gives; whatever it declines, the lines still parse."""
    request = b"CHAT: %s\nJOIN_ID: %s\nCLIENT_NAME: %s\nMESSAGE: %s\n\n" % (
        ref,
        join_id,
        name,
        message,
    )
    data = request + after
    found = RequestParser(max_message, max_name).plain_chat(data, 0, 65536)
    if found is None:
        return
    chat, end = found
    assert line_by_line(data[:end], max_message, max_name) == [chat]


# -- the request reader: turns and the closing state -------------------------------------------


def drain(reader: RequestReader) -> list[Parsed | Signal]:
    """What the reader gives until it needs data, turn signals included."""
    out: list[Parsed | Signal] = []
    while (event := reader.next_event()) is not NEED_DATA:
        out.append(event if isinstance(event, Signal) else _comparable(event))
    return out


def test_reader_gives_a_turn_every_lines_per_turn_lines() -> None:
    """After `lines_per_turn` lines the reader signals TURN_OVER, then carries on where it
    stopped; a plain CHAT counts as its four lines."""
    reader = RequestReader(max_line=BIG, max_message=BIG, lines_per_turn=4)
    chat = b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: m\n\n"
    reader.receive_data(b"HELO 1\nHELO 2\nHELO 3\nHELO 4\nHELO 5\n" + chat + b"HELO 6\n")
    assert drain(reader) == [
        Helo("1"),
        Helo("2"),
        Helo("3"),
        Helo("4"),
        TURN_OVER,
        Helo("5"),
        Chat(0, 0, "n", "m"),
        TURN_OVER,
        Helo("6"),
    ]


def test_reader_counts_turns_afresh_for_each_receive() -> None:
    """The line count starts again with every `receive_data`: a receive is a turn of its own."""
    reader = RequestReader(max_line=BIG, max_message=BIG, lines_per_turn=2)
    reader.receive_data(b"HELO 1\n")
    assert drain(reader) == [Helo("1")]
    reader.receive_data(b"HELO 2\nHELO 3\n")
    assert drain(reader) == [Helo("2"), Helo("3")]


def test_reader_after_disconnect_gives_only_kill_service() -> None:
    """After DISCONNECT the reader is closing: requests are dropped, KILL_SERVICE still counts."""
    reader = RequestReader(max_line=BIG, max_message=BIG)
    reader.receive_data(
        b"DISCONNECT: 0\nPORT: 0\nCLIENT_NAME: n\nHELO x\n"
        b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: m\n\n KILL_SERVICE \r\nHELO y\n"
    )
    assert not reader.closing
    assert drain(reader) == [Disconnect("n"), KillService()]
    assert reader.closing


def test_reader_after_error_4_drops_input_and_gives_only_kill_service() -> None:
    """An oversize line gives error 4 once; then input is dropped (oversize lines silently)
    and only KILL_SERVICE counts."""
    reader = RequestReader(max_line=16, max_message=BIG)
    reader.receive_data(b"HELO 123456789abcdef\nHELO x\n" + b"y" * 20 + b"\nKILL_SERVICE\n")
    assert drain(reader) == [("error", ErrorCode.TOO_LARGE), KillService()]
    assert reader.closing


def test_reader_error_4_before_the_newline_arrives() -> None:
    """A line refused before its end leaves the reader closing; its rest is dropped."""
    reader = RequestReader(max_line=16, max_message=BIG)
    reader.receive_data(b"x" * 20)
    assert drain(reader) == [("error", ErrorCode.TOO_LARGE)]
    reader.receive_data(b"xxxx\nHELO x\nKILL_SERVICE\n")
    assert drain(reader) == [KillService()]


def test_reader_oversize_message_is_error_4_then_closing() -> None:
    """A CHAT message over the limit gives error 4 and nothing after it but KILL_SERVICE."""
    reader = RequestReader(max_line=BIG, max_message=4)
    reader.receive_data(b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: 12345\n\nHELO x\n")
    assert drain(reader) == [("error", ErrorCode.TOO_LARGE)]


def test_reader_gives_both_events_of_a_line_that_ends_a_malformed_request() -> None:
    """A line that ends a malformed request and starts another gives the error, then its
    own event, one call each."""
    reader = RequestReader(max_line=BIG, max_message=BIG)
    reader.receive_data(b"LEAVE_CHATROOM: 0\nHELO x\n")
    assert drain(reader) == [MALFORMED, Helo("x")]


def test_reader_takes_a_long_line_one_byte_at_a_time() -> None:
    """A line of the maximum length fed one byte per receive is one line, not refused."""
    reader = RequestReader(max_line=65536, max_message=BIG)
    line = b"HELO " + b"x" * (65536 - 5)
    for i in range(len(line)):
        reader.receive_data(line[i : i + 1])
        assert reader.next_event() is NEED_DATA
    reader.receive_data(b"\r\n")
    assert drain(reader) == [Helo("x" * (65536 - 5))]


PLAIN_AND_NOT = (
    b"CHAT: 0\nJOIN_ID: 0\nCLIENT_NAME: n\nMESSAGE: one\n\n"
    b"CHAT: 1\r\nJOIN_ID: 2\r\nCLIENT_NAME: n\r\nMESSAGE: two\r\nlines\r\n\r\n"
    b"CHAT: 3\nJOIN_ID: 4\nCLIENT_NAME: n\nMESSAGE: three\n\n"
)
PLAIN_AND_NOT_EVENTS = [
    Chat(0, 0, "n", "one"),
    Chat(1, 2, "n", "two\nlines"),
    Chat(3, 4, "n", "three"),
]


@pytest.mark.parametrize("point", range(1, len(PLAIN_AND_NOT)))
def test_reader_plain_and_other_chats_split_at_every_point(point: int) -> None:
    """Plain CHATs (the shortcut) around one that is not parse the same wherever cut."""
    assert parse(split_at(PLAIN_AND_NOT, [point])) == PLAIN_AND_NOT_EVENTS
