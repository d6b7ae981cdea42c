"""The layerwise_kd mode: paired student layers learn on their teacher layers' inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdcore as kd


class Blocks(nn.Module):
    def __init__(self, width: int = 6, vocab: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.block1 = nn.Linear(width, width)
        self.block2 = nn.Linear(width, width)
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.block2(torch.tanh(self.block1(self.embed(x)))))


def layerwise(student: Blocks, teacher: Blocks, pairs: tuple[str, ...] = ("block2",)) -> nn.Module:
    criterion = {(name, name): kd.MSELoss() for name in pairs}
    balancer = kd.StaticLossBalancer([1 / len(pairs)] * len(pairs)) if len(pairs) > 1 else None
    return kd.convert(
        student,
        [
            (
                "layerwise_kd",
                {"teacher_model": teacher, "criterion": criterion, "loss_balancer": balancer},
            )
        ],
    )


def test_model_is_a_layerwise_distillation_model() -> None:
    model = layerwise(Blocks(), Blocks())
    assert isinstance(model, kd.LayerwiseDistillationModel)
    assert isinstance(model, kd.DistillationModel) and isinstance(model, Blocks)


def test_student_layer_receives_the_teacher_layers_input() -> None:
    teacher = Blocks()
    model = layerwise(Blocks(), teacher)
    seen: list[torch.Tensor] = []
    model.block2.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(3, 4)
    model(x)
    with torch.no_grad():
        teacher_input = torch.tanh(teacher.block1(teacher.embed(x)))
    # kdcore's pre-hook was registered first, so this later hook sees the replaced input
    assert torch.equal(seen[0], teacher_input)


def test_loss_compares_the_paired_layer_outputs() -> None:
    teacher = Blocks()
    model = layerwise(Blocks(), teacher)
    x = torch.randn(3, 4)
    model(x)
    with torch.no_grad():
        hidden = torch.tanh(teacher.block1(teacher.embed(x)))
        expected = F.mse_loss(model.block2(hidden), teacher.block2(hidden))
    assert torch.allclose(model.compute_kd_loss(), expected)


def test_only_paired_student_layers_are_trainable_and_export_restores_flags() -> None:
    student = Blocks()
    student.embed.weight.requires_grad_(False)  # a user choice that export must keep
    before = {n: p.requires_grad for n, p in student.named_parameters()}
    model = layerwise(student, Blocks(), pairs=("block1", "block2"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"block1.weight", "block1.bias", "block2.weight", "block2.bias"}
    exported = kd.export(model)
    assert {n: p.requires_grad for n, p in exported.named_parameters()} == before


def test_unpaired_lm_head_is_bypassed_while_training_and_restored_on_export() -> None:
    student = Blocks()
    head = student.lm_head
    model = layerwise(student, Blocks())
    x = torch.randn(2, 4)
    assert model(x).shape == (2, 6)  # hidden states, no vocabulary projection
    assert model.teacher_model(x).shape == (2, 6)
    assert "lm_head.weight" in model.state_dict()  # bypassed, not removed
    exported = kd.export(model)
    assert exported.lm_head is head
    assert exported(x).shape == (2, 5)


def test_layerwise_checkpoint_restores_into_a_fresh_student(tmp_path: Path) -> None:
    teacher = Blocks()
    model = layerwise(Blocks(), teacher)
    path = kd.save(model, tmp_path / "layerwise.safetensors")
    restored = kd.restore(Blocks(), path, teacher_model=Blocks())
    assert isinstance(restored, kd.LayerwiseDistillationModel)
    assert torch.equal(restored.lm_head.weight, model.lm_head.weight)
    x = torch.randn(3, 4)
    assert torch.equal(restored(x), model(x))


def test_paired_lm_head_is_kept() -> None:
    model = layerwise(Blocks(), Blocks(), pairs=("lm_head",))
    assert isinstance(model.lm_head, nn.Linear)


def test_only_student_forward_warns_and_uses_the_own_input() -> None:
    model = layerwise(Blocks(), Blocks())
    with model.only_student_forward(), pytest.warns(UserWarning, match="runs on its own input"):
        model(torch.randn(2, 4))


def test_a_training_step_changes_only_the_paired_layer() -> None:
    model = layerwise(Blocks(), Blocks()).train()
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(torch.randn(8, 4))
    model.compute_kd_loss().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"block2.weight", "block2.bias"}
