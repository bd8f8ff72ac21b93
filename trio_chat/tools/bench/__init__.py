"""``trio-chat bench``: fan-out load against a running server, every delivery checked.

R rooms of M member connections each; the last S members of every room are senders. The
package in the order a run goes through it:

- `load`: the shape of a load, the named scenarios, and the bytes of every message;
- `members`: the member connections, their sockets and the poller over them;
- `setup`: connecting and joining every member before anything is measured;
- `run`: the measured phase (one ``epoll`` loop) and the teardown; `run_load` runs it all;
- `checking`: every chunk a member receives checked for loss, repeats, order and stray bytes;
- `statistics`: the counts, latency percentiles, the table and progress lines;
- `command`: the command's options and output.
"""

from trio_chat.tools.bench.command import add_parser, loads_from_args
from trio_chat.tools.bench.load import SCENARIOS, BenchError, Load
from trio_chat.tools.bench.run import run_load
from trio_chat.tools.bench.statistics import Result, format_table

__all__ = [
    "SCENARIOS",
    "BenchError",
    "Load",
    "Result",
    "add_parser",
    "format_table",
    "loads_from_args",
    "run_load",
]
