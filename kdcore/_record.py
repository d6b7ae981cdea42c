"""Recording a distillation set-up as plain data, so that a checkpoint can rebuild it.

What the user wrote is what is recorded: a plugin reference ``{"name": ..., **kwargs}`` (a
registered name or a ``"module:qualname"``), a teacher spec, as data. Only objects passed as
Python instances need more: one that declares its config (:class:`Recordable`) is recorded by
its class and that config; for others, the constructor arguments are read back from same-named
attributes where they exist. What cannot be recorded is listed in the record (``missing``);
``kd.save`` warns about it, since the checkpoint then needs it handed over at restore.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import attrs
from torch import nn

from kdcore._config import KDLossConfig, PluginRef, TeacherCall
from kdcore._converter import PLUGIN_NAME_KEY, is_plugin_ref, teacher_spec, unstructure
from kdcore._plan import DistillationPlan
from kdcore._plugin_manager import registries
from kdcore._references import reference_of
from kdcore._registry import Registry
from kdcore._teacher import canonical_loader_spec


class NotRecordableWarning(UserWarning):
    """``kd.save``: part of a config cannot be written as data; ``kd.restore`` will need it
    handed over."""


@runtime_checkable
class Recordable(Protocol):
    """An object that says which keyword arguments rebuild it, for ``kd.save`` to record.

    ``type(obj)(**obj.kdcore_config())`` must build an equal object; the values are plain data
    (numbers, strings, bools, ``None``, lists, dicts with string keys). Without this method,
    the constructor arguments are read back from attributes of the same names. ::

        class Projected(nn.Module):
            def __init__(self, dims: tuple[int, int]) -> None:
                super().__init__()
                self.proj = nn.Linear(*dims)

            def kdcore_config(self) -> dict[str, Any]:
                return {"dims": [self.proj.in_features, self.proj.out_features]}
    """

    def kdcore_config(self) -> Mapping[str, Any]: ...


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
        return ModeRecord(name=name, config=None, missing=((name, str(exc)),))
    return ModeRecord(name=name, config=data)


def record_distillation(config: KDLossConfig, plan: DistillationPlan, *, path: str) -> ModeRecord:
    """Record a checked distillation config: each value as the config gave it, as data."""
    missing: list[tuple[str, str]] = []

    def attempt(where: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except _NotRecordable as exc:
            missing.append((where, str(exc)))
            return None

    spec = plan.teacher_spec
    if spec is None:  # a plan made by hand
        spec = teacher_spec(config.teacher_model, path=f"{path}.teacher_model")
    teacher, teacher_is_instance = attempt(f"{path}.teacher_model", _record_teacher, spec) or (
        None,
        True,
    )
    criterion = [
        {
            "student": pair.student_layer,
            "teacher": pair.teacher_layer,
            "loss": attempt(
                f"{path}.criterion[{index}].loss",
                _record_spec,
                pair.loss if pair.spec is None else pair.spec,
                registries().criteria,
            ),
        }
        for index, pair in enumerate(plan.pairs)
    ]
    balancer = (
        None
        if plan.balancer is None
        else attempt(
            f"{path}.loss_balancer",
            _record_spec,
            plan.balancer if config.loss_balancer is None else config.loss_balancer,
            registries().balancers,
        )
    )
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


def _record_teacher(spec: Any) -> tuple[Any, bool]:
    """(the typed teacher spec as data, whether the weights must be saved because no spec
    rebuilds them)."""
    if isinstance(spec, dict):  # several teachers
        records = {key: _record_teacher(item) for key, item in spec.items()}
        return {key: record for key, (record, _) in records.items()}, any(
            weights for _, weights in records.values()
        )
    if isinstance(spec, PluginRef):
        return _data(unstructure(canonical_loader_spec(spec)), "the teacher-loader mapping"), False
    if isinstance(spec, nn.Module):
        try:
            return _callable_ref(type(spec), (), init_kwargs(spec)), True
        except _NotRecordable as exc:
            raise _NotRecordable(
                f"the teacher was passed as an instance and {exc}; its weights are saved and "
                "kd.restore will need teacher_model= (or pass a named factory instead)"
            ) from None
    call: TeacherCall = spec
    return _callable_ref(call.fn, call.args, call.kwargs), False


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


def _record_spec(spec: Any, registry: Registry[Any]) -> dict[str, Any]:
    """A plugin reference as written; an instance by its plugin name and config."""
    if is_plugin_ref(spec):
        written = unstructure(spec) if isinstance(spec, PluginRef) else dict(spec)
        return _data(written, f"the {registry.kind} mapping")  # type: ignore[no-any-return]
    if not isinstance(spec, nn.Module):  # a plain loss function, used as it is
        target = reference_of(spec)
        if target is None:
            raise _NotRecordable(
                f"{spec!r} is a lambda or local function, which a file cannot name"
            )
        return {PLUGIN_NAME_KEY: target}
    cls = type(spec)
    name = registry.name_of(cls) or reference_of(cls)
    if name is None:
        raise _NotRecordable(
            f"{cls.__qualname__} is defined inside a function; a file cannot name it"
        )
    kwargs = init_kwargs(spec)
    if PLUGIN_NAME_KEY in kwargs:
        raise _NotRecordable(f"{cls.__name__} takes an argument called {PLUGIN_NAME_KEY!r}")
    return {PLUGIN_NAME_KEY: name, **kwargs}


def init_kwargs(obj: object) -> dict[str, Any]:
    """The keyword arguments that rebuild ``obj``: its :meth:`Recordable.kdcore_config`, or
    else its constructor arguments, read back from same-named attributes."""
    cls = type(obj)
    if isinstance(obj, Recordable):
        declared = obj.kdcore_config()
        if not isinstance(declared, Mapping):
            raise _NotRecordable(
                f"{cls.__name__}.kdcore_config() returned {type(declared).__name__}, not a mapping"
            )
        return _data(dict(declared), f"{cls.__name__}.kdcore_config()")  # type: ignore[no-any-return]
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
                " (and declares no kdcore_config())"
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
