"""Checking what a member receives: whole chunks at once while all is well, frame by frame
where something is wrong, so that every loss, repeat, reordering or stray byte is counted.

Every message of a room has the same length, so a chunk holds whole frames at fixed offsets
and ``data[offset::frame_length]`` lifts one field out of every frame at once. A message
carries its sequence number in digits of an alphabet that belongs to its sender alone:
``column.translate(None, others)`` keeps one sender's digits, in arrival order, and comparing
them with the precomputed digits of the next expected sequence numbers proves, in one
comparison per digit, that the chunk holds exactly that sender's next messages.
"""

from __future__ import annotations

import re

from attrs import define

from trio_chat.tools.bench.load import Digits, Load, payload_length
from trio_chat.tools.bench.members import Conn
from trio_chat.tools.bench.statistics import Result

FRAME = re.compile(rb"CHAT: ([0-9]+)\nCLIENT_NAME: ([^\n]*)\nMESSAGE: ([^\n]*)\n\n")

Runs = list[tuple[int, int, int]]
"""(sender within the room, first sequence number, count) of each run of messages received
in order."""


@define(eq=False)
class Checker:
    """Checks the chunks members receive against what their rooms' senders sent."""

    load: Load
    digits: Digits
    result: Result

    def check(self, conn: Conn, received: memoryview) -> Runs:
        """The runs of messages in `received` (after what `conn` kept of its last chunk); the
        start of a frame not yet whole is kept for the next chunk."""
        data = conn.carry + received if conn.carry else bytes(received)
        length = conn.room.frame_length
        count = len(data) // length
        end = count * length
        conn.carry = data[end:]
        if not count:
            return []
        runs = self.fast(conn, data, count, end)
        if runs is None:
            conn.carry = b""
            runs = self.slow(conn, data)
        return runs

    def fast(self, conn: Conn, data: bytes, count: int, end: int) -> Runs | None:
        """Check `count` whole frames with byte operations; None if they need a closer look."""
        room = conn.room
        length = room.frame_length
        for offset, byte in room.fixed:  # every frame in its place, and of this room
            if data[offset:end:length] != byte * count:
                return None
        digits = self.digits
        columns = [data[room.digit_offset + j : end : length] for j in range(digits.width)]
        expect = conn.expect
        runs: Runs = []
        total = 0
        for sender in range(self.load.senders):
            start = expect[sender]
            n = -1
            for j, column in enumerate(columns):
                mine = column.translate(None, digits.others[sender])
                if n < 0:
                    n = len(mine)
                    if not n:
                        break
                if mine != digits.columns[sender][j][start : start + n]:
                    return None
            if n > 0:
                runs.append((sender, start, n))
                total += n
        if total != count:
            return None
        for sender, start, n in runs:
            expect[sender] = start + n
        return runs

    def slow(self, conn: Conn, data: bytes) -> Runs:
        """Parse frame by frame, counting and naming whatever is wrong."""
        result = self.result
        digits = self.digits
        payload = payload_length(self.load, digits)
        runs: Runs = []
        pos = 0
        while pos < len(data):
            match = FRAME.match(data, pos)
            if match is None:
                stop = data.find(b"\n\n", pos)
                if stop < 0 and not data.startswith(b"ERROR_CODE:", pos):
                    conn.carry = data[pos:]
                    break
                text = data[pos : pos + 120].decode(errors="replace")
                if data.startswith(b"ERROR_CODE:", pos):
                    result.server_errors += 1
                    result.note(f"member {conn.name}: server error: {text!r}")
                    stop = data.find(b"\n", data.find(b"ERROR_DESCRIPTION:", pos))
                    pos = len(data) if stop < 0 else stop + 1
                    continue
                result.corrupt += 1
                result.note(f"member {conn.name}: unexpected bytes {text!r}")
                pos = stop + 2
                continue
            pos = match.end()
            ref, message = int(match.group(1)), match.group(3)
            result.slow_frames += 1
            if ref != conn.room.ref:
                result.misrouted += 1
                result.note(f"member {conn.name} of room {conn.room.ref} got a message for {ref}")
                continue
            decoded = digits.decode(message[1 : 1 + digits.width])
            if decoded is None or len(message) != payload or decoded[1] >= self.load.messages:
                result.corrupt += 1
                result.note(f"member {conn.name}: corrupt message {message[:60]!r}")
                continue
            sender, seq = decoded
            expected = conn.expect[sender]
            if seq == expected:
                conn.expect[sender] = seq + 1
                if runs and runs[-1][0] == sender and runs[-1][1] + runs[-1][2] == seq:
                    runs[-1] = (sender, runs[-1][1], runs[-1][2] + 1)
                    continue
            elif seq > expected:
                # Those skipped are lost unless they turn up later, out of order.
                result.note(
                    f"member {conn.name}: message {seq} of sender {sender} before {expected}"
                )
                conn.missing.update((sender, q) for q in range(expected, seq))
                conn.expect[sender] = seq + 1
            elif (sender, seq) in conn.missing:
                conn.missing.discard((sender, seq))
                result.out_of_order += 1
                result.note(f"member {conn.name}: message {seq} of sender {sender} out of order")
            else:
                result.duplicates += 1
                result.note(f"member {conn.name}: message {seq} of sender {sender} twice")
                continue
            runs.append((sender, seq, 1))
        return runs
