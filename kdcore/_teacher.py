"""Turning a ``teacher_model`` spec into the teacher ``nn.Module``."""

from __future__ import annotations

from typing import Any

from torch import nn

from kdcore._config import PluginRef, TeacherCall
from kdcore._converter import check_kwargs, instantiate, teacher_spec
from kdcore._errors import ConfigError, ConfigTypeError, shown
from kdcore._plugin_manager import registries
from kdcore._references import NotResolvedError


class TeacherEnsemble(nn.ModuleDict):
    """Several teachers under their keys; ``forward`` runs each and returns ``{key: output}``.

    Criterion pairs name a teacher's layers with its key in front (``"big.fc2"``; ``"big"``
    is that teacher's output), and the loss keys carry it (``LogitsDistillationLoss_big_0``).
    """

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {key: teacher(*args, **kwargs) for key, teacher in self.items()}


def build_teacher(spec: Any, *, path: str) -> nn.Module:
    """Build the teacher described by ``spec`` (any accepted form; see
    :func:`kdcore._converter.teacher_spec`); ``path`` names the config key in errors."""
    return _build(teacher_spec(spec, path=path), path)


def _build(spec: Any, path: str) -> nn.Module:
    if isinstance(spec, dict):
        return TeacherEnsemble({key: _build(item, f"{path}.{key}") for key, item in spec.items()})
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, PluginRef):
        teacher = instantiate(registries().teacher_loaders, spec, path=path)
        return _checked(teacher, f"teacher loader {spec.name!r}", path)
    call: TeacherCall = spec
    name = getattr(call.fn, "__qualname__", None) or shown(call.fn)
    return _checked(call.fn(*call.args, **call.kwargs), name, path)


def check_teacher_spec(spec: Any, *, path: str) -> str:
    """Check ``spec`` without building the teacher; return a one-line description of it."""
    return _describe(teacher_spec(spec, path=path), path)


def _describe(spec: Any, path: str) -> str:
    if isinstance(spec, dict):
        return "; ".join(f"{key}: {_describe(item, f'{path}.{key}')}" for key, item in spec.items())
    if isinstance(spec, nn.Module):
        return f"the given {type(spec).__name__} instance"
    if isinstance(spec, PluginRef):
        loader = registries().teacher_loaders.get(spec.name, where=f"{path}.name")
        check_kwargs(loader, spec.kwargs, path=path, what=f"teacher loader {spec.name!r}")
        validate = getattr(loader, "validate", None)  # optional: check arguments without loading
        if validate is not None:
            try:
                validate(**spec.kwargs)
            except NotResolvedError:  # kd.check(imports=False): what it names is not imported
                pass
            except ConfigError as exc:
                raise ConfigError(str(exc), path=path) from None
        return f"teacher loader {shown(spec.name)} with {shown(spec.kwargs)}"
    call: TeacherCall = spec
    name = getattr(call.fn, "__qualname__", None) or shown(call.fn)
    return f"{name}(*{shown(list(call.args))}, **{shown(call.kwargs)})"


def canonical_loader_spec(spec: PluginRef) -> PluginRef:
    """A teacher-loader reference as a checkpoint records it: through the loader's optional
    ``canonical(**kwargs)``, which gives the arguments a form that means the same from any
    directory (the ``transformers`` loader makes a relative folder absolute)."""
    loaders = registries().teacher_loaders
    canonical = getattr(loaders.get(spec.name), "canonical", None) if spec.name in loaders else None
    if canonical is None:
        return spec
    return PluginRef(spec.name, dict(canonical(**spec.kwargs)))


def _checked(teacher: object, source: str, path: str) -> nn.Module:
    if not isinstance(teacher, nn.Module):
        raise ConfigTypeError(
            f"{source} returned {type(teacher).__name__}, not an nn.Module", path=path
        )
    return teacher
