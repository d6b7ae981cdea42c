"""The project's one cattrs converter and the rules for turning data into configs and plugins.

Serialisation rules live here, apart from the config classes in :mod:`kdcore._config`.
Every error says where the bad value is (``kd_loss.criterion[1].loss.temprature``).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from torch import nn

from kdcore._config import (
    TEACHER_FORMS,
    BalancerSpec,
    CriterionEntry,
    CriterionSpec,
    PluginRef,
    TeacherCall,
    TeacherSpec,
)
from kdcore._errors import (
    SHOWN_CHARACTERS,
    ConfigError,
    ConfigTypeError,
    KDCoreError,
    cut,
    did_you_mean,
    shown,
)
from kdcore._references import resolve
from kdcore._registry import Registry

if TYPE_CHECKING:
    import cattrs

T = TypeVar("T")

PLUGIN_NAME_KEY = "name"

#: The most values a mode's config may hold, counting a part shared by several places (or by
#: itself) each time it appears: what a plugin's error message would render, and walk.
MAX_CONFIG_VALUES = 1_000_000


def _strict_scalar(kind: type, accepted: tuple[type, ...]) -> Any:
    # cattrs would happily turn "no" into True and "3" into 3; a config typo must not pass.
    def structure(value: Any, _: Any) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {kind.__name__}, got a bool ({value!r})")
        if not isinstance(value, accepted):
            got = f"{type(value).__name__} ({shown(value)})"
            raise TypeError(f"expected {kind.__name__}, got {got}")
        try:
            return kind(value)
        except OverflowError:  # an int too large for a float
            raise ValueError(f"{shown(value)} is out of range for a {kind.__name__}") from None

    return structure


def _is_choice(kind: Any) -> bool:
    return typing.get_origin(kind) is typing.Literal


def _structure_choice(value: Any, kind: Any) -> Any:
    # The scalar's type counts too: True == 1, and cattrs' own message names typing internals.
    choices = typing.get_args(kind)
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        names = [str(choice) for choice in choices]
        raise ValueError(
            f"expected one of {', '.join(names)}, got {shown(value)}"
            + (did_you_mean(value, names) if isinstance(value, str) else "")
        )
    return value


@functools.cache
def _converter() -> cattrs.Converter:
    """The converter every config goes through, built at first use.

    cattrs is imported here, not at module level: ``import kdcore`` and building losses from
    Python never structure a config, and cattrs and its generated code are not free to import.
    """
    import cattrs
    import cattrs.gen

    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(bool, _strict_scalar(bool, (bool,)))
    converter.register_structure_hook(int, _strict_scalar(int, (int,)))
    converter.register_structure_hook(float, _strict_scalar(float, (int, float)))
    converter.register_structure_hook(str, _strict_scalar(str, (str,)))
    converter.register_structure_hook_func(_is_choice, _structure_choice)
    converter.register_structure_hook(PluginRef, lambda value, _: _plugin_ref(value, "plugin"))
    converter.register_unstructure_hook(
        PluginRef, lambda ref: {PLUGIN_NAME_KEY: ref.name, **ref.kwargs}
    )
    converter.register_structure_hook(
        CriterionEntry,
        cattrs.gen.make_dict_structure_fn(
            CriterionEntry,
            converter,
            loss=cattrs.gen.override(struct_hook=lambda value, _: _loss(value)),
            where=cattrs.gen.override(omit=True),
        ),
    )
    converter.register_structure_hook_func(
        lambda cls: cls == CriterionSpec, lambda value, _: _criterion(converter, value)
    )
    converter.register_structure_hook_func(
        lambda cls: cls == TeacherSpec, lambda value, _: _teacher(value)
    )
    converter.register_structure_hook_func(
        lambda cls: cls == BalancerSpec,
        lambda value, _: _plugin_ref(value, "balancer") if is_plugin_ref(value) else value,
    )
    return converter


class _Within(Exception):
    """An error at ``where`` (``"[1].loss"``) below the value a structure hook was given."""

    def __init__(self, where: str, cause: BaseException) -> None:
        super().__init__(where, cause)
        self.where, self.cause = where, cause


def _plugin_ref(value: Any, kind: str) -> PluginRef:
    """``{"name": ..., **kwargs}`` as a :class:`~kdcore._config.PluginRef`."""
    if isinstance(value, PluginRef):
        return value
    if not isinstance(value, Mapping) or PLUGIN_NAME_KEY not in value:
        raise ConfigTypeError(f"expected {{'name': <{kind} name>, ...}}, got {shown(value)}")
    name = value[PLUGIN_NAME_KEY]
    if not isinstance(name, str):
        raise _Within(
            f".{PLUGIN_NAME_KEY}",
            ConfigTypeError(f"expected the name of a {kind}, got {type(name).__name__}"),
        )
    return PluginRef(name, {key: item for key, item in value.items() if key != PLUGIN_NAME_KEY})


def _loss(value: Any) -> Any:
    """A criterion entry's loss: a plugin reference, or a loss object given in Python."""
    if is_plugin_ref(value):
        return _plugin_ref(value, "criterion")
    if isinstance(value, type):
        raise ConfigTypeError(
            f"got the class {value.__name__}; pass an instance, e.g. {value.__name__}()"
        )
    if not callable(value):
        raise ConfigTypeError(
            f"expected a loss module, a callable or {{'name': ...}}, got {type(value).__name__}"
        )
    return value


