"""Argument checks shared by criteria, built-in and third-party.

Each check returns the value it accepts (converted where that helps: numbers to ``float``) and
raises :class:`kdcore.ConfigTypeError` (a ``TypeError``) for a value of the wrong type and
:class:`kdcore.ConfigError` (a ``ValueError``) for one out of range, with a message naming the
argument and the value; a criterion built from a config then reports where it came from::

    from kdcore.validation import (
        IGNORE_INDEX, check_ignore_index, check_reduction, check_temperature)

    class MyLoss(nn.Module):
        def __init__(self, temperature=1.0, reduction="mean", ignore_index=IGNORE_INDEX):
            super().__init__()
            self.temperature = check_temperature(temperature)
            self.reduction = check_reduction(reduction)
            self.ignore_index = check_ignore_index(ignore_index)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from kdcore._errors import ConfigError, ConfigTypeError, shown

#: The label of positions that do not count (prompt, padding), as PyTorch and Hugging Face use it.
IGNORE_INDEX = -100
#: The reductions of the logit criteria; feature criteria accept those but ``"batchmean"``.
REDUCTIONS = ("mean", "sum", "batchmean", "none")

__all__ = [
    "IGNORE_INDEX",
    "REDUCTIONS",
    "as_logits",
    "check_ignore_index",
    "check_int",
    "check_labels",
    "check_non_negative",
    "check_number",
    "check_positive",
    "check_positive_int",
    "check_reduction",
    "check_temperature",
    "check_unit_interval",
]


def check_number(name: str, value: Any) -> float:
    """``value`` as a float; a bool is not a number here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"{name} must be a number, got {shown(value)}")
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    number = check_number(name, value)
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{name} must be finite and >= 0, got {shown(value)}")
    return number


def check_positive(name: str, value: Any) -> float:
    number = check_number(name, value)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{name} must be finite and > 0, got {shown(value)}")
    return number


def check_temperature(temperature: Any, name: str = "temperature") -> float:
    """A softmax temperature: finite and > 0 (``name``: the argument errors name)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ConfigTypeError(f"{name} must be a number, got {shown(temperature)}")
    if not temperature > 0 or temperature == math.inf:
        raise ConfigError(f"{name} must be finite and > 0, got {shown(temperature)}")
    return float(temperature)


def check_unit_interval(name: str, value: Any, *, upper_open: bool = False) -> float:
    """A number in [0, 1] (or [0, 1) with ``upper_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"{name} must be a number, got {shown(value)}")
    if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise ConfigError(
            f"{name} must be in [0, 1{')' if upper_open else ']'}, got {shown(value)}"
        )
    return float(value)


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """An int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{name} must be an int, got {shown(value)}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {shown(value)}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """A size or count: an int > 0 (``ValueError`` for anything else, as for a width of 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {shown(value)}")
    return value


def check_reduction(reduction: Any, allowed: Sequence[str] = REDUCTIONS) -> str:
    """One of ``allowed`` (by default :data:`REDUCTIONS`)."""
    if reduction not in allowed:
        raise ConfigError(f"reduction must be one of {', '.join(allowed)}; got {shown(reduction)}")
    return str(reduction)


def check_ignore_index(ignore_index: Any) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ConfigTypeError(f"ignore_index must be an int, got {shown(ignore_index)}")
    return ignore_index


def check_labels(labels: Any, what: str) -> torch.Tensor:
    """``labels`` as given, if it is an integer (or bool) tensor; ``what`` prefixes the error."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"{what}: labels must be an integer tensor, got "
            f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    return labels


def as_logits(output: Any, side: str) -> torch.Tensor:
    """The logits tensor of a model output: the tensor itself, ``.logits``, or a tuple's first.

    ``side`` (``"student"`` or ``"teacher"``) names the output in the error.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"expected the {side} output to be a logits tensor (or to have .logits), "
        f"got {type(output).__name__}"
    )
