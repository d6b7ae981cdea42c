"""Turning a ``teacher_model`` spec into the teacher ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from kdcore.converter import PLUGIN_NAME_KEY, check_kwargs, instantiate, is_plugin_ref
from kdcore.errors import ConfigError, ConfigTypeError, shown
from kdcore.plugin_manager import registries
from kdcore.references import NotResolvedError

SPEC_FORMS = (
    "an nn.Module, a class or callable returning one, a tuple (fn,), (fn, args) or "
    "(fn, args, kwargs), a teacher-loader mapping {'name': ..., ...}, or several teachers "
    "as {key: spec}"
)


class TeacherEnsemble(nn.ModuleDict):
    """Several teachers under their keys; ``forward`` runs each and returns ``{key: output}``.

    Criterion pairs name a teacher's layers with its key in front (``"big.fc2"``; ``"big"``
    is that teacher's output), and the loss keys carry it (``LogitsDistillationLoss_big_0``).
    """

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {key: teacher(*args, **kwargs) for key, teacher in self.items()}


def is_ensemble_spec(spec: Any) -> bool:
    """``{key: spec, ...}``: a mapping that is not a plugin reference (which has a 'name')."""
    return isinstance(spec, Mapping) and not is_plugin_ref(spec)


def ensemble_items(spec: Mapping[Any, Any], *, path: str) -> list[tuple[str, Any]]:
    if not spec:
        raise ConfigError("has no teachers; give one spec or {key: spec}", path=path)
    for key in spec:
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(
                f"teacher keys must be identifiers (they prefix layer names), got {shown(key)}; "
                "a teacher-loader mapping needs a 'name' key",
                path=path,
            )
    return list(spec.items())


def build_teacher(spec: Any, *, path: str) -> nn.Module:
    """Build the teacher described by ``spec``; ``path`` names the config key in errors."""
    if is_ensemble_spec(spec):
        return TeacherEnsemble(
            {
                key: build_teacher(item, path=f"{path}.{key}")
                for key, item in ensemble_items(spec, path=path)
            }
        )
    if isinstance(spec, nn.Module):
        return spec
    if is_plugin_ref(spec):
        teacher = instantiate(registries().teacher_loaders, spec, path=path)
        return _checked(teacher, f"teacher loader {spec['name']!r}", path)
    if spec is None:
        raise ConfigError("is required: " + SPEC_FORMS, path=path)
    if isinstance(spec, tuple):
        fn, args, kwargs = unpack_spec_tuple(spec, path=path)
    elif callable(spec):
        fn, args, kwargs = spec, (), {}
    else:
        raise ConfigTypeError(f"got {type(spec).__name__}; expected {SPEC_FORMS}", path=path)
    name = getattr(fn, "__qualname__", None) or shown(fn)
    return _checked(fn(*args, **kwargs), name, path)


def check_teacher_spec(spec: Any, *, path: str) -> str:
    """Check ``spec`` without building the teacher; return a one-line description of it."""
    if is_ensemble_spec(spec):
        return "; ".join(
            f"{key}: {check_teacher_spec(item, path=f'{path}.{key}')}"
            for key, item in ensemble_items(spec, path=path)
        )
    if isinstance(spec, nn.Module):
        return f"the given {type(spec).__name__} instance"
    if is_plugin_ref(spec):
        name = spec["name"]
        loader = registries().teacher_loaders.get(name, where=f"{path}.name")
        kwargs = {key: value for key, value in spec.items() if key != "name"}
        check_kwargs(loader, kwargs, path=path, what=f"teacher loader {name!r}")
        validate = getattr(loader, "validate", None)  # optional: check arguments without loading
        if validate is not None:
            try:
                validate(**kwargs)
            except NotResolvedError:  # kd.check(imports=False): what it names is not imported
                pass
            except ConfigError as exc:
                raise ConfigError(str(exc), path=path) from None
        return f"teacher loader {shown(name)} with {shown(kwargs)}"
    if spec is None:
        raise ConfigError("is required: " + SPEC_FORMS, path=path)
    fn, args, kwargs = (
        unpack_spec_tuple(spec, path=path) if isinstance(spec, tuple) else (spec, (), {})
    )
    if not callable(fn):
        raise ConfigTypeError(f"got {type(spec).__name__}; expected {SPEC_FORMS}", path=path)
    name = getattr(fn, "__qualname__", None) or shown(fn)
    return f"{name}(*{shown(list(args))}, **{shown(kwargs)})"


def canonical_loader_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A teacher-loader mapping as a checkpoint records it: through the loader's optional
    ``canonical(**kwargs)``, which gives the arguments a form that means the same from any
    directory (the ``transformers`` loader makes a relative folder absolute)."""
    name = spec[PLUGIN_NAME_KEY]
    loaders = registries().teacher_loaders
    canonical = getattr(loaders.get(name), "canonical", None) if name in loaders else None
    if canonical is None:
        return dict(spec)
    kwargs = {key: value for key, value in spec.items() if key != PLUGIN_NAME_KEY}
    return {PLUGIN_NAME_KEY: name, **canonical(**kwargs)}


def unpack_spec_tuple(spec: tuple[Any, ...], *, path: str) -> tuple[Any, Any, Any]:
    """``(fn,)``, ``(fn, args)`` or ``(fn, args, kwargs)`` -> ``(fn, args, kwargs)``, checked."""
    if not 1 <= len(spec) <= 3:
        raise ConfigError(
            f"a tuple spec has 1 to 3 items (fn, args, kwargs), got {len(spec)}", path=path
        )
    defaults: tuple[Any, ...] = ((), {})
    fn, args, kwargs = spec + defaults[len(spec) - 1 :]
    if not callable(fn):
        raise ConfigTypeError(f"first item must be callable, got {type(fn).__name__}", path=path)
    if not isinstance(args, (tuple, list)):
        raise ConfigTypeError(f"args must be a tuple or list, got {type(args).__name__}", path=path)
    if not isinstance(kwargs, Mapping):
        raise ConfigTypeError(f"kwargs must be a dict, got {type(kwargs).__name__}", path=path)
    return fn, tuple(args), dict(kwargs)


def _checked(teacher: object, source: str, path: str) -> nn.Module:
    if not isinstance(teacher, nn.Module):
        raise ConfigTypeError(
            f"{source} returned {type(teacher).__name__}, not an nn.Module", path=path
        )
    return teacher