def _criterion(converter: cattrs.Converter, value: Any) -> list[CriterionEntry]:
    """Every accepted criterion form as one list of entries (a list of entries stays as it is)."""
    if value is None:
        raise ConfigError(
            "is required: a loss, {(student_layer, teacher_layer): loss} or a list of "
            "{'student': ..., 'teacher': ..., 'loss': ...}"
        )
    if isinstance(value, list) and value and all(isinstance(e, CriterionEntry) for e in value):
        return value
    if is_plugin_ref(value) or isinstance(value, type) or callable(value):
        return [CriterionEntry("", "", _loss(value))]
    if isinstance(value, Mapping):  # {(student_layer, teacher_layer): loss}
        if not value:
            raise ConfigError("has no entries")
        entries = []
        for index, (layers, loss) in enumerate(value.items()):
            where = f"[{index}]"
            if not (
                isinstance(layers, tuple)
                and len(layers) == 2
                and all(isinstance(n, str) for n in layers)
            ):
                hint = "; a plugin mapping needs a 'name' key" if isinstance(layers, str) else ""
                raise _Within(
                    where,
                    ConfigTypeError(
                        "keys must be (student_layer, teacher_layer) tuples of strings, "
                        f"got {shown(layers)}{hint}"
                    ),
                )
            try:
                entries.append(CriterionEntry(*layers, _loss(loss), where=where))
            except ConfigError as exc:
                raise _Within(f"{where}.loss", exc) from None
        return entries
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not value:
            raise ConfigError("has no entries")
        entries = []
        for index, item in enumerate(value):
            where = f"[{index}]"
            if isinstance(item, CriterionEntry):
                entries.append(item)
                continue
            if not isinstance(item, Mapping):
                raise _Within(
                    where,
                    ConfigTypeError(
                        "expected {'student': ..., 'teacher': ..., 'loss': ...}, "
                        f"got {type(item).__name__}"
                    ),
                )
            try:
                entry = converter.structure(dict(item), CriterionEntry)
            except Exception as exc:
                raise _Within(where, exc) from None
            entries.append(attrs.evolve(entry, where=where))
        return entries
    raise ConfigTypeError(f"expected a loss or layer pairs, got {type(value).__name__}")


def _teacher(value: Any) -> Any:
    """A teacher spec as a PluginRef, a TeacherCall, an nn.Module or ``{key: spec}``."""
    if isinstance(value, (PluginRef, TeacherCall, nn.Module)):
        return value
    if value is None:
        raise ConfigError("is required: " + TEACHER_FORMS)
    if is_plugin_ref(value):
        return _plugin_ref(value, "teacher loader")
    if isinstance(value, Mapping):  # several teachers
        if not value:
            raise ConfigError("has no teachers; give one spec or {key: spec}")
        teachers = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError(
                    "teacher keys must be identifiers (they prefix layer names), got "
                    f"{shown(key)}; a teacher-loader mapping needs a 'name' key"
                )
            try:
                teachers[key] = _teacher(item)
            except Exception as exc:
                raise _Within(f".{key}", exc) from None
        return teachers
    if isinstance(value, tuple):
        return _teacher_call(value)
    if callable(value):
        return TeacherCall(value)
    raise ConfigTypeError(f"got {type(value).__name__}; expected {TEACHER_FORMS}")


