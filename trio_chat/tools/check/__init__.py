"""``trio-chat check``: a conformance checker that any chat server can be run against.

It speaks to the server only over TCP and knows nothing of trio-chat's insides. The preamble
(`preamble.py`) probes the basics once and records the server's deviations in a `Profile`;
each case (`cases.py` lists them, by subject module) sends what docs/protocol.md describes and
compares what comes back (`wire.py`) with literal templates of the protocol's bytes
(`templates.py`); `runner.py` runs them and `report.py` shows the root causes first, then
each case. docs/checking.md explains its use.
"""

from trio_chat.tools.check.cases import CASES
from trio_chat.tools.check.context import Case
from trio_chat.tools.check.report import CaseResult, Report
from trio_chat.tools.check.runner import add_parser, case_names, run_checks
from trio_chat.tools.check.settings import Settings

__all__ = [
    "CASES",
    "Case",
    "CaseResult",
    "Report",
    "Settings",
    "add_parser",
    "case_names",
    "run_checks",
]
