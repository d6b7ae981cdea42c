"""Recording a distillation set-up as plain data, so that a checkpoint can rebuild it.

Objects given as Python instances are recorded by their registered plugin name (or
``"module:qualname"`` outside the registries) and their constructor arguments, read back from
same-named attributes (``LogitsDistillationLoss(temperature=2.0)`` keeps ``self.temperature``).
What cannot be recorded is reported by ``convert`` straight away, not discovered at restore.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import attrs
from torch import nn

from kdcore.config import KDLossConfig
from kdcore.converter import PLUGIN_NAME_KEY, is_plugin_ref, unstructure
from kdcore.plan import DistillationPlan
from kdcore.plugin_manager import registries
from kdcore.references import reference_of
from kdcore.registry import Registry
from kdcore.teacher import canonical_loader_spec, is_ensemble_spec, unpack_spec_tuple


class NotRecordableWarning(UserWarning):
    """Part of a config cannot be written as data; ``kd.restore`` will need it handed over."""


class _NotRecordable(Exception):
    pass


@attrs.frozen
class ModeRecord:
    """One applied mode, as data: what a checkpoint's manifest holds for it."""

    name: str
    config: dict[str, Any] | None
    #: (config path, why) for each value that restore must be given instead
    missing: tuple[tuple[str, str], ...] = ()
    #: whether the teacher's weights belong in the checkpoint
    teacher_weights: bool = False


def record_mode(name: str, config: Any) -> ModeRecord:
    """Record any mode's config as data (the converter's unstructured form), or say why not."""
    if config is None:
        return ModeRecord(name=name, config=None)
    try:
        data = _data(unstructure(config), f"the {name} config")
    except _NotRecordable as exc:
        warnings.warn(f"{name}: {exc}", NotRecordableWarning, stacklevel=4)
        return ModeRecord(name=name, config=None, missing=((name, str(exc)),))
    return ModeRecord(name=name, config=data)


def record_distillation(config: KDLossConfig, plan: DistillationPlan, *, path: str) -> ModeRecord:
    """Record a checked distillation config; warns once per value it cannot record."""
    missing: list[tuple[str, str]] = []

    def attempt(where: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except _NotRecordable as exc:
            missing.append((where, str(exc)))
            return None

    teacher, teacher_is_instance = attempt(
        f"{path}.teacher_model", _record_teacher, config.teacher_model, plan.teacher
    ) or (None, True)
    criterion = [
        {
            "student": pair.student_layer,
            "teacher": pair.teacher_layer,
            "loss": attempt(
                f"{path}.criterion[{index}].loss", _record_plugin, pair.loss, registries().criteria
            ),
        }
        for index, pair in enumerate(plan.pairs)
    ]
    balancer = (
        None
        if plan.balancer is None
        else attempt(f"{path}.loss_balancer", _record_plugin, plan.balancer, registries().balancers)
    )
    for where, why in missing:
        warnings.warn(f"{where}: {why}", NotRecordableWarning, stacklevel=4)
    return ModeRecord(
        name=path,
        config={
            "teacher_model": teacher,
            "criterion": criterion,
            "loss_balancer": balancer,
            "expose_minimal_state_dict": plan.expose_minimal_state_dict,
        },
        missing=tuple(missing),
        teacher_weights=teacher_is_instance or not plan.expose_minimal_state_dict,
    )


def _record_teacher(spec: Any, teacher: nn.Module) -> tuple[dict[str, Any], bool]:
    """(teacher-loader mapping, whether the weights must be saved because no spec rebuilds them)."""
    if is_ensemble_spec(spec):
        records = {
            key: _record_teacher(item, teacher.get_submodule(key)) for key, item in spec.items()
        }
        return {key: record for key, (record, _) in records.items()}, any(
            weights for _, weights in records.values()
        )
    if is_plugin_ref(spec):
        return _data(canonical_loader_spec(spec), "the teacher-loader mapping"), False
    if isinstance(spec, nn.Module):
        try:
            return _callable_ref(type(spec), (), init_kwargs(spec)), True
        except _NotRecordable as exc:
            raise _NotRecordable(
                f"the teacher was passed as an instance and {exc}; kd.save will store its weights "
                "and kd.restore will need teacher_model= (or pass a named factory instead)"
            ) from None
    fn, args, kwargs = (
        unpack_spec_tuple(spec, path="") if isinstance(spec, tuple) else (spec, (), {})
    )
    return _callable_ref(fn, args, kwargs), False


def _callable_ref(fn: Any, args: Any, kwargs: Any) -> dict[str, Any]:
    target = reference_of(fn)
    if target is None:
        raise _NotRecordable(
            f"{getattr(fn, '__qualname__', fn)!r} is a lambda or local function, which a file "
            "cannot name; kd.restore will need teacher_model= (or use a module-level function)"
        )
    return {
        PLUGIN_NAME_KEY: "callable",
        "target": target,
        "args": _data(list(args), "the teacher's args"),
        "kwargs": _data(dict(kwargs), "the teacher's kwargs"),
    }


def _record_plugin(obj: Any, registry: Registry[Any]) -> dict[str, Any]:
    if not isinstance(obj, nn.Module):  # a plain loss function, used as it is
        target = reference_of(obj)
        if target is None:
            raise _NotRecordable(f"{obj!r} is a lambda or local function, which a file cannot name")
        return {PLUGIN_NAME_KEY: target}
    cls = type(obj)
    name = registry.name_of(cls) or reference_of(cls)
    if name is None:
        raise _NotRecordable(
            f"{cls.__qualname__} is defined inside a function; a file cannot name it"
        )
    kwargs = init_kwargs(obj)
    if PLUGIN_NAME_KEY in kwargs:
        raise _NotRecordable(f"{cls.__name__} takes an argument called {PLUGIN_NAME_KEY!r}")
    return {PLUGIN_NAME_KEY: name, **kwargs}


def init_kwargs(obj: object) -> dict[str, Any]:
    """The constructor arguments of ``obj``, read back from its same-named attributes."""
    cls = type(obj)
    if cls.__init__ in (nn.Module.__init__, object.__init__):  # takes no arguments of its own
        return {}
    kwargs = {}
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            # What went into *args or **kwargs cannot be read back from the object.
            raise _NotRecordable(
                f"{cls.__name__} takes {parameter}, whose values cannot be read back"
            )
        # A default cannot stand in for a missing attribute: the caller may have passed another
        # value, and a wrong record would rebuild a different model without a word.
        if not hasattr(obj, parameter.name):
            raise _NotRecordable(
                f"{cls.__name__} keeps no attribute for its constructor argument {parameter.name!r}"
            )
        value = getattr(obj, parameter.name)
        kwargs[parameter.name] = _data(value, f"{cls.__name__}'s argument {parameter.name!r}")
    return kwargs


def _data(value: Any, what: str) -> Any:
    """``value`` as JSON-ready data (tuples become lists), or _NotRecordable."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_data(item, what) for item in value]
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return {key: _data(item, what) for key, item in value.items()}
    raise _NotRecordable(f"{what} is a {type(value).__name__}, not plain data")
