"""kdcore's pytest plugin (entry point ``pytest11``): fixtures for testing kdcore plugins.

It is loaded by every pytest run in an environment where kdcore is installed, so it imports
nothing until a fixture is used.

``kd_plugin_host``
    a fresh plugin host over the installed entry points (``$KDCORE_DISABLE_PLUGINS`` ignored),
    current for the test: plugins registered by one test do not leak into the next.
``kd_student``, ``kd_teacher``, ``kd_batch``
    a tiny MLP student (4 -> 8 -> 3), a wider teacher (4 -> 16 -> 3, fixed weights) and a batch
    of 5 inputs for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def kd_plugin_host() -> Iterator[Any]:
    """A fresh plugin host over the installed entry points, current for the test."""
    import kdcore as kd

    host = kd.PluginHost(blocked=())
    with kd.use_host(host):
        yield host


@pytest.fixture
def kd_student() -> Any:
    """A tiny MLP student: ``TinyNet(width=8)``, 4 inputs -> 8 -> 3 classes, seeded."""
    from kdcore.testing.models import TinyNet

    return TinyNet(width=8, seed=0)


@pytest.fixture
def kd_teacher() -> Any:
    """A wider tiny MLP teacher: ``TinyNet(width=16, seed=1)``, the same weights every time."""
    from kdcore.testing.models import TinyNet

    return TinyNet(width=16, seed=1)


@pytest.fixture
def kd_batch() -> Any:
    """A batch of 5 inputs for them: a ``[5, 4]`` float tensor, seeded."""
    import torch

    return torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
