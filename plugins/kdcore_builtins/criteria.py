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

    The teacher's distribution ``p = softmax(t / T)`` is mixed with the one-hot label,
    ``q = p * (1 - m) + m * onehot(label)``, as the reference computes it. Where the teacher's
    argmax is not the label, ``m = (p_argmax - p_label + threshold) / (1 + p_argmax - p_label)``:
    the label then leads the argmax by ``threshold``. Where it is the label, the label's share
    rises to ``target = p_label + threshold`` (to 1 once ``p_label > 1 - threshold``):
    ``m = (target - p_label) / (1 - p_label)``. Both denominators carry the reference's ``1e-7``.
    The loss is ``KL(q || softmax(s / T)) * T**2`` over the positions whose label is not
    ``ignore_index``; ``"batchmean"`` divides by their count.
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
        """The target distribution ``q`` for ``[N, C]`` logits (already divided by ``T``)."""
        # Half-precision logits are corrected in float32, float64 ones in float64.
        dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
        probs = F.softmax(teacher_logits, dim=-1, dtype=dtype)
        p_label = probs.gather(-1, labels[:, None]).squeeze(-1)
        p_argmax, argmax = probs.max(-1)
        threshold = self.threshold
        label_target = torch.where(p_label > 1 - threshold, 1.0, p_label + threshold)
        mix = torch.where(
            argmax == labels,
            (label_target - p_argmax) / (1 - p_argmax + 1e-7),
            (p_argmax - p_label + threshold) / (1 + p_argmax - p_label + 1e-7),
        )
        corrected = (probs * (1 - mix[:, None])).scatter_add(-1, labels[:, None], mix[:, None])
        return corrected.to(teacher_logits.dtype)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, threshold={self.threshold}"


class MGDLoss(nn.Module):
    """Masked Generative Distillation (Yang et al., 2022, arXiv 2205.01529).

    The student's feature map (aligned to the teacher's channels by a 1x1 conv when the counts
    differ) is randomly masked at ``lambda_mgd`` of its spatial positions, a conv3x3-ReLU-conv3x3
    generator rebuilds the teacher's map from it, and the loss is
    ``alpha_mgd * mean((generated - teacher)**2)`` over all ``N*C*H*W`` elements, as the reference
    computes it (the MGD authors divide the sum by ``N``: their ``alpha_mgd`` times ``C*H*W`` is
    this one). Under one seed the mask is the reference's. Has learnable parameters.
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
        # Masked where u > 1 - lambda, as the reference draws it: the same seed, the same mask.
        drop = torch.rand(batch, 1, height, width, device=aligned.device) > 1 - self.lambda_mgd
        generated = self.generation(aligned * (~drop).to(aligned.dtype))
        return F.mse_loss(generated, teacher_output.detach()) * self.alpha_mgd

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
