"""The criterion template: a cosine-distance loss that keeps every criterion contract."""

MODULE = '''\
"""kdcore criterion ``$name``: one minus the cosine similarity of the student's and the
teacher's outputs along the last dimension, per position, reduced."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kdcore
from kdcore.plugin import Registry
from kdcore.validation import IGNORE_INDEX, check_labels, check_reduction


class ${Name}Loss(nn.Module):
    """``1 - cos(student, teacher)`` per position; positions labelled ``-100`` do not count.

    kd.save records it as the user configured it (``{"name": "$name", "reduction": ...}``).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        # A kdcore error naming the bad value: from a config it also names the config path.
        self.reduction = check_reduction(reduction, allowed=("mean", "sum", "none"))

    def forward(
        self,
        student_output: torch.Tensor,
        teacher_output: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The teacher is not trained: never let a gradient reach its output.
        distance = 1 - F.cosine_similarity(student_output, teacher_output.detach(), dim=-1)
        if labels is not None:
            kept = check_labels(labels, "${Name}Loss") != IGNORE_INDEX
            distance = distance * kept
            count = kept.sum().clamp(min=1)
        else:
            count = torch.tensor(distance.numel())
        if self.reduction == "none":
            return distance
        total = distance.sum()
        return total if self.reduction == "sum" else total / count


@kdcore.hookimpl
def kdcore_register_criteria(registry: Registry[type[nn.Module]]) -> None:
    registry.add("$name", ${Name}Loss)
'''

TESTS = """\
import torch

from kdcore.testing import check_criterion
from $module import ${Name}Loss


def test_${name}_keeps_the_contracts_of_kdcores_criteria(kd_plugin_host):
    check_criterion("$name")


def test_parallel_outputs_cost_nothing():
    student = torch.randn(4, 3)
    assert ${Name}Loss()(student, 2 * student).item() < 1e-6
"""

USAGE = """\
Use it by name in a config, e.g. `criterion = { name = "$name" }` in a job file, or
`kd.convert(student, [("kd_loss", {"teacher_model": teacher, "criterion": {"name": "$name"}})])`.
"""
