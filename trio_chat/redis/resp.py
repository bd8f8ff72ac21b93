"""RESP2, the Redis wire format, as far as a subscriber connection needs it: no I/O here.

Commands are encoded as arrays of bulk strings; `RespReader` turns received bytes into
values: bytes (simple and bulk strings), int, None, lists, and `RespError` for error replies.
Pushes of a subscribed connection (``smessage``, ``ssubscribe``, ``sunsubscribe``) are plain
arrays in RESP2.
"""

from __future__ import annotations

import binascii
from typing import TypeAlias

Value: TypeAlias = "bytes | int | list[Value] | RespError | None"

SLOTS = 16384


class RespError(Exception):
    """An error reply such as ``MOVED 3999 127.0.0.1:7001``."""


class _Incomplete(Exception):
    pass


def encode_command(*parts: str | bytes | int) -> bytes:
    """One command as the array of bulk strings Redis expects."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def hash_slot(key: str | bytes) -> int:
    """The cluster slot of `key` (or of a shard channel): CRC16 of its hash tag, as Redis."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


class RespReader:
    """Bytes in, complete values out; keeps the unfinished rest for the next `feed`."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Value]:
        """Add `data` and return every value now complete, in order."""
        self._buffer += data
        values: list[Value] = []
        position = 0
        while position < len(self._buffer):
            try:
                value, position = self._parse(position)
            except _Incomplete:
                break
            values.append(value)
        del self._buffer[:position]
        return values

    def _line(self, position: int) -> tuple[bytes, int]:
        end = self._buffer.find(b"\r\n", position)
        if end < 0:
            raise _Incomplete
        return bytes(self._buffer[position + 1 : end]), end + 2

    def _parse(self, position: int) -> tuple[Value, int]:
        kind = self._buffer[position : position + 1]
        line, position = self._line(position)
        if kind == b"+":
            return line, position
        if kind == b"-":
            return RespError(line.decode(errors="replace")), position
        if kind == b":":
            return int(line), position
        if kind == b"$":
            size = int(line)
            if size < 0:
                return None, position
            if len(self._buffer) < position + size + 2:
                raise _Incomplete
            return bytes(self._buffer[position : position + size]), position + size + 2
        if kind == b"*":
            count = int(line)
            if count < 0:
                return None, position
            items: list[Value] = []
            for _ in range(count):
                item, position = self._parse(position)
                items.append(item)
            return items, position
        raise ValueError(f"not RESP: {bytes(self._buffer[position - 1 : position + 20])!r}")
