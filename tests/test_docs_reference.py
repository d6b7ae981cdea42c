"""The reference pages say what the code does: docs/configs.md's [train] table lists every
field of TrainConfig with its type and default, and its error messages are the real ones; the
snippet checker cleans up after itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import kdcore as kd
from kdcore.training import TrainConfig, load_job

DOCS = Path(__file__).resolve().parent.parent / "docs"


def section(page: str, heading: str) -> list[str]:
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def fenced_after(page: str, marker: str) -> list[str]:
    """The body of each fenced block just after a line ``marker`` of ``page``."""
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    bodies = []
    for index in [i for i, line in enumerate(lines) if line == marker]:
        end = lines.index("```", index + 2)
        bodies.append("\n".join(lines[index + 2 : end]) + "\n")
    return bodies


def type_cell(kind: Any) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return ", ".join(f'`"{choice}"`' for choice in typing.get_args(kind))
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: X, not set
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return f"`{(typing.get_origin(kind) or kind).__name__}`"


def default_cell(default: Any) -> str:
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return f"`{json.dumps(default.factory())}`"  # a list, as TOML writes it
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


# docs/configs.md's documented messages, in the page's order: each from the page's own
# distill.toml with one mistake, or from a Python config built on the page's models.py.
TOML_MISTAKES = [
    ("temperature", "temprature"),
    ('"logits"', '"logit"'),
    ("loss_balancer", "los_balancer"),
    ("build_teacher", "build_teachr"),
    ("kwargs = { width = 16 }", 'device = "cpu"'),
    ("[kd_loss]\n", '[kd_loss]\nexpose_minimal_state_dict = "yes"\n'),
    ("[0.4, 0.1]", "[0.4, 0.1, 0.2]"),
    ("[kd_loss]", "[kd_loss"),
]


def python_mistakes(models: Any) -> list[tuple[str, Any, Any]]:
    """(mode, config, student to check against) for each documented Python-config mistake."""
    teacher, logits, mse = models.build_teacher, kd.LogitsDistillationLoss(), kd.MSELoss()
    both = {"teacher_model": teacher}
    return [
        (
            "kd_loss",
            {
                **both,
                "criterion": [
                    {"student": "", "teacher": "", "loss": logits},
                    {"student": "hiden", "teacher": "hidden", "loss": mse},
                ],
                "loss_balancer": {"name": "static", "kd_loss_weight": [0.4, 0.1]},
            },
            models.Net(),
        ),
        ("kd_loss", both, None),
        ("kd_loss", {**both, "criterion": {("", ""): logits, ("hidden", "hidden"): mse}}, None),
        (
            "kd_loss",
            {**both, "criterion": logits, "loss_balancer": {"name": "static", "kd_loss_weight": 2}},
            None,
        ),
        ("kd_loss", {**both, "criterion": {"name": "logits", "temperature": -1}}, None),
        ("kd_loss", {**both, "criterion": {"hidden": mse}}, None),
        ("kd_loss", {**both, "criterion": {("", ""): kd.MSELoss}}, None),
        ("kd_loss", {"teacher_model": (models.Net, 16), "criterion": logits}, None),
        ("kd_loss", {**both, "criterion": {"name": "models:Nett"}}, None),
        ("layerwise_kd", {**both, "criterion": {("", ""): mse}}, models.Net()),  # convert only
        ("kd_los", {**both, "criterion": logits}, None),
    ]


def message(action: Any, *args: Any, **kwargs: Any) -> str:
    """What ``action(*args, **kwargs)`` raises, as the user sees it."""
    with pytest.raises(kd.KDCoreError) as caught:
        action(*args, **kwargs)
    return f"{type(caught.value).__name__}: {caught.value}"


@pytest.fixture
def page_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A folder holding configs.md's models.py and distill.toml, importable, as the cwd."""
    (tmp_path / "models.py").write_text(fenced_after("configs.md", "<!-- file: models.py -->")[0])
    toml = fenced_after("configs.md", "<!-- file: distill.toml -->")[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    with kd.use_host(kd.PluginHost(blocked=())):
        yield toml
    sys.modules.pop("models", None)


def test_the_documented_messages_are_the_real_ones(page_folder: str) -> None:
    import models

    toml = page_folder
    Path("job.toml").write_text(
        '[train]\nstudent = "models:Net"\ndata = "models:Net"\noptimizer = "adan"\n'
    )
    produced = [message(load_job, "job.toml")]
    for old, new in TOML_MISTAKES:
        assert old in toml
        Path("typo.toml").write_text(toml.replace(old, new, 1))
        produced.append(message(kd.load_config, "typo.toml"))
    with kd.use_host(kd.PluginHost(blocked={"transformers"})):
        missing = {"teacher_model": {"name": "transformers"}, "criterion": {"name": "logits"}}
        produced.append(message(kd.check, [("kd_loss", missing)]))
    for mode, config, student in python_mistakes(models):
        if mode == "layerwise_kd":  # kd.check words this one shorter
            produced.append(message(kd.convert, student, [(mode, config)]))
        else:
            produced.append(message(kd.check, [(mode, config)], student=student))
    distilled = kd.convert(
        models.Net(),
        [
            (
                "kd_loss",
                {"teacher_model": models.build_teacher, "criterion": kd.LogitsDistillationLoss()},
            )
        ],
    )
    again = [("kd_loss", {"teacher_model": models.build_teacher, "criterion": kd.MSELoss()})]
    produced.append(message(kd.convert, distilled, again))
    documented = "".join(fenced_after("configs.md", "<!-- messages -->")).splitlines()
    assert documented == produced
