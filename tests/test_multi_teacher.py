"""Several teachers: each with its own spec and pairs, all run before the student."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import kdcore as kd
from tests.conftest import TinyNet, make_teacher


def two_teacher_config(**overrides: object) -> dict[str, object]:
    return {
        "teacher_model": {"big": make_teacher, "small": (TinyNet, (), {"width": 8})},
        "criterion": {
            ("", "big"): kd.LogitsDistillationLoss(),
            ("fc2", "small.fc2"): kd.MSELoss(),
        },
        "loss_balancer": kd.StaticLossBalancer([0.25, 0.25]),
        **overrides,
    }


def test_every_teacher_runs_first_in_eval_mode_without_grad(batch: torch.Tensor) -> None:
    order: list[tuple[str, bool, bool]] = []
    model = kd.convert(TinyNet(), [("kd_loss", two_teacher_config())]).train()
    for key, teacher in model.teacher_model.items():
        teacher.register_forward_hook(
            lambda m, a, o, key=key: order.append((key, m.training, torch.is_grad_enabled()))
        )
    model.fc1.register_forward_hook(lambda m, a, o: order.append(("student", m.training, True)))
    model(batch)
    assert order == [("big", False, False), ("small", False, False), ("student", True, True)]


def test_loss_keys_name_the_teacher(batch: torch.Tensor) -> None:
    model = kd.convert(TinyNet(), [("kd_loss", two_teacher_config())])
    output = model(batch)
    losses = model.compute_kd_loss(student_loss=output.sum(), skip_balancer=True)
    assert list(losses) == ["student_loss", "LogitsDistillationLoss_big_0", "MSELoss_small_1"]
    big, small = model.teacher_model["big"], model.teacher_model["small"]
    with torch.no_grad():
        assert torch.allclose(
            losses["LogitsDistillationLoss_big_0"], kd.LogitsDistillationLoss()(output, big(batch))
        )
        assert torch.allclose(
            losses["MSELoss_small_1"], nn.functional.mse_loss(output, small(batch))
        )


def test_only_teacher_forward_returns_every_teachers_output(batch: torch.Tensor) -> None:
    model = kd.convert(TinyNet(), [("kd_loss", two_teacher_config())])
    with model.only_teacher_forward():
        outputs = model(batch)
    assert set(outputs) == {"big", "small"}


def test_whole_teacher_side_must_name_a_teacher() -> None:
    config = two_teacher_config(criterion=kd.LogitsDistillationLoss(), loss_balancer=None)
    with pytest.raises(
        kd.ConfigError,
        match=r"kd_loss\.criterion\.teacher: with several teachers, name one \(big, small\)",
    ):
        kd.convert(TinyNet(), [("kd_loss", config)])


def test_unknown_teacher_key_in_a_layer_name() -> None:
    config = two_teacher_config(criterion={("fc2", "smal.fc2"): kd.MSELoss()}, loss_balancer=None)
    with pytest.raises(kd.UnknownLayerError, match="no layer 'smal.fc2'; did you mean 'small.fc2'"):
        kd.convert(TinyNet(), [("kd_loss", config)])


def test_bad_teacher_keys() -> None:
    with pytest.raises(kd.ConfigError, match="teacher keys must be identifiers"):
        kd.convert(
            TinyNet(), [("kd_loss", two_teacher_config(teacher_model={"a.b": make_teacher}))]
        )


def test_save_and_restore_keep_all_teachers(tmp_path: Path, batch: torch.Tensor) -> None:
    model = kd.convert(TinyNet(), [("kd_loss", two_teacher_config())])
    path = kd.save(model, tmp_path / "two.safetensors")
    restored = kd.restore(TinyNet(), path)
    assert set(restored.teacher_model) == {"big", "small"}
    assert torch.equal(restored(batch), model(batch))
    expected = model.compute_kd_loss(student_loss=torch.tensor(0.5))
    assert torch.equal(restored.compute_kd_loss(student_loss=torch.tensor(0.5)), expected)