def _teacher_call(spec: tuple[Any, ...]) -> TeacherCall:
    """``(fn,)``, ``(fn, args)`` or ``(fn, args, kwargs)``, checked."""
    if not 1 <= len(spec) <= 3:
        raise ConfigError(f"a tuple spec has 1 to 3 items (fn, args, kwargs), got {len(spec)}")
    defaults: tuple[Any, ...] = ((), {})
    fn, args, kwargs = spec + defaults[len(spec) - 1 :]
    if not callable(fn):
        raise ConfigTypeError(f"first item must be callable, got {type(fn).__name__}")
    if not isinstance(args, (tuple, list)):
        raise ConfigTypeError(f"args must be a tuple or list, got {type(args).__name__}")
    if not isinstance(kwargs, Mapping):
        raise ConfigTypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
    return TeacherCall(fn, tuple(args), dict(kwargs))


def teacher_spec(spec: Any, *, path: str) -> Any:
    """``teacher_model`` in any accepted form, typed (see :func:`_teacher`)."""
    try:
        return _converter().structure(spec, TeacherSpec)  # type: ignore[arg-type]
    except Exception as exc:
        raise _config_error(exc, None, path) from None


def criterion_entries(criterion: Any, *, path: str) -> list[CriterionEntry]:
    """``criterion`` in any accepted form as one list of entries; errors name the path."""
    try:
        return _converter().structure(criterion, CriterionSpec)  # type: ignore[arg-type]
    except Exception as exc:
        raise _config_error(exc, None, path) from None


def project_converter() -> cattrs.Converter:
    """The project's converter (built, and cattrs imported, at first use)."""
    return _converter()


def structure(data: Any, cls: type[T], *, path: str) -> T:
    """Structure ``data`` into ``cls``; errors become :class:`ConfigError` naming the path."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigTypeError(
            f"expected a mapping or {cls.__name__}, got {type(data).__name__}", path=path
        )
    try:
        return _converter().structure(dict(data), cls)
    except Exception as exc:
        raise _config_error(exc, cls, path) from None


def unstructure(config: Any) -> Any:
    """``config`` as plain data (dicts, lists, scalars): the inverse of :func:`structure`."""
    return _converter().unstructure(config)


def check_size(data: Any, *, path: str) -> None:
    """Refuse ``data`` if, expanded, it holds more than :data:`MAX_CONFIG_VALUES` values.

    A few nested lists that share their items (``[x] * 10`` thirty times: an alias bomb built in
    Python) stand for more values than any message could show or any check could walk. Stops
    as soon as the limit is passed.
    """
    count = 0
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, Mapping):
            items: Any = [*value.keys(), *value.values()]
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = value
        elif attrs.has(type(value)):  # a config class instance
            items = [getattr(value, field.name) for field in attrs.fields(type(value))]
        else:
            continue
        count += len(items)
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"holds more than {MAX_CONFIG_VALUES:,} values (a part shared by several places "
                "counts each time)",
                path=path,
            )
        stack.extend(item for item in items if not isinstance(item, (str, bytes, int, float)))


def _config_error(exc: BaseException, cls: Any, path: str) -> ConfigError:
    """The first leaf of a cattrs error tree, as a ConfigError with the leaf's path."""
    if isinstance(exc, _Within):
        return _config_error(exc.cause, None, f"{path}{exc.where}")
    if isinstance(exc, ConfigError):  # from a structure hook, which does not know the path
        return exc if exc.path or not path else type(exc)(str(exc), path=path)
    from cattrs.errors import (
        ClassValidationError,
        ForbiddenExtraKeysError,
        IterableValidationError,
    )

    if isinstance(exc, ForbiddenExtraKeysError):
        # Fields compared for equality are the data; others (CriterionEntry.where) are not keys.
        valid = [f.name for f in attrs.fields(exc.cl) if f.eq] if attrs.has(exc.cl) else []
        key = sorted(exc.extra_fields)[0]
        return ConfigError(f"unknown key{did_you_mean(key, valid)}", path=f"{path}.{key}")
    if isinstance(exc, ClassValidationError):
        with_notes, without_notes = exc.group_exceptions()
        for inner in without_notes:  # a misspelt key explains the missing one: say it first
            if isinstance(inner, ForbiddenExtraKeysError):
                return _config_error(inner, cls, path)
        for inner, note in with_notes:
            return _config_error(inner, None, f"{path}.{note.name}")
        for inner in without_notes:
            return _config_error(inner, cls, path)
    if isinstance(exc, IterableValidationError):
        indexed, unindexed = exc.group_exceptions()
        for inner, index_note in indexed:
            return _config_error(inner, None, f"{path}[{index_note.index}]")
        for inner in unindexed:
            return _config_error(inner, None, path)
    if isinstance(exc, KeyError):
        return ConfigError("required key missing", path=path)
    if isinstance(exc, TypeError):
        return ConfigTypeError(str(exc), path=path)
    return ConfigError(str(exc), path=path)


