"""Modes and the two entry points that apply them: :func:`convert` and :func:`export`.

A mode is a registered object with a ``config_class`` and a ``convert(model, config, path)``
method; ``kd.convert(model, [("kd_loss", config)])`` looks ``"kd_loss"`` up in the mode registry.
``kd.export`` needs no mode: it asks the model (:meth:`~kdcore.DistillationModel.export_student`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import nn

from kdcore._converter import check_size, structure
from kdcore._errors import ConfigError, ConfigTypeError, shown
from kdcore._model import gather_fsdp2, is_distillation_model
from kdcore._plugin_manager import registries
from kdcore._record import record_mode
from kdcore._references import not_resolving


@runtime_checkable
class Mode(Protocol):
    """What a mode plugin registers."""

    #: attrs class its config is structured into; None when the mode takes no config.
    config_class: type | None

    def convert(self, model: nn.Module, config: Any, *, path: str) -> nn.Module:
        """Apply the mode to ``model`` (in place where possible) and return the result.

        Must check everything before changing ``model``, so that an error leaves it untouched.
        """
        ...

    def describe(self, config: Any, *, path: str, student: nn.Module | None) -> list[str]:
        """Check ``config`` as far as possible without building models; describe the result."""
        ...


class NotADistillationModelWarning(UserWarning):
    """``export`` was given a model that ``convert`` did not make; it is returned unchanged."""


ModeSpec = str | Sequence[tuple[str, Any] | str]


def convert(model: nn.Module, mode: ModeSpec) -> nn.Module:
    """Apply ``mode`` to ``model`` and return the converted model.

    ``mode`` is a mode name (``"kd_loss"``; its config then comes from nowhere, so only modes
    without required config allow it), or a list of ``(name, config)`` pairs applied in order;
    ``config`` is a mapping or the mode's config class. Example::

        model = kd.convert(student, [("kd_loss", {"teacher_model": teacher,
                                                  "criterion": kd.LogitsDistillationLoss()})])
    """
    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"convert needs an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    steps = [_prepare(step, index) for index, step in enumerate(_mode_steps(mode))]
    was_distillation_model = is_distillation_model(model)
    try:
        for name, mode_impl, config in steps:
            applied_to_distillation_model = is_distillation_model(model)
            model = mode_impl.convert(model, config, path=name)
            if applied_to_distillation_model and is_distillation_model(model):
                # The mode that made the distillation model recorded itself; a later step is
                # recorded here, its config as data if it is.
                model.record_mode(record_mode(name, config))
    except BaseException:
        # A later step failed after an earlier one converted the model: undo that too.
        if is_distillation_model(model) and not was_distillation_model:
            model.export_student()
        raise
    return model


def check(mode: ModeSpec, *, student: nn.Module | None = None, imports: bool = True) -> list[str]:
    """Check ``mode`` as ``convert`` would, without building teachers; describe each step.

    With ``student``, layer names are checked against it too (the student is not changed).
    ``imports=True`` imports the modules that ``"module:qualname"`` references name (running
    their code) and builds criteria and balancers named that way. ``imports=False`` imports
    and calls nothing a reference names: references are checked for their form only and
    listed at the end of the description; registered plugins are still checked (and criteria
    and balancers built: they are installed code).
    """
    lines = []
    resolving: contextlib.AbstractContextManager[list[str]] = (
        contextlib.nullcontext([]) if imports else not_resolving()
    )
    with resolving as skipped:
        for index, step in enumerate(_mode_steps(mode)):
            name, mode_impl, config = _prepare(step, index)
            lines.extend(mode_impl.describe(config, path=name, student=student))
    if not imports:
        lines.append(f"not imported, not called: {', '.join(skipped) or 'nothing named'}")
    return lines


def export(model: nn.Module) -> nn.Module:
    """Return the student of a distillation model, as an instance of its original class.

    Wrapped models are unwrapped (DDP, DataParallel, FSDP, ``torch.compile``). A student
    sharded with FSDP2's ``fully_shard`` comes back whole and plain: its parameters are gathered
    (collective: every rank calls ``export``) and FSDP's hooks removed; the teacher is left as
    it is.
    """
    model = unwrap(model)
    if not is_distillation_model(model):
        warnings.warn(
            f"export got a {type(model).__name__}, which is not a distillation model; "
            "it is returned unchanged",
            NotADistillationModelWarning,
            stacklevel=2,
        )
        return model
    teacher = set(model._kd.teacher.modules())
    gather_fsdp2(m for m in model.modules() if m not in teacher)
    return model.export_student()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP, DataParallel, FSDP (v1) and ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and type(model).__name__ in {
            "DistributedDataParallel",
            "DataParallel",
            "FullyShardedDataParallel",
        }:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _mode_steps(mode: ModeSpec) -> list[tuple[str, Any]]:
    if isinstance(mode, str):
        return [(mode, None)]
    if not isinstance(mode, Sequence) or isinstance(mode, (bytes, bytearray)) or not mode:
        raise ConfigTypeError(
            f"mode must be a name or a non-empty list of (name, config) pairs, got {shown(mode)}",
            path="mode",
        )
    steps = []
    for index, step in enumerate(mode):
        if isinstance(step, str):
            steps.append((step, None))
        elif isinstance(step, tuple | list) and len(step) == 2 and isinstance(step[0], str):
            steps.append((step[0], step[1]))
        else:
            raise ConfigTypeError(
                f"expected a mode name or a (name, config) pair, got {shown(step)}",
                path=f"mode[{index}]",
            )
    return steps


def _prepare(step: tuple[str, Any], index: int) -> tuple[str, Mode, Any]:
    """Look the mode up and structure its config: all steps are checked before any applies."""
    name, raw_config = step
    mode_impl = registries().modes.get(name, where=f"mode[{index}]")
    config_class = mode_impl.config_class
    if config_class is None:
        if raw_config not in (None, {}):
            raise ConfigError(f"mode {name!r} takes no config, got {shown(raw_config)}", path=name)
        return name, mode_impl, None
    if raw_config is None:
        raise ConfigError(
            f"mode {name!r} needs a config ({config_class.__name__}); pass [({name!r}, {{...}})]",
            path=name,
        )
    check_size(raw_config, path=name)  # before any plugin walks or renders it
    return name, mode_impl, structure(raw_config, config_class, path=name)
