"""kdcore check CONFIG and kdcore inspect PATH."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import kdcore as kd
from kdcore.cli import main
from tests.conftest import TinyNet
from tests.test_config_files import TOML


def test_check_prints_what_would_be_built(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "distill.toml"
    path.write_text(TOML)
    assert main(["check", str(path), "--student", "tests.conftest:TinyNet"]) == 0
    out = capsys.readouterr().out
    assert "LogitsDistillationLoss_0: student '<output>' <- teacher '<output>'" in out
    assert out.rstrip().endswith(f"{path}: ok")


def test_check_names_the_file_and_the_bad_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "distill.toml"
    path.write_text(TOML.replace("temperature", "temprature"))
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"kdcore check: error: {path}: kd_loss.criterion[0].loss.temprature: unknown key" in err


def test_check_against_the_student_finds_bad_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "distill.toml"
    path.write_text(TOML.replace('student = "fc2"', 'student = "fc9"'))
    assert main(["check", str(path)]) == 0  # without a student, layer names cannot be checked
    assert main(["check", str(path), "--student", "tests.conftest:TinyNet"]) == 1
    assert "has no layer 'fc9'" in capsys.readouterr().err


def test_inspect_prints_modes_and_tensor_groups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = kd.convert(TinyNet(), kd.load_config(_write(tmp_path, TOML)))
    path = kd.save(model, tmp_path / "run.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mode kd_loss" in out
    assert '{"name": "callable", "target": "tests.conftest:make_teacher"}' in out
    assert "criterion[1]: student 'fc2' <- teacher 'fc2': {\"name\": \"mse\"" in out
    assert re.search(r"student +4 +67 ", out)
    assert main(["inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensor_groups"]["student"]["tensors"] == 4


def test_inspect_refuses_a_pickle_without_loading_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(1)}, path)
    assert main(["inspect", str(path)]) == 1
    assert "zip archive" in capsys.readouterr().err


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "distill.toml"
    path.write_text(text)
    return path


JOB_TRAIN = """
[train]
student = "tests.conftest:TinyNet"
data = "tests.distributed_job:data"
steps = 20
batch_size = 16
"""


def test_check_accepts_a_distill_job_file_and_checks_its_train_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(TOML + JOB_TRAIN)
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "LogitsDistillationLoss_0" in out  # the modes, as for a plain config
    assert "[train] tests.conftest:TinyNet on tests.distributed_job:data" in out
    assert "20 steps, batch 16" in out
    path.write_text(TOML + JOB_TRAIN.replace("batch_size = 16", "batch_size = 0"))
    assert main(["check", str(path)]) == 1
    assert f"{path}: train.batch_size: must be at least 1, got 0" in capsys.readouterr().err


def test_check_with_import_finds_factories_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As kdcore distill does: `models:build_teacher` next to the config, run from that folder."""
    (tmp_path / "kdcore_check_models.py").write_text(
        "from tests.conftest import TinyNet, make_teacher\n"
        "def build_teacher():\n    return make_teacher()\n"
    )
    config = tmp_path / "distill.toml"
    config.write_text(
        TOML.replace("tests.conftest:make_teacher", "kdcore_check_models:build_teacher")
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "kdcore_check_models", raising=False)
    assert (
        main(["check", "distill.toml", "--import", "--student", "kdcore_check_models:TinyNet"]) == 0
    )
    assert capsys.readouterr().out.endswith("distill.toml: ok\n")
    sys.modules.pop("kdcore_check_models", None)
