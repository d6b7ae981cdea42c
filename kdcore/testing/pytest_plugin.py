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
    import kdcore as kd

    host = kd.PluginHost(blocked=())
    with kd.use_host(host):
        yield host


@pytest.fixture
def kd_student() -> Any:
    from kdcore.testing.models import TinyNet

    return TinyNet(width=8, seed=0)


@pytest.fixture
def kd_teacher() -> Any:
    from kdcore.testing.models import TinyNet

    return TinyNet(width=16, seed=1)


@pytest.fixture
def kd_batch() -> Any:
    import torch

    return torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
