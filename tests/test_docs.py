"""Every snippet in docs/ and the README runs (docs/check_snippets.py), so the pages cannot drift from the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_every_snippet_of_the_page_runs(page: str) -> None:
    result = subprocess.run(
        [sys.executable, str(DOCS / "check_snippets.py"), str(REPO / page)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # Pages install example packages from copies: a build leaves build/ and *.egg-info behind.
    assert not [*REPO.glob("tests/*/build"), *REPO.glob("tests/*/*.egg-info")]
