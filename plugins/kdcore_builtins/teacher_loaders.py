"""The built-in teacher loader: ``callable`` (any function or class named ``module:qualname``)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

import kdcore
from kdcore.errors import ConfigError, ConfigTypeError, did_you_mean
from kdcore.registry import Registry


def load_callable_teacher(
    target: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """Import ``target`` (``"package.module:qualname"``) and call it with ``args``/``kwargs``."""
    factory = resolve_target(target)
    if not callable(factory):
        raise ConfigTypeError(f"{target!r} is a {type(factory).__name__}, not callable")
    if not isinstance(args, (list, tuple)):
        raise ConfigTypeError(f"args must be a list, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigTypeError(f"kwargs must be a mapping, got {type(kwargs).__name__}")
    return factory(*args, **dict(kwargs or {}))  # type: ignore[no-any-return]


def resolve_target(target: str) -> Any:
    """``"pkg.mod:Outer.inner"`` -> the object; errors name the part that was not found."""
    if not isinstance(target, str) or target.count(":") != 1:
        raise ConfigError(f"target must look like 'package.module:name', got {target!r}")
    module_name, qualname = target.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} (from target {target!r}): {exc}") from exc
    for part in qualname.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(f"{target!r}: {part!r} not found{did_you_mean(part, names)}")
        obj = getattr(obj, part)
    return obj


@kdcore.hookimpl
def kdcore_register_teacher_loaders(registry: Registry[Any]) -> None:
    registry.add("callable", load_callable_teacher)
