"""Factories for tests/test_distributed.py's job (referenced as 'tests.distributed_job:...').

A 4-class problem in 6 dimensions, 60 training examples (so batches of 15 split 8 + 7 over two
processes), a student and a wider teacher made from fixed seeds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdcore as kd

JOB = """
[train]
student = "tests.distributed_job:student"
data = "tests.distributed_job:data"
optimizer = "{optimizer}"
learning_rate = 0.05
steps = {steps}
batch_size = 15
grad_accumulation = 2
output = "{output}"
checkpoint_every = {checkpoint_every}
log_every = 2
eval_every = 3
seed = 4
strategy = "{strategy}"

[kd_loss]
teacher_model = {{ name = "callable", target = "tests.distributed_job:teacher" }}
loss_balancer = {{ name = "static", kd_loss_weight = [0.5, 0.1] }}
[[kd_loss.criterion]]
student = ""
teacher = ""
loss = {{ name = "logits", temperature = 2.0 }}
[[kd_loss.criterion]]
student = "hidden"
teacher = "hidden"
loss = {{ name = "fitnet", student_width = 8, teacher_width = 24 }}
"""


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)))


def student() -> Net:
    return Net()


@kd.teacher_factory
def teacher() -> Net:
    torch.manual_seed(11)  # stands in for trained weights
    return Net(width=24)


def data() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(80, 6, generator=generator)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return TensorDataset(x[:60], y[:60]), TensorDataset(x[60:], y[60:])
