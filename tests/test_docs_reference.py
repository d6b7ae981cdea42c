"""The reference pages say what the code does: docs/configs.md's [train] table lists every
field of TrainConfig with its type and default, and its error messages are the real ones."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import attrs

from kdcore.training import TrainConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"


def section(page: str, heading: str) -> list[str]:
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def type_cell(kind: Any) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return ", ".join(f'`"{choice}"`' for choice in typing.get_args(kind))
    optional = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return f"`{(optional[0] if optional else kind).__name__}`"


def default_cell(default: Any) -> str:
    if default is attrs.NOTHING:
        return "required"
    if default is None:
        return "not set"
    return f'`"{default}"`' if isinstance(default, str) else f"`{default!r}`"


def test_the_train_table_lists_every_field_with_its_type_and_default() -> None:
    hints = typing.get_type_hints(TrainConfig)
    expected = [
        (f"`{field.name}`", type_cell(hints[field.name]), default_cell(field.default))
        for field in attrs.fields(TrainConfig)
    ]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section("configs.md", "## Jobs: the `[train]` table")
        if line.startswith("| `")
    ]
    assert [tuple(row[:3]) for row in rows] == expected


def test_checking_a_page_leaves_nothing_in_the_temporary_folder(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text('```python\nopen("made.txt", "w").write("x")\n```\n', encoding="utf-8")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result = subprocess.run(
        [sys.executable, str(DOCS / "check_snippets.py"), str(page)],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(temporary)},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(temporary.iterdir()) == []
