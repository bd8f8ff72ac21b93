#!/usr/bin/env bash
# What the operator features cost fan-out: trio-chat at commit BASE against the work tree with
# metrics on (scraped every second), --kill-allow, and a per-address limit and flood control
# that apply to the benchmark's own clients, 'trio-chat bench' big and small back to back,
# in alternating order. Prints each run, then for each scenario the median deliveries/s and the
# deliveries per second of server CPU time: on a shared machine the second is the steadier.
#
#   scripts/policybench.sh BASE [ROUNDS]      e.g. scripts/policybench.sh 3574486 10
#
# Run from the project with its virtual environment (.venv, made by scripts/start.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base_commit=${1:?usage: scripts/policybench.sh BASE [ROUNDS]}
rounds=${2:-6}
py=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
git -C "$root" archive "$base_commit" | (mkdir "$work/base" && tar -x -C "$work/base")
free() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pb=$(free); pa=$(free); pm=$(free)
(cd "$work" && PYTHONPATH=$work/base exec "$py" -m trio_chat --log-level WARNING serve \
    --host 127.0.0.1 --port "$pb") &
base=$!
(cd "$work" && PYTHONPATH=$root exec "$py" -m trio_chat --log-level WARNING serve \
    --host 127.0.0.1 --port "$pa" --metrics-port "$pm" --kill-allow 127.0.0.1/32 \
    --limit-exempt none --max-connections-per-ip 2000 \
    --request-rate 1000000 --request-burst 1000000) &
after=$!
"$py" - "$pm" <<'SCRAPER' &
import sys, time, urllib.request
while True:
    time.sleep(1)
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read()
    except OSError:
        pass
SCRAPER
scraper=$!
trap 'kill $base $after $scraper 2>/dev/null; rm -rf "$work"' EXIT
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # clock ticks of user and system time
sleep 3
for round in $(seq "$rounds"); do
    for scenario in big small; do
        order="base after"
        if [ $((round % 2)) = 0 ]; then order="after base"; fi
        for which in $order; do
            if [ "$which" = base ]; then port=$pb pid=$base path=$work/base
            else port=$pa pid=$after path=$root; fi
            before=$(cpu "$pid")
            result=$(cd "$work" && PYTHONPATH=$path "$py" -m trio_chat --log-level WARNING \
                bench 127.0.0.1 "$port" "$scenario" --json)
            echo "$which $(( $(cpu "$pid") - before )) $result"
        done
    done
done | tee "$work/runs"
"$py" - "$work/runs" "$(getconf CLK_TCK)" <<'SUMMARY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    which, ticks, result = line.split(" ", 2)
    run = json.loads(result)
    assert run["ok"], run["first_error"]
    runs.setdefault((run["scenario"], which), []).append((run, int(ticks) / int(sys.argv[2])))
for scenario in ("big", "small"):
    figures = {}
    for which in ("base", "after"):
        done = runs[(scenario, which)]
        median = statistics.median(run["deliveries_per_s"] for run, _ in done)
        per_cpu = sum(run["delivered"] for run, _ in done) / sum(cpu for _, cpu in done)
        figures[which] = (median, per_cpu)
        print(f"{scenario:5} {which:5} {len(done)} runs: median {median / 1e6:.2f} M deliveries/s, "
              f"{per_cpu / 1e6:.2f} M deliveries per server CPU-second")
    (b_median, b_cpu), (a_median, a_cpu) = figures["base"], figures["after"]
    print(f"{scenario:5} after/base: {a_median / b_median:.3f} (median), {a_cpu / b_cpu:.3f} (per CPU-second)")
SUMMARY
