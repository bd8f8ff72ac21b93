"""Fan-out to WebSocket members: what a broadcast costs the server for each browser in a room.

    python scripts/webbench.py [--members 200] [--messages 1000] [--size 64]
    (or: nox -s webbench -- --members 500)

Starts ``trio-chat serve`` with its web door on 127.0.0.1 in a child process, opens
`--members` WebSocket members (wsproto over trio sockets) in one room, and has one TCP member
send `--messages` CHAT messages of `--size` bytes. Every WebSocket member must receive every
message, each as one text message, in order; the exit status is 1 otherwise. It prints the
deliveries per second and the server's CPU time (user and system) per delivery. All the
members run in this one Python process and usually limit the first figure; the second is the
server's own cost, the one to compare.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

START_TIMEOUT = 30.0  # the server imports trio and binds two ports
RECEIVE_TIMEOUT = 60.0  # per member; only matters when something is wrong


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Member:
    """One WebSocket member: its stream, its protocol object, and the messages it got."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.parts: list[str] = []

    @classmethod
    async def join(cls, port: int, room: str, name: str) -> Member:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        member = cls(stream, WSConnection(ConnectionType.CLIENT))
        await member.send_raw(Request(host=f"127.0.0.1:{port}", target="/ws"))
        while not any(isinstance(event, AcceptConnection) for event in member.ws.events()):
            data = await stream.receive_some(1 << 16)
            if not data:
                raise RuntimeError("the server refused the WebSocket")
            member.ws.receive_data(bytes(data))
        request = f"JOIN_CHATROOM: {room}\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: {name}\n"
        await member.send_raw(TextMessage(data=request))
        await member.next_message()  # JOINED_CHATROOM
        await member.next_message()  # its own join announcement
        return member

    async def send_raw(self, event: Request | TextMessage) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_message(self) -> str:
        while True:
            for event in self.ws.events():
                if not isinstance(event, TextMessage):
                    raise RuntimeError(f"unexpected {event!r}")
                self.parts.append(event.data)
                if event.message_finished:
                    text = "".join(self.parts)
                    self.parts.clear()
                    return text
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise RuntimeError("the server closed a member's connection")
            self.ws.receive_data(bytes(data))


async def run(args: argparse.Namespace, tcp_port: int, web_port: int, pid: int) -> int:
    members = [await Member.join(web_port, "bench", f"w{n}") for n in range(args.members)]
    sender = await trio.open_tcp_stream("127.0.0.1", tcp_port)
    await sender.send_all(b"JOIN_CHATROOM: bench\nCLIENT_IP: 0\nPORT: 0\nCLIENT_NAME: s\n")
    sender_joined = "CHAT: 0\nCLIENT_NAME: s\nMESSAGE: s has joined this chatroom.\n\n"
    for member in members:  # later members' joins, then the sender's: everyone is in
        while await member.next_message() != sender_joined:
            pass
    text = "x" * args.size
    failures: list[str] = []

    async def receive(member: Member) -> None:
        with trio.fail_after(RECEIVE_TIMEOUT):
            for number in range(args.messages):
                message = await member.next_message()
                expected = f"CHAT: 0\nCLIENT_NAME: s\nMESSAGE: {number} {text}\n\n"
                if message != expected:
                    failures.append(f"expected {expected!r}, got {message!r}")
                    return

    async def send() -> None:
        for number in range(args.messages):
            chat = f"CHAT: 0\nJOIN_ID: {args.members}\nCLIENT_NAME: s\nMESSAGE: {number} {text}\n\n"
            await sender.send_all(chat.encode())

    cpu_before = cpu_seconds(pid)
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for member in members:
            nursery.start_soon(receive, member)
        nursery.start_soon(send)
    wall = time.perf_counter() - start
    cpu = cpu_seconds(pid) - cpu_before
    deliveries = args.members * args.messages
    print(f"{args.members} WebSocket members, {args.messages} messages of {args.size} bytes")
    print(f"deliveries: {deliveries / wall:,.0f}/s ({wall:.2f} s)")
    print(f"server CPU: {cpu:.2f} s, {cpu / deliveries * 1e6:.2f} us per delivery")
    if failures:
        print(f"FAILED: {len(failures)} members, first: {failures[0]}")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=200, help="WebSocket members (200)")
    parser.add_argument("--messages", type=int, default=1000, help="messages sent (1000)")
    parser.add_argument("--size", type=int, default=64, help="bytes of each message (64)")
    args = parser.parse_args()
    tcp_port, web_port = free_port(), free_port()
    command = [sys.executable, "-m", "trio_chat", "--log-level", "WARNING", "serve"]
    command += ["--host", "127.0.0.1", "--port", str(tcp_port), "--web-port", str(web_port)]
    server = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", web_port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("webbench: the server did not start")
                time.sleep(0.1)
        return trio.run(run, args, tcp_port, web_port, server.pid)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
