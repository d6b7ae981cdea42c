"""The built-in criteria: ``logits``, ``mft``, ``mgd`` and ``mse``."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kdcore
from kdcore.plugin import Registry
from kdcore.validation import (
    IGNORE_INDEX,
    as_logits,
    check_ignore_index,
    check_labels,
    check_number,
    check_positive_int,
    check_reduction,
    check_temperature,
    check_unit_interval,
)
from kdcore_builtins.divergences import ForwardKLLoss


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student output {tuple(student.shape)} and teacher output "
            f"{tuple(teacher.shape)} differ in shape"
        )


class LogitsDistillationLoss(ForwardKLLoss):
    """Soft-label KD (Hinton et al., 2015, arXiv 1503.02531).

    ``KL(softmax(t / T) || softmax(s / T)) * T**2``, as ``F.kl_div`` computes it with ``reduction``
    (``"mean"`` averages over every element, classes included, as PyTorch does); with
    ``"none"`` the result is summed over the class dimension: one loss per position.

    Computed in row chunks by a custom autograd function (no ``[N, V]`` float32 temporaries
    beyond the gradient; half-precision logits are upcast a chunk at a time); ``labels=``
    (positions labelled -100 are left out) and ``num_items_in_batch=`` work as described in
    :mod:`kdcore_builtins.divergences`. The constructor keeps the reference's two arguments; the
    ``forward_kl`` criterion is the same divergence with a custom ``ignore_index`` and
    ``vocab_alignment`` for padded vocabularies.
    """

    _vocab_hint = "use the 'forward_kl' criterion with vocab_alignment='truncate' or 'mask'"

    def __init__(self, temperature: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(temperature, reduction)


class MFTLoss(nn.Module):
    """Minifinetuning loss (arXiv 2506.15702): KD towards a label-corrected teacher.

    The teacher's distribution ``p = softmax(t / T)`` is corrected wherever the label does not lead
    every other class by ``threshold``: the other classes are scaled by
    ``a = (1 - threshold) / (1 - p_label + p_max_other)`` and the label takes the freed mass, so
    that it leads by exactly ``threshold``. The loss is ``KL(q || softmax(s / T)) * T**2`` over the
    positions whose label is not ``ignore_index``; ``"batchmean"`` divides by their count.
    ``forward(student, teacher, labels)``; logits are flattened to ``[N, C]``, and with
    ``"none"`` the per-position losses come back in the logits' leading shape (0 where ignored).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        threshold: float = 0.2,
        reduction: str = "batchmean",
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.threshold = check_unit_interval("threshold", threshold, upper_open=True)
        self.reduction = check_reduction(reduction)
        self.ignore_index = check_ignore_index(ignore_index)

    def forward(
        self, student_output: Any, teacher_output: Any, labels: torch.Tensor
    ) -> torch.Tensor:
        student = as_logits(student_output, "student")
        teacher = as_logits(teacher_output, "teacher")
        _check_same_shape(student, teacher, type(self).__name__)
        check_labels(labels, "MFTLoss")
        positions_shape = student.shape[:-1]
        classes = student.shape[-1]
        student, teacher = student.reshape(-1, classes), teacher.reshape(-1, classes)
        labels = labels.reshape(-1)
        if labels.shape[0] != student.shape[0]:
            raise ValueError(f"MFTLoss: {labels.shape[0]} labels for {student.shape[0]} positions")
        valid = labels != self.ignore_index
        student, teacher, labels = student[valid], teacher[valid], labels[valid]
        if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(
                f"MFTLoss: labels must lie in [0, {classes}) or be {self.ignore_index}"
            )
        target = self.corrected_teacher(teacher.detach() / self.temperature, labels)
        log_student = F.log_softmax(student / self.temperature, dim=-1)
        per_position = F.kl_div(log_student, target, reduction="none").sum(-1)
        per_position = per_position * self.temperature**2
        if self.reduction == "none":
            full = per_position.new_zeros(valid.shape[0])
            return full.masked_scatter(valid, per_position).reshape(positions_shape)
        if self.reduction == "sum":
            return per_position.sum()
        if self.reduction == "batchmean":
            return per_position.sum() / max(int(valid.sum()), 1)
        return per_position.sum() / max(per_position.numel() * classes, 1)

    def corrected_teacher(self, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(teacher_logits.float(), dim=-1)
        label_mask = F.one_hot(labels, probs.shape[-1]).bool()
        p_label = probs.gather(-1, labels[:, None]).squeeze(-1)
        p_other_max = probs.masked_fill(label_mask, -1.0).amax(-1)
        needs_correction = p_label - p_other_max < self.threshold
        scale = (1 - self.threshold) / (1 - p_label + p_other_max)
        scale = torch.where(needs_correction, scale, torch.ones_like(scale))
        corrected = probs * scale[:, None]
        corrected = torch.where(label_mask, (1 - scale * (1 - p_label))[:, None], corrected)
        # Rows whose label already leads by ``threshold`` stay exactly the teacher's distribution.
        corrected = torch.where(needs_correction[:, None], corrected, probs)
        return corrected.to(teacher_logits.dtype)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, threshold={self.threshold}"


class MGDLoss(nn.Module):
    """Masked Generative Distillation (Yang et al., 2022, arXiv 2205.01529).

    The student's feature map (aligned to the teacher's channels by a 1x1 conv when the counts
    differ) is randomly masked at ``lambda_mgd`` of its spatial positions, a conv3x3-ReLU-conv3x3
    generator rebuilds the teacher's map from it, and the loss is
    ``alpha_mgd * sum((generated - teacher)**2) / N``. Has learnable parameters.
    """

    def __init__(
        self,
        num_student_channels: int,
        num_teacher_channels: int,
        alpha_mgd: float = 1.0,
        lambda_mgd: float = 0.65,
    ) -> None:
        super().__init__()
        self.num_student_channels = check_positive_int("num_student_channels", num_student_channels)
        self.num_teacher_channels = check_positive_int("num_teacher_channels", num_teacher_channels)
        self.alpha_mgd = check_number("alpha_mgd", alpha_mgd)
        if not math.isfinite(self.alpha_mgd):
            raise ValueError(f"alpha_mgd must be finite, got {alpha_mgd!r}")
        self.lambda_mgd = check_unit_interval("lambda_mgd", lambda_mgd)
        self.align: nn.Module = (
            nn.Conv2d(num_student_channels, num_teacher_channels, kernel_size=1)
            if num_student_channels != num_teacher_channels
            else nn.Identity()
        )
        self.generation = nn.Sequential(
            nn.Conv2d(num_teacher_channels, num_teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_teacher_channels, num_teacher_channels, kernel_size=3, padding=1),
        )

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        if student_output.dim() != 4 or teacher_output.dim() != 4:
            raise ValueError(
                f"MGDLoss expects [N, C, H, W] feature maps, got student "
                f"{tuple(student_output.shape)} and teacher {tuple(teacher_output.shape)}"
            )
        if student_output.shape[1] != self.num_student_channels:
            raise ValueError(
                f"MGDLoss was built for {self.num_student_channels} student channels, got student "
                f"features {tuple(student_output.shape)}"
            )
        aligned = self.align(student_output)
        if aligned.shape != teacher_output.shape:
            raise ValueError(
                f"MGDLoss: aligned student features {tuple(aligned.shape)} do not match teacher "
                f"features {tuple(teacher_output.shape)}"
            )
        batch, _, height, width = aligned.shape
        # P(rand < lambda) = lambda: exactly none masked at 0, all at 1.
        keep = torch.rand(batch, 1, height, width, device=aligned.device) >= self.lambda_mgd
        generated = self.generation(aligned * keep.to(aligned.dtype))
        loss = F.mse_loss(generated, teacher_output.detach(), reduction="sum") / batch
        return loss * self.alpha_mgd

    def extra_repr(self) -> str:
        return f"alpha_mgd={self.alpha_mgd}, lambda_mgd={self.lambda_mgd}"


class MSELoss(nn.MSELoss):
    """Mean squared error between paired outputs (FitNets-style hint loss when shapes match)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction=check_reduction(reduction, ("mean", "sum", "none")))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        _check_same_shape(student_output, teacher_output, type(self).__name__)
        return super().forward(student_output, teacher_output.detach())


@kdcore.hookimpl
def kdcore_register_criteria(registry: Registry[Any]) -> None:
    registry.add("logits", LogitsDistillationLoss)
    registry.add("mft", MFTLoss)
    registry.add("mgd", MGDLoss)
    registry.add("mse", MSELoss)
