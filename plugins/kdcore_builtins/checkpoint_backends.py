"""The built-in checkpoint backends (completed by the checkpoint work)."""

from __future__ import annotations

from typing import Any

import kdcore
from kdcore.registry import Registry


@kdcore.hookimpl
def kdcore_register_checkpoint_backends(registry: Registry[Any]) -> None:
    del registry  # the safetensors backend lands with kd.save/kd.restore
