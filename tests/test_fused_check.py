"""``kdcore check`` on a job whose fused criterion names the lm heads: with the models (``--import``
and a student) the names are resolved as ``kd.convert`` resolves them, and a misspelled one is
refused with the closest layer; without ``--import`` the teacher is not built, so they are not."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdcore.cli import main

pytest.importorskip("transformers")

MODELS = """
from tests.conftest import tiny_llama_from_config
def student():
    return tiny_llama_from_config(vocab=101, hidden=32)
def teacher():
    return tiny_llama_from_config(vocab=101, hidden=48, seed=1)
"""
CONFIG = """
[kd_loss]
teacher_model = {{ name = "callable", target = "kdcore_fused_check_models:teacher" }}
[[kd_loss.criterion]]
student = "model.norm"
teacher = "model.norm"
loss = {{ name = "fused_logits", student_head = "{student}", teacher_head = "{teacher}" }}
"""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "kdcore_fused_check_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "kdcore_fused_check_models", raising=False)
    yield tmp_path
    sys.modules.pop("kdcore_fused_check_models", None)


def check(folder: Path, student_head: str, teacher_head: str, *options: str) -> int:
    (folder / "distill.toml").write_text(CONFIG.format(student=student_head, teacher=teacher_head))
    student = "kdcore_fused_check_models:student"
    return main(["check", "distill.toml", "--student", student, *options])


@pytest.mark.parametrize(
    ("student_head", "teacher_head", "side"),
    [("lm_haed", "lm_head", "student"), ("lm_head", "lm_hed", "teacher")],
)
def test_check_with_the_models_refuses_a_misspelled_head_naming_the_closest_layer(
    folder: Path, capsys: pytest.CaptureFixture[str], student_head: str, teacher_head: str,
    side: str,
) -> None:  # fmt: skip
    assert check(folder, student_head, teacher_head, "--import") == 1
    misspelled = student_head if side == "student" else teacher_head
    assert (
        f"distill.toml: kd_loss.criterion[0].loss: FusedLogitsLoss {side}_head: the {side} "
        f"(LlamaForCausalLM) has no layer {misspelled!r}; did you mean 'lm_head'?"
    ) in capsys.readouterr().err


def test_check_with_the_models_accepts_the_heads(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check(folder, "lm_head", "lm_head", "--import") == 0
    assert capsys.readouterr().out.endswith("distill.toml: ok\n")


def test_check_without_the_teacher_leaves_the_head_names_unresolved(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check(folder, "lm_haed", "lm_head") == 0  # the teacher is not built without --import
    assert "shape probe: not run" in capsys.readouterr().out
