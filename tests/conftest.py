"""Shared fixtures: tiny models built from code, and plugin hosts made fresh per test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdcore as kd


class TinyNet(nn.Module):
    """Two linear layers; ``width`` tells teachers from students."""

    def __init__(self, width: int = 8, inputs: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, width)
        self.fc2 = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * scale


@kd.teacher_factory
def make_teacher() -> TinyNet:
    """A named teacher factory (module-level, so it can be referenced by 'module:qualname')."""
    torch.manual_seed(1)
    return TinyNet(width=16)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def student() -> TinyNet:
    return TinyNet()


@pytest.fixture
def teacher() -> TinyNet:
    return make_teacher()


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(5, 4)


@pytest.fixture
def builtin_host() -> kd.PluginHost:
    """A fresh host over the installed entry points (ignoring $KDCORE_DISABLE_PLUGINS),
    made current for the test."""
    host = kd.PluginHost(blocked=())
    with kd.use_host(host):
        yield host
