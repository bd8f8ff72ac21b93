"""``trio-chat check``: a conformance checker that any chat server can be run against.

It speaks to the server only over TCP and knows nothing of trio-chat's insides: each case
(`cases.py`) sends what PROTOCOL.md describes and compares, byte for byte, what comes back
(`wire.py`); `runner.py` runs the cases and reports. docs/checking.md explains its use.
"""

from trio_chat.tools.check.cases import CASES, Case
from trio_chat.tools.check.runner import CaseResult, add_parser, case_names, run_checks
from trio_chat.tools.check.settings import Settings

__all__ = ["CASES", "Case", "CaseResult", "Settings", "add_parser", "case_names", "run_checks"]
