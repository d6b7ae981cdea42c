"""The balancer template: the mean of the KD losses plus a weighted student loss."""

MODULE = '''\
"""kdcore loss balancer ``$name``: the mean of the KD losses plus ``student_weight`` times the
student's own loss."""

from __future__ import annotations

import torch

import kdcore
from kdcore.plugin import Registry
from kdcore.validation import check_non_negative


class ${Name}Balancer(kdcore.DistillationLossBalancer):
    """The mean of the KD losses plus ``student_weight`` times the student loss."""

    def __init__(self, student_weight: float = 0.5) -> None:
        super().__init__()
        self.student_weight = check_non_negative("student_weight", student_weight)

    @property
    def needs_student_loss(self) -> bool:
        return self.student_weight > 0

    def forward(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = dict(loss_dict)  # never change the caller's dict
        student_loss = self.pop_student_loss(losses)
        total = torch.stack(list(losses.values())).mean()
        if student_loss is not None:
            total = total + self.student_weight * student_loss
        return total


@kdcore.hookimpl
def kdcore_register_balancers(registry: Registry[type[kdcore.DistillationLossBalancer]]) -> None:
    registry.add("$name", ${Name}Balancer)
'''

TESTS = """\
import torch

from kdcore.testing import check_balancer
from $module import ${Name}Balancer


def test_${name}_keeps_the_contracts_of_kdcores_balancers(kd_plugin_host):
    check_balancer("$name", kwargs={"student_weight": 0.5})


def test_the_total_is_the_mean_plus_the_weighted_student_loss():
    balancer = ${Name}Balancer(student_weight=0.5)
    losses = {"student_loss": torch.tensor(4.0), "A_0": torch.tensor(1.0), "B_1": torch.tensor(3.0)}
    assert balancer(losses).item() == 2.0 + 0.5 * 4.0
"""

USAGE = """\
Use it by name in a config: `loss_balancer = { name = "$name", student_weight = 0.5 }`.
"""
