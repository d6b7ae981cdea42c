"""The built-in loss balancer: ``static``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

import kdcore
from kdcore.balancer import DistillationLossBalancer, StudentLossWeightWarning
from kdcore.registry import Registry


class StaticLossBalancer(DistillationLossBalancer):
    """Fixed weights: ``total = sum(w_i * kd_loss_i) + (1 - sum(w)) * student_loss``.

    ``kd_loss_weight`` is one number (a single KD loss) or one number per KD loss in criterion
    order; weights are >= 0 and sum to at most 1. When they sum to less than 1 the remainder
    weighs ``student_loss``, which ``compute_kd_loss`` must then receive.
    """

    def __init__(self, kd_loss_weight: float | Sequence[float] = 0.5) -> None:
        super().__init__()
        self.kd_loss_weight = kd_loss_weight
        self.weights = _checked_weights(kd_loss_weight)
        # Sums a rounding error above 1 are accepted as 1: the student weight is never negative.
        self.student_loss_weight = max(0.0, 1.0 - math.fsum(self.weights))
        if self.student_loss_weight > 0:
            warnings.warn(
                f"kd_loss_weight sums to {math.fsum(self.weights):g} < 1: the remaining "
                f"{self.student_loss_weight:g} weighs student_loss, so pass "
                "compute_kd_loss(student_loss=...)",
                StudentLossWeightWarning,
                stacklevel=2,
            )

    def check_kd_losses(self, names: Sequence[str]) -> None:
        if len(names) != len(self.weights):
            raise ValueError(
                f"kd_loss_weight={self.kd_loss_weight!r} gives {len(self.weights)} weight(s) but "
                f"there are {len(names)} KD losses ({', '.join(names)}); give one weight per loss"
            )

    def forward(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = dict(loss_dict)
        student_loss = self.pop_student_loss(losses)
        self.check_kd_losses(list(losses))
        total: Any = sum(w * loss for w, loss in zip(self.weights, losses.values(), strict=True))
        if student_loss is not None:
            total = total + self.student_loss_weight * student_loss
        elif self.student_loss_weight > 0:
            raise ValueError(
                f"the KD weights sum to {1 - self.student_loss_weight:g}, so "
                f"{self.student_loss_weight:g} of the total is student_loss, but "
                "compute_kd_loss got no student_loss"
            )
        return total  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"kd_loss_weight={self.kd_loss_weight!r}"


def _checked_weights(kd_loss_weight: Any) -> list[float]:
    values = kd_loss_weight if isinstance(kd_loss_weight, (list, tuple)) else [kd_loss_weight]
    if not values:
        raise ValueError("kd_loss_weight is empty; give one weight per KD loss")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"kd_loss_weight must be numbers, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"kd_loss_weight must be finite and >= 0, got {value!r}")
    weights = [float(v) for v in values]
    if math.fsum(weights) > 1 + 1e-9:
        raise ValueError(f"kd_loss_weight must sum to at most 1, got {kd_loss_weight!r}")
    return weights


@kdcore.hookimpl
def kdcore_register_balancers(registry: Registry[Any]) -> None:
    registry.add("static", StaticLossBalancer)
