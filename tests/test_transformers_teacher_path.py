"""The ``transformers`` teacher loader and folders: a teacher named by a path relative to the
current directory (``"path": "teacher"``, as the how-to writes it) is recorded as the absolute
folder, so ``kd.restore`` loads it from any directory, and a recorded folder that is gone is an
error naming it and the checkpoint, never a hub lookup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import kdcore as kd
from kdcore.cli import main

transformers = pytest.importorskip("transformers")

from tests.test_transformers_plugin import tiny_llama  # noqa: E402


@pytest.fixture
def run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory, holding the teacher save_pretrained wrote as ``teacher/``."""
    folder = tmp_path / "run"
    folder.mkdir()
    monkeypatch.chdir(folder)
    tiny_llama(hidden=64, seed=1).save_pretrained(folder / "teacher")
    return folder


def distil_and_save(teacher_path: str) -> Any:
    spec = {"name": "transformers", "path": teacher_path, "dtype": "float32"}
    model = kd.convert(
        tiny_llama(), [("kd_loss", {"teacher_model": spec, "criterion": {"name": "forward_kl"}})]
    )
    kd.save(model, "run.safetensors")
    return model


def recorded_teacher(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    capsys.readouterr()
    assert main(["inspect", str(checkpoint), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["manifest"]["modes"][0]["config"]["teacher_model"]


@pytest.mark.parametrize("written", ["teacher", "./teacher", "../run/teacher/"])
def test_a_relative_teacher_folder_is_recorded_absolute(
    run_folder: Path, written: str, capsys: pytest.CaptureFixture[str]
) -> None:
    distil_and_save(written)
    assert recorded_teacher(run_folder / "run.safetensors", capsys) == {
        "name": "transformers",
        "path": str(run_folder / "teacher"),
        "dtype": "float32",
    }


def test_kd_restore_from_another_directory_loads_the_recorded_folder(
    run_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = distil_and_save("teacher")
    elsewhere = run_folder.parent / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    restored = kd.restore(tiny_llama(seed=2), run_folder / "run.safetensors")
    assert torch.equal(restored.teacher_model.lm_head.weight, model.teacher_model.lm_head.weight)


def test_a_recorded_folder_that_is_gone_is_an_error_naming_it_and_the_checkpoint(
    run_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    distil_and_save("teacher")
    shutil.move(run_folder / "teacher", run_folder / "moved")

    def no_hub(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"from_pretrained{args} was called: a local folder went to the hub")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    checkpoint = run_folder / "run.safetensors"
    with pytest.raises(kd.ConfigError) as caught:
        kd.restore(tiny_llama(seed=2), checkpoint)
    message = str(caught.value)
    assert message.startswith(f"{checkpoint}: kd_loss.teacher_model: ")
    assert f"path {str(run_folder / 'teacher')!r}: no such folder" in message


def test_a_hub_id_is_recorded_as_written() -> None:
    loader = kd.registries().teacher_loaders.get("transformers")
    spec = {"path": "owner/model", "revision": "main"}
    assert loader.canonical(**spec) == spec
