"""Every case, in the order they run: the grader's sequence first, KILL_SERVICE last.

Each module holds the cases of one subject; each case opens fresh connections and uses room
and client names no other case (or run) uses, so a case never depends on another having run
and can be run alone with ``--only``.
"""

from __future__ import annotations

from trio_chat.tools.check.context import Case
from trio_chat.tools.check.errors import ERROR_CASES
from trio_chat.tools.check.framing import FRAMING_CASES
from trio_chat.tools.check.grader import case_grader
from trio_chat.tools.check.identity import HELO_CASES
from trio_chat.tools.check.load import LOAD_CASES
from trio_chat.tools.check.membership import MEMBERSHIP_CASES
from trio_chat.tools.check.shutdown import KILL_CASES

CASES: list[Case] = [
    case_grader,
    *HELO_CASES,
    *MEMBERSHIP_CASES,
    *FRAMING_CASES,
    *ERROR_CASES,
    *LOAD_CASES,
    *KILL_CASES,
]
