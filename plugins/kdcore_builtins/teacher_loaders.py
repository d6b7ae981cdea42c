"""The built-in teacher loaders: ``callable`` (any function or class named ``module:qualname``)
and ``cached`` (a teacher cache, :mod:`kdcore_builtins.cached_teacher`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

import kdcore
from kdcore import ConfigTypeError
from kdcore.plugin import Registry, resolve
from kdcore_builtins.cached_teacher import load_cached_teacher


def load_callable_teacher(
    target: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """Import ``target`` (``"package.module:qualname"``) and call it with ``args``/``kwargs``."""
    factory = resolve(target, what="teacher factory")
    if not callable(factory):
        raise ConfigTypeError(f"{target!r} is a {type(factory).__name__}, not callable")
    if not isinstance(args, (list, tuple)):
        raise ConfigTypeError(f"args must be a list, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigTypeError(f"kwargs must be a mapping, got {type(kwargs).__name__}")
    return factory(*args, **dict(kwargs or {}))  # type: ignore[no-any-return]


def validate_callable_teacher(
    target: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> None:
    """Check that ``target`` names a callable, without calling it (``kdcore check``)."""
    if not callable(resolve(target, what="teacher factory")):
        raise ConfigTypeError(f"{target!r} is not callable")


load_callable_teacher.validate = validate_callable_teacher  # type: ignore[attr-defined]


@kdcore.hookimpl
def kdcore_register_teacher_loaders(registry: Registry[Any]) -> None:
    registry.add("callable", load_callable_teacher)
    registry.add("cached", load_cached_teacher)
