"""Placeholder: filled in by the loss-catalog work."""

from __future__ import annotations

from typing import Any

import kdcore
from kdcore.registry import Registry


@kdcore.hookimpl
def kdcore_register_criteria(registry: Registry[Any]) -> None:
    del registry
