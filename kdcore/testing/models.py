"""Tiny models for contract checks, importable by reference (``kdcore.testing.models:TinyNet``)
so that a checkpoint written in one process can be restored in another. ``seed`` makes the
weights the same in every process (a teacher rebuilt from its spec must be the teacher saved)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def _initialised_from(seed: int | None) -> Iterator[None]:
    """Draw the initial weights from ``seed``, leaving the caller's random stream as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class TinyNet(nn.Module):
    """Two linear layers, ``fc1`` and ``fc2``; ``width`` tells a teacher from a student."""

    def __init__(
        self, width: int = 8, inputs: int = 4, classes: int = 3, seed: int | None = None
    ) -> None:
        super().__init__()
        with _initialised_from(seed):
            self.fc1 = nn.Linear(inputs, width)
            self.fc2 = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TinyConvNet(nn.Module):
    """A 3x3 convolution (the ``features`` layer, ``channels`` wide) and a linear head."""

    def __init__(self, channels: int = 4, classes: int = 2, seed: int | None = None) -> None:
        super().__init__()
        with _initialised_from(seed):
            self.features = nn.Conv2d(3, channels, kernel_size=3, padding=1)
            self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))
