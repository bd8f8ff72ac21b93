"""A connection's inbound side with no I/O: bytes in, requests out, in the manner of h11.

`RequestReader` puts the protocol's framing (`protocol.LineBuffer`), parsing
(`protocol.RequestParser`, its plain CHAT shortcut and its message bodies) and the rules of a
connection's input (turns, the closing state, the limits) behind two calls, `receive_data`
and `next_event`; the connection's read loop is a short adapter around it.
"""

from __future__ import annotations

import enum
from typing import Final

from trio_chat.protocol import (
    DEFAULT_MAX_NAME,
    Disconnect,
    Event,
    KillService,
    LineBuffer,
    ProtocolError,
    RequestParser,
)


class Signal(enum.Enum):
    """What `RequestReader.next_event` returns when it has no event to give."""

    NEED_DATA = "need data"
    """Every byte received so far is consumed: call `receive_data` with more."""
    TURN_OVER = "turn over"
    """The reader has handled `lines_per_turn` lines since the caller last waited: let other
    connections run, then ask again."""


NEED_DATA: Final = Signal.NEED_DATA
TURN_OVER: Final = Signal.TURN_OVER

# Lines handled before the reader asks its caller to let other connections run: one receive
# can hold tens of thousands of tiny requests, and handling them all at once would hold every
# other client up for as long. A plain CHAT counts as its four lines.
LINES_PER_TURN = 512


class RequestReader:
    """One connection's inbound side with no I/O: bytes in (`receive_data`), events out
    (`next_event`), in the manner of h11's connection object.

    It frames lines (`LineBuffer`), parses them (`RequestParser`), takes a plain CHAT whole in
    one step (`RequestParser.plain_chat`), and counts lines to keep one client's burst from
    holding others up (`TURN_OVER`). After DISCONNECT or error 4 it is *closing*: input is
    read and dropped, and only a ``KILL_SERVICE`` line still gives an event.
    """

    __slots__ = (
        "_buffer",
        "_closing",
        "_data",
        "_events",
        "_fast",
        "_lines_per_turn",
        "_max_line",
        "_max_message",
        "_max_name",
        "_parser",
        "_start",
        "_turn",
    )

    def __init__(
        self,
        *,
        max_line: int,
        max_message: int,
        max_name: int = DEFAULT_MAX_NAME,
        lines_per_turn: int = LINES_PER_TURN,
    ) -> None:
        self._max_line = max_line
        self._max_message = max_message
        self._max_name = max_name
        self._lines_per_turn = lines_per_turn
        self._buffer = LineBuffer(max_line)
        self._parser = RequestParser(max_message, max_name)
        self._data: bytes | bytearray = b""  # the bytes received last, consumed from `_start`
        self._start = 0
        self._turn = 0  # lines handled since the caller last received or took its turn
        self._events: list[Event] = []  # events a line completed beyond the first, in order
        self._closing = False
        # Whether the next request may be a plain CHAT taken whole: not closing, and no
        # request or line part-way through.
        self._fast = True

    @property
    def closing(self) -> bool:
        """Whether the connection is closing: only KILL_SERVICE is still read."""
        return self._closing

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes received from the client; call only after `next_event` gave NEED_DATA."""
        self._data = data
        self._start = 0
        self._turn = 0

    def next_event(self) -> Event | Signal:
        """The next request (or `Unknown` line, or `ProtocolError`), or a `Signal`.

        A `ProtocolError` with code TOO_LARGE is the last event before closing: the bytes
        held for the request it ended are dropped.
        """
        if self._events:
            return self._events.pop(0)
        if self._fast and self._turn < self._lines_per_turn:  # the commonest case, first
            found = self._parser.plain_chat(self._data, self._start, self._max_line)
            if found is not None:
                self._start = found[1]
                self._turn += 4
                return found[0]
        return self._next_line_by_line()

    def _next_line_by_line(self) -> Event | Signal:
        data = self._data
        start = self._start
        end = len(data)
        while start < end:
            if self._turn >= self._lines_per_turn:
                self._turn = 0
                return TURN_OVER
            parser = self._parser
            if self._fast:
                found = parser.plain_chat(data, start, self._max_line)
                if found is not None:
                    chat, self._start = found
                    self._turn += 4
                    return chat
            self._turn += 1
            try:
                if parser.in_body:
                    body_event, start = parser.feed_body(data, start)
                    self._start = start
                    if body_event is None:
                        continue
                    if type(body_event) is ProtocolError and body_event.closes_connection:
                        raise body_event  # too large: what the message held is dropped
                    return body_event
                # One line at a time, so that the shortcut can be taken again as soon as the
                # parser is between requests.
                newline = data.find(b"\n", start)
                stop = end if newline < 0 else newline + 1
                piece = data[start:stop] if start or stop < end else data
                start = self._start = stop
                # `piece` holds at most one newline, so at most one line.
                for line in list(self._buffer.feed(piece)):
                    if self._closing:
                        if line.strip() == b"KILL_SERVICE":
                            return KillService()
                    elif events := self._parser.feed_line(line):
                        if type(events[-1]) is Disconnect:
                            self._closing = True
                        self._events.extend(events[1:])
                        return events[0]
            except ProtocolError as error:  # only "too large" is raised; the rest are events
                self._buffer = LineBuffer(self._max_line)  # what it held is dropped
                self._parser = RequestParser(self._max_message, self._max_name)
                if not self._closing:
                    self._closing = True
                    return error
            finally:
                self._fast = not self._closing and self._parser.idle and not len(self._buffer)
        self._data = b""
        self._start = 0
        return NEED_DATA
