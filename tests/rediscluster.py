"""A 3-master Redis Cluster for tests, from the same binary as `redisserver.RedisProcess`.

Each master is a server process with cluster mode on, on loopback ports of its own (client
and cluster bus); the launcher splits the 16384 slots in three, introduces the nodes to each
other and waits until every node reports the cluster healthy. `migrate_slot` moves one slot
with its keys from one master to another, as an operator resharding would.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.chatclient import free_port
from tests.redisserver import STARTUP_TIMEOUT, server_binary
from trio_chat.redis.resp import RespReader, Value, encode_command

SLOTS = 16384
MASTERS = 3


class ClusterNode:
    """One master of the cluster."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.bus_port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process with cluster mode on and no persistence."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "nodes.conf").unlink(missing_ok=True)  # a restart starts afresh
        self.process = subprocess.Popen(
            [
                server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(self.bus_port),
                "--cluster-config-file",
                str(self.directory / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def command(self, *parts: str) -> Value:
        """One command on a connection of its own; its parsed reply."""
        reader = RespReader()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(encode_command(*parts))
            while True:
                data = sock.recv(65536)
                if not data:
                    raise OSError("connection closed")
                values = reader.feed(data)
                if values:
                    return values[0]

    def node_id(self) -> str:
        """The node's cluster identity."""
        reply = self.command("CLUSTER", "MYID")
        assert isinstance(reply, bytes)
        return reply.decode()

    def answers(self) -> bool:
        """Whether the node answers PING."""
        return self.command("PING") == b"PONG"

    def healthy(self) -> bool:
        """Whether this node sees every slot served."""
        info = self.command("CLUSTER", "INFO")
        return isinstance(info, bytes) and b"cluster_state:ok" in info

    def stop(self) -> None:
        """Kill the process."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class RedisCluster:
    """Three masters sharing the slots, started together and stopped together."""

    def __init__(self, directory: Path) -> None:
        self.nodes = [ClusterNode(directory / f"node{index}") for index in range(MASTERS)]

    @property
    def url(self) -> str:
        """The URL of one node: a client finds the rest from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        """Start the masters, give each a third of the slots, and wait until all agree."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            while not self._wait(deadline, node.answers, node):
                if time.monotonic() > deadline:
                    raise RuntimeError("a master of the test cluster did not start")
                # Its port was taken between choosing it and binding it: choose again.
                node.stop()
                node.port, node.bus_port = free_port(), free_port()
                node.start()
        share = SLOTS // MASTERS
        for index, node in enumerate(self.nodes):
            last = SLOTS - 1 if index == MASTERS - 1 else (index + 1) * share - 1
            node.command("CLUSTER", "ADDSLOTSRANGE", str(index * share), str(last))
        while not all(node.healthy() for node in self.nodes):
            # MEET again until every node knows every other (a first MEET can be lost).
            for node in self.nodes[1:]:
                self.nodes[0].command(
                    "CLUSTER", "MEET", "127.0.0.1", str(node.port), str(node.bus_port)
                )
            for node in self.nodes:
                self._wait(min(deadline, time.monotonic() + 1.0), node.healthy, node)
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not become healthy")

    def _wait(self, deadline: float, ready: Callable[[], bool], node: ClusterNode) -> bool:
        """Wait until `ready`; False if `node`'s process has ended (it could not start)."""
        while True:
            try:
                if ready():
                    return True
            except OSError:
                pass
            if node.process is None or node.process.poll() is not None:
                return False
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def owner(self, slot: int) -> ClusterNode:
        """The master that serves `slot` (as the slots were first shared out)."""
        return self.nodes[min(slot // (SLOTS // MASTERS), MASTERS - 1)]

    def owner_now(self, slot: int) -> ClusterNode:
        """The master that serves `slot` now, as the first node sees it."""
        for entry in self.nodes[0].command("CLUSTER", "SLOTS") or []:  # type: ignore[union-attr]
            match entry:
                case [int(first), int(last), [_, int(port), *_], *_] if first <= slot <= last:
                    return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no master serves slot {slot}")

    def migrate_slot(self, slot: int, source: ClusterNode, target: ClusterNode) -> None:
        """Move `slot` and its keys from `source` to `target`, and tell every master."""
        source_id, target_id = source.node_id(), target.node_id()
        target.command("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        source.command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        while True:
            keys = source.command("CLUSTER", "GETKEYSINSLOT", str(slot), "100")
            assert isinstance(keys, list)
            if not keys:
                break
            source.command(
                "MIGRATE",
                "127.0.0.1",
                str(target.port),
                "",
                "0",
                "5000",
                "KEYS",
                *(key.decode() for key in keys if isinstance(key, bytes)),
            )
        for node in (target, source, *(n for n in self.nodes if n not in (source, target))):
            node.command("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)

    def pause(self) -> None:
        """Stop every master (SIGSTOP)."""
        for node in self.nodes:
            assert node.process is not None
            node.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let every master go on (SIGCONT)."""
        for node in self.nodes:
            assert node.process is not None
            node.process.send_signal(signal.SIGCONT)

    def kill_subscribers(self) -> int:
        """Have every master close its pub/sub connections; how many it closed."""
        killed = [node.command("CLIENT", "KILL", "TYPE", "pubsub") for node in self.nodes]
        return sum(count for count in killed if isinstance(count, int))

    def stop(self) -> None:
        """Kill every master (a restart with `start` is an empty cluster)."""
        self.resume()
        for node in self.nodes:
            node.stop()