def is_plugin_ref(value: object) -> bool:
    """A plugin reference is a :class:`~kdcore._config.PluginRef`, or a mapping whose ``name``
    picks a registered plugin."""
    return isinstance(value, PluginRef) or (isinstance(value, Mapping) and PLUGIN_NAME_KEY in value)


def instantiate(registry: Registry[Any], ref: PluginRef | Mapping[str, Any], *, path: str) -> Any:
    """Call the plugin ``ref.name`` with ``ref.kwargs`` (a mapping's other keys).

    ``name`` is a registered name, or a ``"package.module:Class"`` reference for a class that
    no plugin registers.
    """
    try:
        ref = _plugin_ref(ref, registry.kind)
    except Exception as exc:
        raise _config_error(exc, None, path) from None
    name, kwargs = ref.name, ref.kwargs
    if ":" in name:
        try:
            factory = resolve(name, what=f"{registry.kind} class")
        except KDCoreError as exc:
            raise _at_path(exc, f"{path}.{PLUGIN_NAME_KEY}") from None
        if not isinstance(factory, type):  # a function named by reference is used as it is
            if kwargs:
                raise ConfigError(
                    f"{name!r} is a function, used as it is: it takes no config keys "
                    f"(got {', '.join(kwargs)})",
                    path=path,
                )
            return factory
    else:
        factory = registry.get(name, where=f"{path}.{PLUGIN_NAME_KEY}")
    check_kwargs(factory, kwargs, path=path, what=f"{registry.kind} {name!r}")
    try:
        return factory(**kwargs)
    except KDCoreError as exc:
        if not getattr(exc, "path", "") and exc.args:  # its own check: say whose it is
            exc.args = (f"{registry.kind} {name!r} refused its arguments: {exc.args[0]}",)
        raise _at_path(exc, path) from None
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int too large for float
        error = ConfigTypeError if isinstance(exc, TypeError) else ConfigError
        message = cut(str(exc), 5 * SHOWN_CHARACTERS)  # the plugin may show a huge value
        raise error(
            f"{registry.kind} {name!r} refused its arguments: {message}", path=path
        ) from exc


def _at_path(exc: KDCoreError, path: str) -> KDCoreError:
    """Prefix ``exc``'s message with ``path`` unless it already names one."""
    if not getattr(exc, "path", "") and not str(exc).startswith(path):
        exc.args = (f"{path}: {exc.args[0]}", *exc.args[1:])
        if isinstance(exc, ConfigError):
            exc.path = path
    return exc


def check_kwargs(factory: Any, kwargs: Mapping[str, Any], *, path: str, what: str) -> None:
    """Refuse keyword arguments ``factory`` does not take, with a close-match hint."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(
                f"unknown key{did_you_mean(key, accepted)} "
                f"({what} takes: {', '.join(accepted) or 'no arguments'})",
                path=f"{path}.{key}",
            )
