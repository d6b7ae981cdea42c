"""What every divergence shares around its kernel: which positions count (``labels`` and
``ignore_index``), how the per-position values reduce (``reduction``, ``num_items_in_batch``) and
how two vocabularies line up (``vocab_alignment``); the rules are in
:mod:`kdcore_builtins.divergences`."""

from __future__ import annotations

import math
from typing import Any

import torch

from kdcore.validation import (
    check_ignore_index,
    check_int,
    check_labels,
    check_reduction,
    check_temperature,
)

VOCAB_ALIGNMENTS = ("error", "truncate", "mask")
DEFAULT_MAX_VOCAB_PADDING = 256
VOCAB_HINT = "pass vocab_alignment='truncate' or 'mask'"


def check_vocab_alignment(vocab_alignment: Any) -> str:
    if vocab_alignment not in VOCAB_ALIGNMENTS:
        raise ValueError(
            f"vocab_alignment must be one of {', '.join(VOCAB_ALIGNMENTS)}; got {vocab_alignment!r}"
        )
    return str(vocab_alignment)


class SharedArguments:
    """The arguments every divergence takes, as attributes of their names: the loss classes
    inherit this (``kd.save`` records their constructor arguments from these attributes), the
    functional forms use :func:`check_shared_arguments`."""

    temperature: float
    reduction: str
    ignore_index: int
    vocab_alignment: str
    max_vocab_padding: int

    def set_shared_arguments(
        self,
        temperature: Any,
        reduction: Any,
        ignore_index: Any,
        vocab_alignment: Any,
        max_vocab_padding: Any,
    ) -> None:
        """Check the shared arguments and keep them."""
        self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.ignore_index = check_ignore_index(ignore_index)
        self.vocab_alignment = check_vocab_alignment(vocab_alignment)
        self.max_vocab_padding = check_int("max_vocab_padding", max_vocab_padding, minimum=0)


def check_shared_arguments(
    temperature: Any,
    reduction: Any,
    ignore_index: Any,
    vocab_alignment: Any,
    max_vocab_padding: Any,
) -> SharedArguments:
    """The arguments every divergence takes, checked."""
    shared = SharedArguments()
    shared.set_shared_arguments(
        temperature, reduction, ignore_index, vocab_alignment, max_vocab_padding
    )
    return shared


def align_vocabularies(
    student_vocab: int,
    teacher_vocab: int,
    *,
    vocab_alignment: str,
    max_vocab_padding: int,
    what: str,
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    hint: str = VOCAB_HINT,
) -> tuple[int, int]:
    """(student columns compared, real teacher columns) under ``vocab_alignment``."""
    if student_vocab == teacher_vocab:
        return student_vocab, teacher_vocab
    if vocab_alignment == "error":
        shown = (
            f"student output {shapes[0]} and teacher output {shapes[1]} differ in shape"
            if shapes is not None
            else f"student vocabulary {student_vocab} and teacher vocabulary {teacher_vocab} differ"
        )
        raise ValueError(
            f"{what}: {shown}; if the vocabularies differ only by padding (e.g. 151936 vs "
            f"152064), {hint}"
        )
    difference = abs(student_vocab - teacher_vocab)
    if difference > max_vocab_padding:
        raise ValueError(
            f"{what}: student vocabulary {student_vocab} and teacher vocabulary {teacher_vocab} "
            f"differ by {difference} columns, more than max_vocab_padding={max_vocab_padding}: "
            "that is not padding (different tokenizers cannot be aligned column by column)"
        )
    shared = min(student_vocab, teacher_vocab)
    if vocab_alignment == "truncate":
        return shared, shared
    return student_vocab, shared  # "mask": the student's full softmax, teacher zero past `shared`


def kept_rows(
    labels: Any,
    positions_shape: tuple[int, ...],
    ignore_index: int,
    device: torch.device,
    what: str,
) -> torch.Tensor | None:
    if labels is None:
        return None
    check_labels(labels, what)
    if labels.numel() != math.prod(positions_shape):
        raise ValueError(
            f"{what}: labels {tuple(labels.shape)} do not match the positions "
            f"{positions_shape} of the logits (one label per position)"
        )
    keep = labels.reshape(-1).to(device) != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(-1)


def kept_count(rows: torch.Tensor | None, student: torch.Tensor) -> int:
    return int(rows.numel()) if rows is not None else math.prod(student.shape[:-1])


def check_num_items(num_items_in_batch: Any, reduction: str, what: str) -> float | None:
    if num_items_in_batch is None:
        return None
    if reduction != "batchmean":
        raise ValueError(
            f"{what}: num_items_in_batch divides the summed loss, which only reduction="
            f"'batchmean' does (this loss has reduction={reduction!r})"
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"{what}: num_items_in_batch must be a single count")
        num_items_in_batch = num_items_in_batch.item()
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(f"{what}: num_items_in_batch must be a number, got {num_items_in_batch!r}")
    if not 0 <= num_items_in_batch < math.inf:
        raise ValueError(
            f"{what}: num_items_in_batch must be a finite count >= 0, got {num_items_in_batch!r}"
        )
    return float(max(num_items_in_batch, 1))  # no token in the whole step: the sum is 0 too


def reduce_rows(
    per_row: torch.Tensor,
    *,
    reduction: str,
    rows: torch.Tensor | None,
    labelled: bool,
    positions_shape: tuple[int, ...],
    first_dim: int,
    classes: int,
    num_items: float | None,
    scale: float,
) -> torch.Tensor:
    """Reduce the per-kept-row divergences as :mod:`kdcore_builtins.divergences` describes, times
    ``scale``."""
    kept = per_row.shape[0]
    if reduction == "none":
        if rows is not None:
            full = per_row.new_zeros(math.prod(positions_shape))
            per_row = full.index_copy(0, rows, per_row)
        return per_row.reshape(positions_shape) * scale
    total = per_row.sum()
    denominator = reduction_denominator(reduction, labelled, kept, first_dim, classes, num_items)
    return total * (scale / denominator)


def reduction_denominator(
    reduction: str,
    labelled: bool,
    kept: int,
    first_dim: int,
    classes: int,
    num_items: float | None,
) -> float:
    if reduction == "sum":
        return 1.0
    if reduction == "mean":
        return float(max(kept, 1) * classes)
    if num_items is not None:
        return num_items
    return float(max(kept if labelled else first_dim, 1))
