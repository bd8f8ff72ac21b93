"""Plot fan-out capacity against room size: trio-chat beside ngIRCd, one load generator for both.

    python scripts/plot_fanout.py --bench-dir DIR [--out docs/fanout.png]
    python scripts/plot_fanout.py --replot          # redraw from docs/fanout.json

Builds the C load generator ``fanout.c`` from --bench-dir (the outside instrument that
docs/performance.md describes; it is not part of this repository), starts trio-chat (this checkout)
and ngIRCd (with --bench-dir's ngircd.conf: flood limits off) on free loopback ports, and
for each room size runs one room with two senders against each server, alternating servers
so that drift on a shared machine hits both alike. Writes the figures to a JSON file next to
the PNG, then draws the PNG. Needs gcc, ngircd and the ``plot`` dependency group
(matplotlib). Every process it starts it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = [10, 20, 50, 100, 200, 500, 1000, 2000]
SENDERS = 2
TARGET_DELIVERIES = 1_000_000
"""Deliveries per run: about half a second of work for either server, whatever the size."""
MAX_MESSAGES = 20_000
START_TIMEOUT = 30.0
"""Seconds for a server to start listening (trio-chat's first start imports trio)."""
RUN_TIMEOUT = 120
"""Seconds for one run of the load generator; a correct run takes a few."""


def messages_for(members: int) -> int:
    """Messages per sender so that a run makes about TARGET_DELIVERIES deliveries."""
    return max(200, min(MAX_MESSAGES, TARGET_DELIVERIES // (SENDERS * (members - 1))))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_port(port: int, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"plot_fanout: {name} exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"plot_fanout: {name} did not start listening on port {port}")


def run_fanout(fanout: Path, proto: str, port: int, members: int) -> float:
    """Deliveries per second of one verified run; exits if the run lost anything."""
    command = [str(fanout), "--proto", proto, "--port", str(port), "--rooms", "1"]
    command += ["--members", str(members), "--senders", str(SENDERS)]
    command += ["--messages", str(messages_for(members)), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    figures = json.loads(done.stdout)
    if done.returncode != 0 or not figures.get("ok"):
        sys.exit(f"plot_fanout: {proto} with {members} members failed: {done.stdout}")
    rate: float = figures["deliveries_per_s"]
    return rate


def measure(bench_dir: Path, repeats: int) -> dict[str, object]:
    """Run every size against both servers; the median of `repeats` runs per point."""
    work = Path(tempfile.mkdtemp(prefix="plot_fanout."))
    fanout = work / "fanout"
    subprocess.run(["gcc", "-O2", "-o", str(fanout), str(bench_dir / "fanout.c")], check=True)
    chat_port, irc_port = free_port(), free_port()
    conf = (bench_dir / "ngircd.conf").read_text()
    conf = re.sub(r"(?m)^(\s*Ports = ).*$", rf"\g<1>{irc_port}", conf)
    conf = re.sub(r"(?m)^(\s*PidFile = ).*$", rf"\g<1>{work / 'ngircd.pid'}", conf)
    (work / "ngircd.conf").write_text(conf)
    chat = [sys.executable, "-m", "trio_chat", "--log-level", "WARNING", "serve"]
    servers = {
        "chat": subprocess.Popen(
            [*chat, "--host", "127.0.0.1", "--port", str(chat_port)], cwd=ROOT
        ),
        "irc": subprocess.Popen(
            ["ngircd", "-n", "-f", str(work / "ngircd.conf")], stdout=subprocess.DEVNULL
        ),
    }
    ports = {"chat": chat_port, "irc": irc_port}
    try:
        for proto, process in servers.items():
            wait_port(ports[proto], process, proto)
        rates: dict[str, list[float]] = {"chat": [], "irc": []}
        for members in SIZES:
            runs: dict[str, list[float]] = {"chat": [], "irc": []}
            for _ in range(repeats):
                for proto in ("chat", "irc"):
                    runs[proto].append(run_fanout(fanout, proto, ports[proto], members))
            for proto in rates:
                rates[proto].append(statistics.median(runs[proto]))
            print(
                f"{members:>5} members: trio-chat {rates['chat'][-1]:>12,.0f}/s  "
                f"ngIRCd {rates['irc'][-1]:>12,.0f}/s",
                flush=True,
            )
    finally:
        for process in servers.values():
            process.terminate()
        for process in servers.values():
            process.wait(timeout=10)
    return {
        "sizes": SIZES,
        "senders": SENDERS,
        "messages": [messages_for(m) for m in SIZES],
        "repeats": repeats,
        "deliveries_per_s": {"trio-chat": rates["chat"], "ngIRCd": rates["irc"]},
        "machine": f"{os.cpu_count()} cores, {os.uname().sysname} {os.uname().release}",
    }


def plot(figures: dict[str, object], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = figures["sizes"]
    series = figures["deliveries_per_s"]
    assert isinstance(sizes, list)
    assert isinstance(series, dict)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for (name, rates), marker in zip(series.items(), "os", strict=False):
        ax.plot(sizes, [r / 1e6 for r in rates], marker=marker, label=name)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("members in the room (one room, 2 senders)")
    ax.set_ylabel("deliveries per second (millions)")
    ax.set_ylim(bottom=0)
    ax.set_title("Fan-out capacity on loopback, same load generator (fanout.c)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bench-dir",
        type=Path,
        help="directory holding fanout.c and ngircd.conf (needed unless --replot)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "fanout.png")
    parser.add_argument("--repeats", type=int, default=3, help="runs per point (median)")
    parser.add_argument("--replot", action="store_true", help="redraw from the JSON file")
    args = parser.parse_args()
    data = args.out.with_suffix(".json")
    if args.replot:
        figures = json.loads(data.read_text())
    elif args.bench_dir is None:
        parser.error("--bench-dir DIR is needed to measure; --replot redraws from " + str(data))
    else:
        figures = measure(args.bench_dir, args.repeats)
        data.write_text(json.dumps(figures, indent=1) + "\n")
    plot(figures, args.out)
    print(f"wrote {args.out} and {data}")


if __name__ == "__main__":
    main()
