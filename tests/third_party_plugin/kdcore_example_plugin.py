"""An example kdcore plugin: registers the ``cosine`` criterion.

After ``pip install``, kdcore finds this module through the ``kdcore`` entry point declared in
``pyproject.toml``, and configs can name the loss::

    kd.convert(student, [("kd_loss", {"teacher_model": teacher, "criterion": {"name": "cosine"}})])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kdcore


class CosineLoss(nn.Module):
    """``1 - cosine_similarity(student, teacher)`` along the last dimension, averaged over the
    batch. The teacher side is detached: only the student learns."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        similarity = F.cosine_similarity(
            student_output, teacher_output.detach(), dim=-1, eps=self.eps
        )
        return (1 - similarity).mean()


@kdcore.hookimpl
def kdcore_register_criteria(registry: Any) -> None:
    registry.add("cosine", CosineLoss)
