"""Config classes of the built-in distillation modes (plain data; see :mod:`kdcore._converter`).

The converter turns what a user writes into these types: every accepted criterion form into
one list of :class:`CriterionEntry`, each ``{"name": ...}`` mapping into a :class:`PluginRef`,
each teacher call into a :class:`TeacherCall`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import attrs


@attrs.frozen
class PluginRef:
    """A plugin reference, ``{"name": "logits", "temperature": 2.0}`` in a config: the
    registered name (or a ``"package.module:Class"`` reference) and the keyword arguments the
    plugin is called with."""

    name: str
    kwargs: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class CriterionEntry:
    """One criterion entry: a student layer, a teacher layer and the loss between their outputs
    (a :class:`PluginRef`, or a loss object given in Python)."""

    student: str
    teacher: str
    loss: Any
    #: where the entry was written, relative to ``criterion`` ("" for a single loss, "[1]"):
    #: errors name the place the user wrote
    where: str = attrs.field(default="", eq=False, repr=False, kw_only=True)


@attrs.frozen
class TeacherCall:
    """A teacher built by a call, ``fn(*args, **kwargs)``: what the forms ``fn``, ``(fn,)``,
    ``(fn, args)`` and ``(fn, args, kwargs)`` of ``teacher_model`` mean."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = attrs.field(factory=dict)


TEACHER_FORMS = (
    "an nn.Module, a class or callable returning one, a tuple (fn,), (fn, args) or "
    "(fn, args, kwargs), a teacher-loader mapping {'name': ..., ...}, or several teachers "
    "as {key: spec}"
)
#: What ``teacher_model`` accepts (:data:`TEACHER_FORMS`); the converter makes each a
#: :class:`PluginRef`, a :class:`TeacherCall`, an ``nn.Module`` or ``{key: spec}`` of those.
TeacherSpec = Union[  # noqa: UP007
    PluginRef, TeacherCall, Mapping[str, Any], tuple[Any, ...], Callable[..., Any]
]
#: What ``criterion`` accepts; the converter turns each form into ``list[CriterionEntry]``.
CriterionSpec = Union[  # noqa: UP007 (a runtime object: cattrs dispatches on it)
    list[CriterionEntry], Mapping[Any, Any], Sequence[Any], Callable[..., Any]
]
#: What ``loss_balancer`` accepts: None, a balancer object, or a :class:`PluginRef` mapping.
BalancerSpec = Union[PluginRef, Mapping[str, Any], Any, None]  # noqa: UP007


@attrs.define(kw_only=True)
class KDLossConfig:
    """Config of the ``kd_loss`` mode.

    ``teacher_model``
        an ``nn.Module``; a class or (non-lambda) callable returning one; a tuple ``(fn,)``,
        ``(fn, args)`` or ``(fn, args, kwargs)``; or a teacher-loader mapping
        ``{"name": "callable", "target": "pkg.mod:fn", ...}``.
    ``criterion``
        one loss, applied to the two models' outputs; or ``{(student_layer, teacher_layer): loss}``;
        or a list of ``{"student": ..., "teacher": ..., "loss": ...}``. A loss is an ``nn.Module``,
        a callable, or a mapping ``{"name": "<registered criterion>", **kwargs}``.
    ``loss_balancer``
        ``None`` (only with a single KD loss), a :class:`~kdcore.DistillationLossBalancer` or
        a mapping ``{"name": "static", "kd_loss_weight": 0.5}``.
    ``expose_minimal_state_dict``
        hide the teacher from ``state_dict()`` (it is rebuilt from ``teacher_model``).
    """

    teacher_model: TeacherSpec
    criterion: CriterionSpec
    loss_balancer: BalancerSpec = None
    expose_minimal_state_dict: bool = True


@attrs.define(kw_only=True)
class LayerwiseKDConfig(KDLossConfig):
    """Config of the ``layerwise_kd`` mode: like :class:`KDLossConfig`, but ``criterion`` must
    pair layers explicitly, and each paired student layer is fed its teacher layer's input."""
