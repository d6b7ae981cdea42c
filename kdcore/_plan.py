"""Checking a distillation config and resolving it into a plan, without touching the model.

``convert`` builds the whole plan first, so that any mistake is reported before the student
changes: a failed ``convert`` leaves the student exactly as it was.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import attrs
from torch import nn

from kdcore._balancer import DistillationLossBalancer
from kdcore._config import CriterionEntry, KDLossConfig
from kdcore._converter import criterion_entries, instantiate, is_plugin_ref, teacher_spec
from kdcore._errors import (
    ConfigError,
    ConfigTypeError,
    KDCoreError,
    UnknownLayerError,
    closest,
    did_you_mean,
    shown,
)
from kdcore._plugin_manager import registries
from kdcore._references import NotResolvedError
from kdcore._teacher import TeacherEnsemble, build_teacher, check_teacher_spec

WHOLE_MODEL = ""
CAPTURES = ("output", "input")


def split_layer(spec: str) -> tuple[str, str]:
    """``"lm_head:input"`` -> ``("lm_head", "input")``; a bare name captures the output."""
    name, _, capture = spec.partition(":")
    return name, capture or "output"


@attrs.frozen
class LossPair:
    """One criterion entry: a student layer, a teacher layer and the loss between their outputs."""

    student_layer: str
    teacher_layer: str
    loss: Callable[..., Any]
    key: str  # the loss-dict key, f"{loss name}_{index}"
    accepted_kwargs: frozenset[str] | None  # None: the loss takes **kwargs
    path: str = ""  # the config entry, for errors: "kd_loss.criterion[1]"
    #: the loss as the config gave it ({"name": ...}, or the object itself): what is recorded
    spec: Any = None


@attrs.frozen
class DistillationPlan:
    teacher: nn.Module
    pairs: tuple[LossPair, ...]
    balancer: DistillationLossBalancer | None
    expose_minimal_state_dict: bool
    #: ``teacher_model`` as the converter typed it (what is recorded); None: not known
    teacher_spec: Any = None


def plan_distillation(
    student: nn.Module, config: KDLossConfig, *, path: str, whole_model_allowed: bool = True
) -> DistillationPlan:
    """Resolve and check ``config`` against ``student``; raises before anything is changed.

    Builds each object the config describes once: the teacher, the losses, the balancer.
    """
    _check_expose_flag(config, path)
    entries = criterion_entries(config.criterion, path=f"{path}.criterion")
    spec = teacher_spec(config.teacher_model, path=f"{path}.teacher_model")
    teacher = build_teacher(spec, path=f"{path}.teacher_model")
    if teacher is student or (
        isinstance(teacher, TeacherEnsemble) and any(t is student for t in teacher.values())
    ):
        raise ConfigError("the teacher is the student itself", path=f"{path}.teacher_model")
    pairs = [
        _checked_pair(
            entry,
            index,
            path=f"{path}.criterion",
            student=student,
            teacher=teacher,
            ensemble=isinstance(teacher, TeacherEnsemble),
            whole_model_allowed=whole_model_allowed,
        )
        for index, entry in enumerate(entries)
    ]
    balancer = _balancer_for([pair.key for pair in pairs], config.loss_balancer, path=path)
    return DistillationPlan(
        teacher, tuple(pairs), balancer, config.expose_minimal_state_dict, teacher_spec=spec
    )


def describe_distillation(
    config: KDLossConfig,
    *,
    path: str,
    whole_model_allowed: bool = True,
    student: nn.Module | None = None,
) -> list[str]:
    """Check ``config`` without building the teacher; describe what ``convert`` would build.

    The checks are :func:`plan_distillation`'s, but for the teacher's layers (the teacher is
    not built). Student layer names are checked when ``student`` is given. Used by
    ``kdcore check``.
    """
    _check_expose_flag(config, path)
    entries = criterion_entries(config.criterion, path=f"{path}.criterion")
    spec = teacher_spec(config.teacher_model, path=f"{path}.teacher_model")
    lines = [f"{path}:", f"  teacher: {check_teacher_spec(spec, path=f'{path}.teacher_model')}"]
    ensemble = isinstance(spec, dict)
    keys = []
    for index, entry in enumerate(entries):
        student_layer, teacher_layer = entry.student, entry.teacher
        try:
            pair = _checked_pair(
                entry,
                index,
                path=f"{path}.criterion",
                student=student,
                teacher=None,
                ensemble=ensemble,
                whole_model_allowed=whole_model_allowed,
            )
            key, described = pair.key, shown(pair.loss)
        except NotResolvedError as exc:  # kd.check(imports=False): a class the config names
            name = exc.reference.rpartition(":")[2].rpartition(".")[2]  # the key it would give
            key = _loss_key(name, index, ensemble, teacher_layer)
            described = f"{exc.what} {exc.reference!r} (not imported)"
        keys.append(key)
        lines.append(
            f"  {key}: student {shown(student_layer or '<output>')} <- teacher "
            f"{shown(teacher_layer or '<output>')}: {described}"
        )
    try:
        described = shown(_balancer_for(keys, config.loss_balancer, path=path))
    except NotResolvedError as exc:
        described = f"{exc.what} {exc.reference!r} (not imported)"
    lines.append(f"  loss balancer: {described}")
    lines.append(f"  expose_minimal_state_dict: {config.expose_minimal_state_dict}")
    return lines


def _check_expose_flag(config: KDLossConfig, path: str) -> None:
    if not isinstance(config.expose_minimal_state_dict, bool):
        raise ConfigTypeError(
            f"expected a bool, got {shown(config.expose_minimal_state_dict)}",
            path=f"{path}.expose_minimal_state_dict",
        )


def _checked_pair(
    entry: CriterionEntry,
    index: int,
    *,
    path: str,
    student: nn.Module | None,
    teacher: nn.Module | None,
    ensemble: bool,
    whole_model_allowed: bool,
) -> LossPair:
    """One criterion entry, checked and its loss built: the pass ``convert`` and ``check``
    share. The layers of a model not given (``None``) are not checked."""
    student_layer, teacher_layer, spec = entry.student, entry.teacher, entry.loss
    entry_path = f"{path}{entry.where}"
    loss_path = f"{entry_path}.loss" if entry.where else entry_path  # a single loss: criterion
    if not whole_model_allowed and _not_a_plain_layer(student_layer, teacher_layer):
        raise ConfigError(
            "this mode pairs layers explicitly: the whole model ('') cannot be one side, "
            "and layers are captured by their outputs (no ':input')",
            path=entry_path,
        )
    if ensemble and split_layer(teacher_layer)[0] == WHOLE_MODEL:
        names = f" ({', '.join(teacher._modules)})" if teacher is not None else ""
        raise ConfigError(
            f"with several teachers, name one{names} or one's layer "
            "('<key>.<layer>') instead of ''",
            path=f"{entry_path}.teacher",
        )
    student_module = (
        None
        if student is None
        else _check_layer(student, student_layer, "student", f"{entry_path}.student")
    )
    teacher_module = (
        None
        if teacher is None
        else _check_layer(teacher, teacher_layer, "teacher", f"{entry_path}.teacher")
    )
    loss = _build_loss(spec, path=loss_path)
    bind_layers = getattr(loss, "bind_layers", None)
    bind_models = getattr(loss, "bind_models", None)
    try:
        if callable(bind_layers) and student_module is not None and teacher_module is not None:
            bind_layers(student_module, teacher_module)  # e.g. a fused loss's lm-head weights
        if callable(bind_models) and student is not None and teacher is not None:
            bind_models(student, teacher)  # e.g. a fused loss that names the lm heads
    except UnknownLayerError as exc:
        raise UnknownLayerError(f"{loss_path}: {exc}", name=exc.name) from None
    except KDCoreError:
        raise
    except (TypeError, ValueError) as exc:  # the loss refused the layers it was given
        error = ConfigTypeError if isinstance(exc, TypeError) else ConfigError
        raise error(str(exc), path=loss_path) from exc
    return LossPair(
        _canonical(student_layer),
        _canonical(teacher_layer),
        loss,
        key=_loss_key(loss_name(loss), index, ensemble, teacher_layer),
        accepted_kwargs=_accepted_kwargs(loss),
        path=entry_path,
        spec=spec,
    )


def _balancer_for(keys: list[str], spec: Any, *, path: str) -> DistillationLossBalancer | None:
    """Build the balancer and check it takes the KD losses ``keys``."""
    balancer = _build_balancer(spec, path=f"{path}.loss_balancer")
    if balancer is None and len(keys) > 1:
        raise ConfigError(
            f"{len(keys)} KD losses need a loss_balancer to be combined into one "
            "(e.g. {'name': 'static', 'kd_loss_weight': ...})",
            path=f"{path}.loss_balancer",
        )
    if balancer is not None:
        try:
            balancer.check_kd_losses(keys)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc), path=f"{path}.loss_balancer") from None
    return balancer


def _loss_key(name: str, index: int, ensemble: bool, layer: str) -> str:
    if ensemble:  # the key says which teacher the loss came from
        return f"{name}_{layer.split('.')[0].split(':')[0]}_{index}"
    return f"{name}_{index}"


def _canonical(spec: str) -> str:
    name, capture = split_layer(spec)
    return name if capture == "output" else spec


def _not_a_plain_layer(*specs: str) -> bool:
    return any(spec == WHOLE_MODEL or ":" in spec for spec in specs)


def loss_name(loss: Callable[..., Any]) -> str:
    if isinstance(loss, nn.Module):
        return type(loss).__name__
    return getattr(loss, "__name__", type(loss).__name__)


def _build_loss(spec: Any, *, path: str) -> Callable[..., Any]:
    if is_plugin_ref(spec):
        return instantiate(registries().criteria, spec, path=path)  # type: ignore[no-any-return]
    return spec  # type: ignore[no-any-return]  # a loss object, checked by the converter


def _build_balancer(spec: Any, *, path: str) -> DistillationLossBalancer | None:
    if spec is None:
        return None
    balancer = instantiate(registries().balancers, spec, path=path) if is_plugin_ref(spec) else spec
    if not isinstance(balancer, DistillationLossBalancer):
        raise ConfigTypeError(
            "expected a DistillationLossBalancer or {'name': ...}, "
            f"got {type(balancer).__name__}",
            path=path,
        )
    parameters = [name for name, _ in balancer.named_parameters()]
    if parameters:
        raise ConfigError(
            f"{type(balancer).__name__} has parameters ({', '.join(parameters)}); balancers must "
            "be parameter-free (put learnable weights in a loss module)",
            path=path,
        )
    return balancer


def _check_layer(model: nn.Module, spec: str, side: str, path: str) -> nn.Module:
    """The module ``spec`` names (after its capture suffix is checked)."""
    name, capture = split_layer(spec)
    if capture not in CAPTURES:
        raise ConfigError(
            f"{spec!r}: unknown capture {capture!r}{did_you_mean(capture, CAPTURES)} "
            "(write 'layer' or 'layer:output' for the output, 'layer:input' for the first input)",
            path=path,
        )
    if name == WHOLE_MODEL:
        if capture == "input":
            raise ConfigError(
                "the whole model's input is what you pass to it; capture a layer's input instead",
                path=path,
            )
        return model
    known = [n for n, _ in model.named_modules() if n]
    if name not in known:
        suggestions = sorted(known, key=lambda n: _similarity(name, n), reverse=True)[:5]
        hint = closest(name, known)
        raise UnknownLayerError(
            f"{path}: the {side} ({type(model).__name__}) has no layer {name!r}"
            + (f"; did you mean {hint!r}?" if hint else "")
            + (f" (close names: {', '.join(suggestions)})" if suggestions else "")
            + getattr(model, "layers_note", ""),
            name=name,
        )
    return model.get_submodule(name)


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _accepted_kwargs(loss: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword arguments ``loss`` takes beyond the two outputs (None: any)."""
    target = loss.forward if isinstance(loss, nn.Module) else loss
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    # The first two parameters receive the student and teacher outputs.
    return frozenset(
        p.name for p in parameters[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )
