"""What a checkpoint records of a distillation config: what the user wrote, as data."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import kdcore as kd
import kdcore.cli
from kdcore.plugin import ModeRecord, Recordable
from tests.conftest import TinyNet, crafted_manifest, make_teacher, write_raw


def manifest_modes(path: Path) -> list[dict[str, Any]]:
    with safe_open(str(path), "pt") as file:
        return json.loads(file.metadata()["kdcore"])["modes"]  # type: ignore[no-any-return]


class ScaledMSE(nn.Module):
    """Keeps no attribute named after its argument: reflection could not record it."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.register_buffer("factor", torch.tensor(weight))

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(s, t) * self.factor


class DeclaredMSE(ScaledMSE):
    def kdcore_config(self) -> dict[str, Any]:
        return {"weight": float(self.factor)}


def test_a_plugin_reference_is_recorded_as_written(tmp_path: Path, batch: torch.Tensor) -> None:
    loss = {"name": "tests.test_records:ScaledMSE", "weight": 0.5}
    model = kd.convert(TinyNet(), [("kd_loss", {"teacher_model": make_teacher, "criterion": loss})])
    with warnings.catch_warnings():
        warnings.simplefilter("error", kd.NotRecordableWarning)
        path = kd.save(model, tmp_path / "run.safetensors")
    assert manifest_modes(path)[0]["config"]["criterion"][0]["loss"] == loss
    restored = kd.restore(TinyNet(), path)
    model(batch)
    restored(batch)
    assert torch.equal(restored.compute_kd_loss(), model.compute_kd_loss())


def test_an_instance_declaring_its_config_is_recorded_by_it(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    loss = DeclaredMSE(0.25)
    assert isinstance(loss, Recordable)
    model = kd.convert(TinyNet(), [("kd_loss", {"teacher_model": make_teacher, "criterion": loss})])
    with warnings.catch_warnings():
        warnings.simplefilter("error", kd.NotRecordableWarning)
        path = kd.save(model, tmp_path / "run.safetensors")
    assert manifest_modes(path)[0]["config"]["criterion"][0]["loss"] == {
        "name": "tests.test_records:DeclaredMSE",
        "weight": 0.25,
    }
    restored = kd.restore(TinyNet(), path)
    assert float(restored.loss_modules[0].factor) == 0.25


def test_convert_does_not_warn_about_what_only_a_save_would_need(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", kd.NotRecordableWarning)
        model = kd.convert(
            TinyNet(), [("kd_loss", {"teacher_model": TinyNet(16), "criterion": ScaledMSE(0.5)})]
        )
    with pytest.warns(kd.NotRecordableWarning, match=r"kd_loss\.criterion\[0\]\.loss") as caught:
        path = kd.save(model, tmp_path / "run.safetensors")
    assert any("kd_loss.teacher_model" in str(w.message) for w in caught)
    missing = manifest_modes(path)[0]["missing"]
    assert [where for where, _ in missing] == ["kd_loss.teacher_model", "kd_loss.criterion[0].loss"]


@pytest.mark.parametrize(
    "spec",
    [
        (nn.Linear, (4, 3)),
        {
            "name": "callable",
            "target": "torch.nn:Linear",
            "kwargs": {"in_features": 4, "out_features": 3},
        },
    ],
    ids=["tuple", "loader"],
)
def test_a_linear_teacher_given_as_a_spec_is_recorded_and_rebuilt(
    spec: Any, tmp_path: Path, batch: torch.Tensor
) -> None:
    model = kd.convert(
        nn.Linear(4, 3), [("kd_loss", {"teacher_model": spec, "criterion": kd.MSELoss()})]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", kd.NotRecordableWarning)
        path = kd.save(model, tmp_path / "run.safetensors")
    restored = kd.restore(nn.Linear(4, 3), path)
    assert isinstance(restored.teacher_model, nn.Linear)
    assert restored.teacher_model.weight.shape == (3, 4)


class Counted(nn.Module):
    built = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).built += 1

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(s, t)


def test_each_object_is_built_once_per_convert_and_per_restore(tmp_path: Path) -> None:
    Counted.built = 0
    config = {"teacher_model": make_teacher, "criterion": {"name": "tests.test_records:Counted"}}
    model = kd.convert(TinyNet(), [("kd_loss", config)])
    assert Counted.built == 1
    kd.restore(TinyNet(), kd.save(model, tmp_path / "run.safetensors"))
    assert Counted.built == 2


def test_check_refuses_what_convert_refuses() -> None:
    config = {
        "teacher_model": {"a": make_teacher, "b": make_teacher},
        "criterion": kd.MSELoss(),  # '' names neither teacher
        "loss_balancer": None,
    }
    with pytest.raises(kd.ConfigError, match=r"kd_loss\.criterion\.teacher: with several teachers"):
        kd.convert(TinyNet(), [("kd_loss", config)])
    with pytest.raises(kd.ConfigError, match=r"kd_loss\.criterion\.teacher: with several teachers"):
        kd.check([("kd_loss", config)])


@pytest.mark.parametrize(
    ("key", "value"), [("student_class", 5), ("kdcore_version", ["0.1.0"])], ids=str
)
def test_every_manifest_key_is_checked_against_its_type(
    key: str, value: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_raw(
        tmp_path / "damaged.safetensors",
        TinyNet().state_dict(),
        {"kdcore": json.dumps(crafted_manifest(**{key: value}))},
    )
    with pytest.raises(kd.CheckpointFormatError, match=f"manifest '{key}' has the wrong type"):
        kd.restore(TinyNet(), path)
    kdcore.cli.main(["inspect", str(path)])
    assert f"manifest '{key}' has the wrong type" in capsys.readouterr().out


def test_a_saved_manifest_reads_back_as_the_records_written(tmp_path: Path) -> None:
    loss = {"name": "mse", "reduction": "sum"}
    model = kd.convert(TinyNet(), [("kd_loss", {"teacher_model": make_teacher, "criterion": loss})])
    path = kd.save(model, tmp_path / "run.safetensors")
    (mode,) = manifest_modes(path)
    assert ModeRecord(**{**mode, "missing": ()}) == model.mode_records[0]
    assert mode["config"]["criterion"] == [{"student": "", "teacher": "", "loss": loss}]
