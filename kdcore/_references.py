"""``"module:qualname"`` references: resolving them, and deciding which ones may run.

In a user's own config every reference is resolved. While :func:`restoring` a checkpoint, a
reference is only used if the code it names is trusted: an ``nn.Module`` subclass, a callable a
plugin registered, one marked with :func:`teacher_factory`, or one named in ``trust=``; and
nothing is imported to find it unless it is trusted, since importing runs code: its module must
be imported already, and each name of the qualname is looked up in the attributes objects
already hold, never through a module's lazy ``__getattr__`` (torch imports ``torch._dynamo``
that way), a metaclass ``__getattr__`` or a property.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from torch import nn

from kdcore._errors import ConfigError, KDCoreError, did_you_mean, shown

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
            or _is_marked(obj)
            or self.registered(obj)
        )


def _is_marked(obj: Any) -> bool:
    """Whether ``obj`` carries the :func:`teacher_factory` mark, running none of its code (an
    object's ``__getattr__`` would run for a missing attribute)."""
    if type(obj) is types.MethodType:  # a bound classmethod: the mark is on its function
        obj = obj.__func__
    return inspect.getattr_static(obj, _TEACHER_FACTORY_MARK, False) is True


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
        raise ConfigError(f"{what} must look like 'package.module:name', got {shown(reference)}")
    module_name, qualname = reference.split(":")
    if _not_resolving.get() is not None:  # kd.check(imports=False): check the form, import nothing
        raise _not_resolved(reference, what)
    policy = _policy.get()
    if policy is None or reference in policy.trusted:
        return _import(module_name, qualname, reference, what=what)
    obj = _find_imported(module_name, qualname, reference, what=what)
    if not policy.allows(reference, obj):
        raise UntrustedReferenceError(
            f"the checkpoint names {what} {shown(reference)}, which is not an nn.Module class, not "
            "registered by a plugin and not marked @kd.teacher_factory; kdcore will not call it. "
            f"If you trust this file, pass trust=[{shown(reference)}] to kd.restore"
        )
    return obj


def _import(module_name: str, qualname: str, reference: str, *, what: str) -> Any:
    """The user's own reference (or a trusted one): import and look up as Python would."""
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import {shown(module_name)} for {what} {shown(reference)}: {exc}"
        ) from exc
    for part in qualname.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(
                f"{what} {shown(reference)}: {part!r} not found{did_you_mean(part, names)}"
            )
        obj = getattr(obj, part)
    return obj


def _find_imported(module_name: str, qualname: str, reference: str, *, what: str) -> Any:
    """A file's reference: found among what is already imported, importing and running nothing."""
    obj = sys.modules.get(module_name)
    if obj is None:
        raise UntrustedReferenceError(
            f"the checkpoint names {what} {shown(reference)}, whose module {shown(module_name)} "
            f"is not imported; kdcore does not import code a file names. Import it first, "
            f"or pass trust=[{shown(reference)}] to kd.restore"
        )
    parts = qualname.split(".")
    for depth, part in enumerate(parts):
        try:
            obj = _static_attribute(obj, part)
        except AttributeError:
            owner = f"{module_name}:{'.'.join(parts[:depth])}" if depth else module_name
            raise UntrustedReferenceError(
                f"the checkpoint names {what} {shown(reference)}, but {owner!r} has no attribute "
                f"{part!r} yet; getting it could import or run code (a lazy module attribute), "
                "and kdcore does not do that for a file. Import the code that defines it first, "
                f"or pass trust=[{shown(reference)}] to kd.restore"
            ) from None
    return obj


def _static_attribute(obj: Any, name: str) -> Any:
    """``getattr(obj, name)`` for attributes that exist already, without calling any code.

    A module's own dict only (not its ``__getattr__``, which may import); for other objects,
    what the class dicts hold (:func:`inspect.getattr_static`: no ``__getattr__``, no metaclass
    ``__getattr__``, a property is returned as the property object, which is then not trusted).
    Static and class methods are bound by hand, as Python's own descriptors would.
    """
    if isinstance(obj, types.ModuleType):
        try:
            return vars(obj)[name]
        except KeyError:
            raise AttributeError(name) from None
    value = inspect.getattr_static(obj, name)
    if isinstance(value, staticmethod):
        return value.__func__
    if isinstance(value, classmethod):
        owner = obj if isinstance(obj, type) else type(obj)
        return types.MethodType(value.__func__, owner)
    return value


class NotResolvedError(KDCoreError):
    """:func:`resolve` inside :func:`not_resolving`: the reference was checked, not imported."""

    def __init__(self, reference: str, what: str) -> None:
        self.reference = reference
        self.what = what
        super().__init__(f"{what} {shown(reference)} was not imported (checked with imports=False)")


_not_resolving: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "kdcore_not_resolving", default=None
)


@contextlib.contextmanager
def not_resolving() -> Iterator[list[str]]:
    """Inside the block, :func:`resolve` imports and returns nothing: it checks the form of the
    reference, adds ``"<what> '<reference>'"`` to the list this yields and raises
    :class:`NotResolvedError`, which the checks that can do without the object catch."""
    skipped: list[str] = []
    token = _not_resolving.set(skipped)
    try:
        yield skipped
    finally:
        _not_resolving.reset(token)


def _not_resolved(reference: str, what: str) -> NotResolvedError:
    module_name, qualname = reference.split(":")
    if not all(part.isidentifier() for part in module_name.split(".")) or not all(
        part.isidentifier() for part in qualname.split(".")
    ):
        raise ConfigError(f"{what} must look like 'package.module:name', got {shown(reference)}")
    skipped = _not_resolving.get()
    if skipped is not None and f"{what} {shown(reference)}" not in skipped:
        skipped.append(f"{what} {shown(reference)}")
    return NotResolvedError(reference, what)
