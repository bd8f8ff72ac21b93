"""The outcome of a run, and how it is shown: root causes first, then each case."""

from __future__ import annotations

from typing import Any, TextIO

from attrs import asdict, frozen

from trio_chat.tools.check.profile import Cause

# Expected and arrived bytes are shown around their first difference, this many characters
# either side, so a 16 MiB flood or a 70 KiB line still gives a readable report.
EXCERPT = 160

MODES = {
    "strict": "strict mode: a HELO barrier behind each step, every reply exact",
    "paced": "paced mode: each reply awaited, then a quiet period, as the lab's grader did",
}
LABELS = {"pass": "PASS", "fail": "FAIL", "not run": "NOT RUN", "skip": "SKIP"}


@frozen
class CaseResult:
    """How one case went. `status` is "pass", "fail", "not run" or "skip"."""

    name: str
    status: str
    summary: str
    seconds: float = 0.0
    step: str = ""
    expected: str = ""
    arrived: str = ""
    causes: tuple[str, ...] = ()
    """For a failure: the root causes that explain it; for NOT RUN: the one that blocked it."""
    tolerated: tuple[str, ...] = ()
    """Deviations of the server that the case's setup accepted."""


@frozen
class RootCause:
    """One distinct reason the server departs from docs/protocol.md, with the cases it touched."""

    key: str
    text: str
    failed: tuple[str, ...] = ()
    not_run: tuple[str, ...] = ()
    tolerated: tuple[str, ...] = ()


@frozen
class Report:
    """A whole run: the mode, the deviations the preamble found, and each case's result."""

    server: str
    mode: str
    causes: tuple[Cause, ...]
    results: tuple[CaseResult, ...]

    @property
    def unreachable(self) -> bool:
        """Whether the server could not be reached at all."""
        return any(cause.key == "unreachable" for cause in self.causes)

    @property
    def exit_status(self) -> int:
        """2: unreachable; 1: some case failed or could not run; 0: conforming."""
        if self.unreachable:
            return 2
        return 1 if any(r.status in ("fail", "not run") for r in self.results) else 0

    def failed(self) -> set[str]:
        """The names of the cases that failed."""
        return {r.name for r in self.results if r.status == "fail"}

    def status(self, name: str) -> str:
        """The status of case `name`."""
        return next(r.status for r in self.results if r.name == name)

    def root_causes(self) -> list[RootCause]:
        """Each distinct root cause once: the preamble's findings, then each failure that no
        finding explains, with every case it failed, kept from running, or let through."""
        texts = {cause.key: cause.text for cause in self.causes}
        for r in self.results:
            if r.status == "fail" and not r.causes:
                texts.setdefault(r.name, r.step)
            for key in r.causes:
                texts.setdefault(key, key)
        roots = []
        for key, text in texts.items():
            touched = {
                status: tuple(
                    r.name
                    for r in self.results
                    if r.status == status and (key in r.causes or (not r.causes and r.name == key))
                )
                for status in ("fail", "not run")
            }
            tolerated = tuple(r.name for r in self.results if key in r.tolerated)
            roots.append(RootCause(key, text, touched["fail"], touched["not run"], tolerated))
        return roots

    def counts(self) -> str:
        """The last line of a report."""
        counts = {status: sum(r.status == status for r in self.results) for status in LABELS}
        verdict = {0: "conforming", 1: "NOT CONFORMING", 2: "UNREACHABLE"}[self.exit_status]
        return (
            f"{counts['pass']} passed, {counts['fail']} failed, {counts['not run']} not run, "
            f"{counts['skip']} skipped: {verdict}"
        )

    def document(self) -> dict[str, Any]:
        """The report as one JSON-ready document."""
        return {
            "server": self.server,
            "mode": self.mode,
            "ok": self.exit_status == 0,
            "exit_status": self.exit_status,
            "summary": self.counts(),
            "root_causes": [asdict(root) for root in self.root_causes()],
            "cases": [asdict(result) for result in self.results],
        }


def write(report: Report, out: TextIO) -> None:
    """The text report: the mode, the root causes, each case, the counts."""
    out.write(f"trio-chat check {report.server}, {MODES[report.mode]}\n\n")
    roots = report.root_causes()
    if roots:
        out.write("Root causes, each once:\n")
        for number, root in enumerate(roots, 1):
            out.write(f"{number:3}. [{root.key}] {root.text}\n")
            for label, names in (
                ("failed", root.failed),
                ("not run", root.not_run),
                ("tolerated in the setup of", root.tolerated),
            ):
                if names:
                    out.write(f"       {label}: {', '.join(names)}\n")
        out.write("\n")
    for result in report.results:
        write_result(result, out)
    out.write(report.counts() + "\n")


def write_result(result: CaseResult, out: TextIO) -> None:
    """One case's line, and for a failure its step, what was expected and what arrived."""
    timing = f" ({result.seconds:.2f} s)" if result.status in ("pass", "fail") else ""
    out.write(f"{LABELS[result.status]} {result.name}: {result.summary}{timing}\n")
    if result.status == "fail":
        out.write(f"     step:     {result.step}\n")
        if result.expected or result.arrived:
            out.write(f"     expected: {result.expected!r}\n")
            out.write(f"     arrived:  {result.arrived!r}\n")
        if result.causes:
            out.write(f"     cause:    {', '.join(result.causes)}\n")
    elif result.status == "not run" and result.causes:
        out.write(f"     because:  root cause [{result.causes[0]}]\n")
    elif result.status in ("not run", "skip"):
        out.write(f"     because:  {result.step}\n")


def excerpts(expected: str, arrived: str) -> tuple[str, str]:
    """Both texts cut to the neighbourhood of their first difference."""
    if len(expected) <= 2 * EXCERPT and len(arrived) <= 2 * EXCERPT:
        return expected, arrived
    same = 0
    for a, b in zip(expected, arrived, strict=False):
        if a != b:
            break
        same += 1
    start = max(0, same - EXCERPT)

    def cut(text: str) -> str:
        head = f"[{start} characters as expected]…" if start else ""
        tail = (
            f"…[{len(text) - start - 2 * EXCERPT} more]" if len(text) > start + 2 * EXCERPT else ""
        )
        return head + text[start : start + 2 * EXCERPT] + tail

    return cut(expected), cut(arrived)
