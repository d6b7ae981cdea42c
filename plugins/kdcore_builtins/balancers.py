"""The built-in loss balancers: ``static``, ``scheduled`` and ``logits_magnitude``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

import kdcore
from kdcore import DistillationLossBalancer
from kdcore.plugin import Registry, did_you_mean


class StaticLossBalancer(DistillationLossBalancer):
    """Fixed weights: ``total = sum(w_i * kd_loss_i) + (1 - sum(w)) * student_loss``.

    ``kd_loss_weight`` is one number (a single KD loss) or one number per KD loss in criterion
    order; weights are >= 0 and sum to at most 1. When they sum to less than 1 the remainder
    weighs ``student_loss``, which ``compute_kd_loss`` must then receive.
    """

    def __init__(self, kd_loss_weight: float | Sequence[float] = 0.5) -> None:
        super().__init__()
        self.kd_loss_weight = kd_loss_weight
        self.weights = _checked_weights(kd_loss_weight)
        # Sums a rounding error above 1 are accepted as 1: the student weight is never negative.
        self.student_loss_weight = max(0.0, 1.0 - math.fsum(self.weights))

    @property
    def needs_student_loss(self) -> bool:
        return self.student_loss_weight > 0

    def check_kd_losses(self, names: Sequence[str]) -> None:
        if len(names) != len(self.weights):
            raise ValueError(
                f"kd_loss_weight={self.kd_loss_weight!r} gives {len(self.weights)} weight(s) but "
                f"there are {len(names)} KD losses ({', '.join(names)}); give one weight per loss"
            )

    def forward(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = dict(loss_dict)
        student_loss = self.pop_student_loss(losses)
        if len(losses) != len(self.weights):
            self.check_kd_losses(list(losses))  # raises with the names
        kd_losses = iter(zip(self.weights, losses.values(), strict=True))
        weight, loss = next(kd_losses)
        total = weight * loss  # not sum(): starting from 0 adds a node to the graph
        for weight, loss in kd_losses:
            total = total + weight * loss
        if student_loss is not None:
            total = total + self.student_loss_weight * student_loss
        elif self.student_loss_weight > 0:
            raise ValueError(
                f"the KD weights sum to {1 - self.student_loss_weight:g}, so "
                f"{self.student_loss_weight:g} of the total is student_loss, but "
                "compute_kd_loss got no student_loss"
            )
        return total

    def extra_repr(self) -> str:
        return f"kd_loss_weight={self.kd_loss_weight!r}"


def _checked_weights(kd_loss_weight: Any) -> list[float]:
    values = kd_loss_weight if isinstance(kd_loss_weight, (list, tuple)) else [kd_loss_weight]
    if not values:
        raise ValueError("kd_loss_weight is empty; give one weight per KD loss")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"kd_loss_weight must be numbers, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"kd_loss_weight must be finite and >= 0, got {value!r}")
    weights = [float(v) for v in values]
    if math.fsum(weights) > 1 + 1e-9:
        raise ValueError(f"kd_loss_weight must sum to at most 1, got {kd_loss_weight!r}")
    return weights


SCHEDULES = ("linear", "cosine")


class ScheduledLossBalancer(DistillationLossBalancer):
    """KD weights that ramp from ``start`` to ``end`` over ``steps`` steps, then stay at ``end``.

    At step ``k`` the ramp's progress is ``x = min(k, steps) / steps`` and each weight is
    ``start + (end - start) * f(x)``, with ``f(x) = x`` (``schedule="linear"``) or
    ``f(x) = (1 - cos(pi * x)) / 2`` (``"cosine"``). The total is
    ``sum(w_i * kd_loss_i) + (1 - sum(w)) * student_loss``, as for ``static``.

    ``start`` and ``end`` are each either one number, the total KD weight, split equally between
    the KD losses (``w_i = w / n``), or a list with one weight per KD loss in criterion order.
    Weights are >= 0 and sum to at most 1 at both ends (so at every step). ``student_loss`` is
    required whenever either end sums to less than 1.

    The step counter ``current_step`` is a registered buffer, so ``state_dict``,
    ``kd.save``/``kd.restore`` carry it. Each call of the balancer (one per
    ``compute_kd_loss``) in training mode uses the current weights, then counts one call; every
    ``advance_every`` calls the step advances by one (``pending_calls``, also a buffer, counts
    the calls in between). With gradient accumulation over ``k`` micro-batches set
    ``advance_every=k`` so that ``steps`` counts optimizer steps. With ``advance_every=None``
    calls never advance the step: call :meth:`step` yourself (e.g. after ``optimizer.step()``,
    as ``model.loss_balancer.step()``). In eval mode the weights are used and nothing advances.
    """

    current_step: torch.Tensor
    pending_calls: torch.Tensor

    def __init__(
        self,
        steps: int,
        start: float | Sequence[float] = 0.0,
        end: float | Sequence[float] = 0.5,
        schedule: str = "linear",
        advance_every: int | None = 1,
    ) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}"
                + (did_you_mean(schedule, SCHEDULES) if isinstance(schedule, str) else "")
            )
        if advance_every is not None and (
            isinstance(advance_every, bool)
            or not isinstance(advance_every, int)
            or advance_every <= 0
        ):
            raise ValueError(
                f"advance_every must be a positive int, or None to advance only by step(); "
                f"got {advance_every!r}"
            )
        starts, ends = _schedule_weights("start", start), _schedule_weights("end", end)
        if starts is not None and ends is not None and len(starts) != len(ends):
            raise ValueError(
                f"start={start!r} and end={end!r} give different numbers of per-loss weights"
            )
        self.steps = steps
        self.start = start
        self.end = end
        self.schedule = schedule
        self.advance_every = advance_every
        self._starts, self._ends = starts, ends
        self.register_buffer("current_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("pending_calls", torch.zeros((), dtype=torch.long))

    @property
    def needs_student_loss(self) -> bool:
        return min(_total(self.start), _total(self.end)) < 1

    def check_kd_losses(self, names: Sequence[str]) -> None:
        for per_loss, argument in ((self._starts, "start"), (self._ends, "end")):
            if per_loss is not None and len(per_loss) != len(names):
                raise ValueError(
                    f"{argument}={getattr(self, argument)!r} gives {len(per_loss)} weight(s) but "
                    f"there are {len(names)} KD losses ({', '.join(names)}); give one weight per "
                    "loss, or one number to split equally"
                )
        if not names:
            raise ValueError("there are no KD losses to weigh")

    def progress(self) -> torch.Tensor:
        """``f(min(current_step, steps) / steps)``, a float tensor in [0, 1]."""
        x = self.current_step.clamp(max=self.steps).to(self._dtype()) / self.steps
        if self.schedule == "cosine":
            return (1 - torch.cos(math.pi * x)) / 2
        return x

    def kd_weights(self, num_losses: int) -> torch.Tensor:
        """The ``[num_losses]`` KD weights at the current step, on the buffer's device."""
        starts = self._starts or [_total(self.start) / num_losses] * num_losses
        ends = self._ends or [_total(self.end) / num_losses] * num_losses
        device, dtype = self.current_step.device, self._dtype()
        first = torch.tensor(starts, dtype=dtype, device=device)
        last = torch.tensor(ends, dtype=dtype, device=device)
        return first + (last - first) * self.progress()

    def _dtype(self) -> torch.dtype:
        # float64 where the device has it (MPS does not), so that weights are exact to print
        return torch.float32 if self.current_step.device.type == "mps" else torch.float64

    @torch.no_grad()
    def step(self) -> None:
        """Advance the schedule by one step now (for ``advance_every=None``)."""
        self.current_step += 1

    def forward(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = dict(loss_dict)
        student_loss = self.pop_student_loss(losses)
        self.check_kd_losses(list(losses))
        weights = self.kd_weights(len(losses))
        total: Any = sum(
            w.to(loss.dtype) * loss for w, loss in zip(weights, losses.values(), strict=True)
        )
        if student_loss is not None:
            student_weight = (1 - weights.sum()).clamp(min=0)
            total = total + student_weight.to(student_loss.dtype) * student_loss
        elif self.needs_student_loss:
            raise ValueError(
                f"the KD weights sum to {_total(self.start):g} at the start and "
                f"{_total(self.end):g} at the end, so part of the total is student_loss, but "
                "compute_kd_loss got no student_loss"
            )
        if self.training and self.advance_every is not None:
            self._count_call(self.advance_every)
        return total

    @torch.no_grad()
    def _count_call(self, advance_every: int) -> None:
        # Tensor arithmetic only: no host-device synchronisation per training step.
        self.pending_calls += 1
        completed = self.pending_calls >= advance_every
        self.current_step += completed.to(self.current_step.dtype)
        self.pending_calls.masked_fill_(completed, 0)

    def extra_repr(self) -> str:
        return (
            f"steps={self.steps}, start={self.start!r}, end={self.end!r}, "
            f"schedule={self.schedule!r}, advance_every={self.advance_every!r}"
        )


def _schedule_weights(name: str, value: Any) -> list[float] | None:
    """The per-loss weights ``value`` lists, or None for one number (checked either way)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"{name} is empty; give one number or one weight per KD loss")
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise TypeError(f"{name} must be a number or a list of numbers, got {item!r}")
        if not math.isfinite(item) or item < 0:
            raise ValueError(f"{name} weights must be finite and >= 0, got {item!r}")
    if math.fsum(values) > 1 + 1e-9:
        raise ValueError(f"{name} weights must sum to at most 1, got {value!r}")
    return [float(v) for v in values] if isinstance(value, (list, tuple)) else None


def _total(value: Any) -> float:
    return math.fsum(value) if isinstance(value, (list, tuple)) else float(value)


class LogitsMagnitudeBalancer(DistillationLossBalancer):
    """Intermediate KD losses rescaled to the logits loss's magnitude (as Megatron-LM's
    distillation with ModelOpt balances them).

    One KD loss is the logits loss ``L``: ``logits_loss`` names its key (``"<Loss>_<i>"``) or
    index in criterion order; by default the first. The others, ``I_1 .. I_m``, are averaged,
    ``I = mean(I_k)``, and rescaled: ``I * (|L| / |I|)`` with the ratio computed on detached
    values (a constant: the gradient is that of ``I``, scaled), left unscaled when ``I`` is 0.
    The KD loss is ``K = L + I * |L| / |I|`` (just ``L`` without intermediates). With
    ``match_student_loss`` ``K`` is rescaled likewise to the student loss's magnitude,
    ``K * |S| / |K|`` (Megatron's default). The total is
    ``kd_loss_weight * K + (1 - kd_loss_weight) * student_loss``.

    Every loss must be a scalar (reduce with ``loss_reduction_fn`` if needed). ``student_loss``
    is required when ``kd_loss_weight < 1`` or with ``match_student_loss``.
    """

    def __init__(
        self,
        kd_loss_weight: float = 0.5,
        logits_loss: str | int | None = None,
        match_student_loss: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(kd_loss_weight, bool) or not isinstance(kd_loss_weight, (int, float)):
            raise TypeError(f"kd_loss_weight must be a number, got {kd_loss_weight!r}")
        if not 0 <= kd_loss_weight <= 1:
            raise ValueError(f"kd_loss_weight must be in [0, 1], got {kd_loss_weight!r}")
        if logits_loss is not None and (
            isinstance(logits_loss, bool)
            or not isinstance(logits_loss, (str, int))
            or (isinstance(logits_loss, int) and logits_loss < 0)
            or logits_loss == ""
        ):
            raise ValueError(
                "logits_loss must be a KD loss key ('<Loss>_<i>'), an index >= 0 in criterion "
                f"order, or None for the first; got {logits_loss!r}"
            )
        if not isinstance(match_student_loss, bool):
            raise TypeError(f"match_student_loss must be a bool, got {match_student_loss!r}")
        self.kd_loss_weight = kd_loss_weight
        self.logits_loss = logits_loss
        self.match_student_loss = match_student_loss

    @property
    def needs_student_loss(self) -> bool:
        return self.kd_loss_weight < 1 or self.match_student_loss

    def logits_key(self, names: Sequence[str]) -> str:
        """The key of the logits loss among the KD loss keys ``names``."""
        if not names:
            raise ValueError("there are no KD losses to weigh")
        if self.logits_loss is None:
            return names[0]
        if isinstance(self.logits_loss, int):
            if self.logits_loss >= len(names):
                raise ValueError(
                    f"logits_loss={self.logits_loss} but there are {len(names)} KD losses "
                    f"({', '.join(names)})"
                )
            return names[self.logits_loss]
        if self.logits_loss not in names:
            raise ValueError(
                f"logits_loss={self.logits_loss!r} is not a KD loss"
                f"{did_you_mean(self.logits_loss, names)} (KD losses: {', '.join(names)})"
            )
        return self.logits_loss

    def check_kd_losses(self, names: Sequence[str]) -> None:
        self.logits_key(names)

    def forward(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = dict(loss_dict)
        student_loss = self.pop_student_loss(losses)
        for key, value in losses.items():
            if value.dim() != 0:
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)}; {type(self).__name__} needs scalar "
                    "losses (use a reduction or compute_kd_loss(loss_reduction_fn=...))"
                )
        logits = losses.pop(self.logits_key(list(losses)))
        kd = logits
        if losses:
            intermediate: torch.Tensor = sum(losses.values()) / len(losses)  # type: ignore[assignment]
            kd = logits + intermediate * _magnitude_ratio(logits, intermediate)
        if student_loss is None:
            if self.needs_student_loss:
                raise ValueError(
                    f"kd_loss_weight={self.kd_loss_weight!r}"
                    + (" with match_student_loss" if self.match_student_loss else "")
                    + " needs student_loss, but compute_kd_loss got none"
                )
            return kd
        if student_loss.dim() != 0:
            raise ValueError(
                f"student_loss has shape {tuple(student_loss.shape)}; {type(self).__name__} "
                "needs a scalar (set_student_loss_reduction_fn can reduce it)"
            )
        if self.match_student_loss:
            kd = kd * _magnitude_ratio(student_loss, kd)
        return self.kd_loss_weight * kd + (1 - self.kd_loss_weight) * student_loss

    def extra_repr(self) -> str:
        return (
            f"kd_loss_weight={self.kd_loss_weight!r}, logits_loss={self.logits_loss!r}, "
            f"match_student_loss={self.match_student_loss!r}"
        )


def _magnitude_ratio(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``|target| / |value|`` on detached values; 1 where ``value`` is 0."""
    target, value = target.detach().abs(), value.detach().abs()
    nonzero = value > 0
    return torch.where(nonzero, target / torch.where(nonzero, value, 1), 1)


@kdcore.hookimpl
def kdcore_register_balancers(registry: Registry[Any]) -> None:
    registry.add("static", StaticLossBalancer)
    registry.add("scheduled", ScheduledLossBalancer)
    registry.add("logits_magnitude", LogitsMagnitudeBalancer)
