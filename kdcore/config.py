"""Config classes of the built-in distillation modes (plain data; see :mod:`kdcore.converter`)."""

from __future__ import annotations

from typing import Any

import attrs


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

    teacher_model: Any
    criterion: Any
    loss_balancer: Any = None
    expose_minimal_state_dict: bool = True


@attrs.define(kw_only=True)
class LayerwiseKDConfig(KDLossConfig):
    """Config of the ``layerwise_kd`` mode: like :class:`KDLossConfig`, but ``criterion`` must
    pair layers explicitly, and each paired student layer is fed its teacher layer's input."""
