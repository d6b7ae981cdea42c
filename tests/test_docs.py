"""Every snippet in docs/ runs (docs/check_snippets.py), so the pages cannot drift from the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_snippet_of_the_page_runs(page: str) -> None:
    result = subprocess.run(
        [sys.executable, str(DOCS / "check_snippets.py"), str(DOCS / page)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
