"""The loss-balancer protocol: how a dict of losses becomes the one scalar to backpropagate."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

STUDENT_LOSS_KEY = "student_loss"


class DistillationLossBalancer(nn.Module):
    """Base class of loss balancers.

    ``forward(loss_dict)`` receives ``{"student_loss": ..., "<Loss>_<i>": ...}`` in criterion
    order (``student_loss`` only when given) and returns a scalar tensor. Balancers hold no
    parameters (kdcore refuses one that does): anything learnable belongs in a loss module.
    A balancer whose total weighs ``student_loss`` says so with :attr:`needs_student_loss`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._student_loss_reduction_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def set_student_loss_reduction_fn(
        self, fn: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> None:
        """Apply ``fn`` to ``student_loss`` before balancing (e.g. ``lambda l: l.mean()``)."""
        self._student_loss_reduction_fn = fn

    @property
    def needs_student_loss(self) -> bool:
        """Whether part of the total is ``student_loss``, so ``compute_kd_loss`` must get it.

        ``compute_kd_loss`` reads it when called without ``student_loss`` (a
        :class:`StudentLossWeightWarning`, once per model). Override it; the default is False.
        """
        return False

    def check_kd_losses(self, names: Sequence[str]) -> None:
        """Called by ``convert`` with the KD loss keys; raise ``ValueError`` if they do not fit."""

    def pop_student_loss(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Remove and return ``student_loss`` (reduced), or None when it was not given."""
        student_loss = loss_dict.pop(STUDENT_LOSS_KEY, None)
        if student_loss is not None and self._student_loss_reduction_fn is not None:
            student_loss = self._student_loss_reduction_fn(student_loss)
        return student_loss

    def forward(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class StudentLossWeightWarning(UserWarning):
    """``compute_kd_loss`` got no ``student_loss`` but the balancer weighs it
    (:attr:`DistillationLossBalancer.needs_student_loss`); said once per model."""
