"""The documentation as a reader of a fresh clone meets it: every link and path it gives leads
to something in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) in Markdown, and ![alt](target) for images.
LINK = re.compile(r"\]\(([^)\s]+)\)")
# An absolute path of some machine: /home/..., /work/..., /tmp/..., /Users/...
MACHINE_PATH = re.compile(r"(?<![\w.:/])/(?:home|work|root|tmp|Users|srv|opt)/[\w.-]+")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves_inside_the_repository(page: Path) -> None:
    """A link that is not a URL or an anchor names a file or directory of the repository."""
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name}: {target} leads out of the repository"
        assert path.exists(), f"{page.name}: {target} does not exist"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_page_names_a_path_outside_the_repository(page: Path) -> None:
    """No page points above the repository or at a directory of the machine it was written on."""
    text = page.read_text()
    assert "../shared" not in text
    assert not MACHINE_PATH.findall(text), MACHINE_PATH.findall(text)
