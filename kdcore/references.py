"""``"module:qualname"`` references: resolving them, and deciding which ones may run.

In a user's own config every reference is resolved. While :func:`restoring` a checkpoint, a
reference is only used if the code it names is trusted: an ``nn.Module`` subclass, a callable a
plugin registered, one marked with :func:`teacher_factory`, or one named in ``trust=``; and
its module is imported only if it is already imported or trusted, since importing runs code.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from torch import nn

from kdcore.errors import ConfigError, KDCoreError, did_you_mean

F = TypeVar("F", bound=Callable[..., Any])

_TEACHER_FACTORY_MARK = "__kdcore_teacher_factory__"


class UntrustedReferenceError(KDCoreError, PermissionError):
    """A checkpoint names code that kdcore will not run without the user's say-so."""


def teacher_factory(fn: F) -> F:
    """Mark ``fn`` as safe for ``kd.restore`` to call when a checkpoint names it.

    ::

        @kd.teacher_factory
        def build_teacher(width=256):
            return Net(width).load_state_dict(...)
    """
    setattr(fn, _TEACHER_FACTORY_MARK, True)
    return fn


def reference_of(obj: Any) -> str | None:
    """``"module:qualname"`` for a named class or function, None for lambdas and local objects."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:  # <lambda>, <locals>
        return None
    return f"{module}:{qualname}"


class TrustPolicy:
    """Which references a restore may resolve."""

    def __init__(self, trust: Iterable[Any], registered: Callable[[Any], bool]) -> None:
        self.trusted: set[str] = set()
        for item in trust:
            reference = item if isinstance(item, str) else reference_of(item)
            if reference is None:
                raise ConfigError(
                    f"trust= entries are 'module:qualname' strings or named objects, got {item!r}"
                )
            self.trusted.add(reference)
        self.registered = registered

    def allows(self, reference: str, obj: Any) -> bool:
        return (
            reference in self.trusted
            or (isinstance(obj, type) and issubclass(obj, nn.Module))
            or getattr(obj, _TEACHER_FACTORY_MARK, False) is True
            or self.registered(obj)
        )


_policy: contextvars.ContextVar[TrustPolicy | None] = contextvars.ContextVar(
    "kdcore_trust_policy", default=None
)


@contextlib.contextmanager
def restoring(policy: TrustPolicy) -> Iterator[None]:
    """Inside the block, :func:`resolve` enforces ``policy``."""
    token = _policy.set(policy)
    try:
        yield
    finally:
        _policy.reset(token)


def resolve(reference: str, *, what: str) -> Any:
    """Import and return the object ``reference`` (``"package.module:qualname"``) names."""
    if not isinstance(reference, str) or reference.count(":") != 1:
        raise ConfigError(f"{what} must look like 'package.module:name', got {reference!r}")
    module_name, qualname = reference.split(":")
    policy = _policy.get()
    if policy is not None and module_name not in sys.modules and reference not in policy.trusted:
        raise UntrustedReferenceError(
            f"the checkpoint names {what} {reference!r}, whose module {module_name!r} is not "
            f"imported; kdcore does not import code a file names. Import {module_name} first, "
            f"or pass trust=[{reference!r}] to kd.restore"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {what} {reference!r}: {exc}") from exc
    for part in qualname.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(
                f"{what} {reference!r}: {part!r} not found{did_you_mean(part, names)}"
            )
        obj = getattr(obj, part)
    if policy is not None and not policy.allows(reference, obj):
        raise UntrustedReferenceError(
            f"the checkpoint names {what} {reference!r}, which is not an nn.Module class, not "
            "registered by a plugin and not marked @kd.teacher_factory; kdcore will not call it. "
            f"If you trust this file, pass trust=[{reference!r}] to kd.restore"
        )
    return obj
