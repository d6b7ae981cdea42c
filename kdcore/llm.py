"""Helpers for distilling causal language models: the label shift, ignore-index masks, and a
token normalisation that stays right under gradient accumulation and data parallelism.

The causal shift. A causal LM's logits at position ``i`` predict token ``i + 1``, so the label of
logit row ``i`` is ``labels[i + 1]`` (Hugging Face ``labels`` are the input ids with ``-100`` on
the positions that do not count: prompt, padding). :func:`causal_shift` returns the aligned
views ``logits[..., :-1, :]`` and ``labels[..., 1:]``; :func:`shift_labels` returns the shifted
labels at the logits' full length instead (``-100`` on the last position), which masks the same
positions without touching the logits. Prefer it with kdcore's divergences: a sliced
``[B, S - 1, V]`` view of ``[B, S, V]`` logits cannot be flattened without a copy. Teacher and
student logits at the same position predict the same token, so the divergence itself needs no
shift; only the mask does.

Normalising by tokens. With gradient accumulation over micro-batches ``m`` and data-parallel
ranks ``r``, the loss of one optimiser step, as a mean over its tokens, is

    L = sum_{m, r} S_{m, r} / N,    N = sum_{m, r} n_{m, r},

where ``S_{m, r}`` is the summed loss of micro-batch ``m`` on rank ``r`` over its ``n_{m, r}``
non-ignored tokens. So each micro-batch must backward ``S_{m, r} / N``: its *sum* over the
*global* token count ``N`` (:func:`num_items_in_batch`, the name Hugging Face's Trainer uses).
Averaging per micro-batch (``S / n``, then dividing by the number of micro-batches) gives a
micro-batch holding 10 tokens the same weight as one holding 1000, i.e. each of its tokens 100
times the weight; the result depends on how the batch was split, and differs from the
full-batch loss. DDP then *averages* gradients over the ``W`` ranks, so multiply by ``W``
(:func:`token_normalized` does both): ``loss_{m, r} = S_{m, r} * W / N``.

With kdcore (``from kdcore import llm``)::

    n = llm.num_items_in_batch([mb["labels"] for mb in micro_batches], shift=True)
    for mb in micro_batches:
        model(mb["input_ids"])
        kd_loss = model.compute_kd_loss(labels=llm.shift_labels(mb["labels"]),
                                        num_items_in_batch=n)   # batchmean: sum / n
        (kd_loss * llm.data_parallel_world_size()).backward()

(the divergences of the built-in divergence criteria with ``reduction="batchmean"`` divide
their sum by ``num_items_in_batch``; normalise the student's cross-entropy the same way, with
``reduction="sum"`` and ``/ n``, or with ``fused_linear_cross_entropy(hidden, weight, labels,
num_items_in_batch=n)`` of ``kdcore_builtins.divergences``, which never holds the logits).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kdcore.validation import IGNORE_INDEX, check_labels

__all__ = [
    "IGNORE_INDEX",
    "causal_shift",
    "count_tokens",
    "data_parallel_world_size",
    "num_items_in_batch",
    "shift_labels",
    "token_normalized",
]


def _check_labels(labels: object, what: str) -> torch.Tensor:
    labels = check_labels(labels, what)
    if labels.dim() == 0:
        raise ValueError(f"{what}: labels must have a sequence dimension, got a scalar")
    return labels


def causal_shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits[..., :-1, :], labels[..., 1:])``: each logit row with the token it predicts.

    Both are views. ``logits`` is ``[..., S, V]`` and ``labels`` ``[..., S]``.
    """
    labels = _check_labels(labels, "causal_shift")
    if logits.dim() < 2 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"causal_shift: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not "
            "match (expected logits [..., S, V] and labels [..., S])"
        )
    return logits[..., :-1, :], labels[..., 1:]


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels[..., 1:]`` followed by ``ignore_index``: the label of each logit row, full length.

    Masks exactly the rows :func:`causal_shift` keeps, without slicing the logits.
    """
    labels = _check_labels(labels, "shift_labels")
    shifted = torch.full_like(labels, ignore_index)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


def count_tokens(
    labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, *, shift: bool = False
) -> int:
    """The number of labels that are not ``ignore_index`` (after the causal shift if ``shift``)."""
    labels = _check_labels(labels, "count_tokens")
    if shift:
        labels = labels[..., 1:]
    return int((labels != ignore_index).sum())


def data_parallel_world_size(group: object = None) -> int:
    """The number of ranks gradients are averaged over: 1 without ``torch.distributed``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size(group))  # type: ignore[arg-type]
    return 1


def num_items_in_batch(
    micro_batch_labels: torch.Tensor | Iterable[torch.Tensor],
    ignore_index: int = IGNORE_INDEX,
    *,
    shift: bool = False,
    all_reduce: bool | None = None,
    group: object = None,
) -> int:
    """The tokens that count in one optimiser step: over every micro-batch and every rank.

    ``micro_batch_labels`` is this rank's labels, one tensor per gradient-accumulation
    micro-batch (or one tensor). ``shift=True`` counts them after the causal shift (for
    Hugging Face-style labels). The count is summed over the ranks of ``group`` with
    ``torch.distributed.all_reduce`` when ``torch.distributed`` is initialised (or
    ``all_reduce=True``); every rank must then call this at the same point.
    """
    import torch.distributed as dist

    if isinstance(micro_batch_labels, torch.Tensor):
        micro_batch_labels = [micro_batch_labels]
    labels_list = list(micro_batch_labels)
    if not labels_list:
        raise ValueError("num_items_in_batch: no micro-batch labels given")
    local = sum(count_tokens(labels, ignore_index, shift=shift) for labels in labels_list)
    if all_reduce is None:
        all_reduce = dist.is_available() and dist.is_initialized()
    if not all_reduce:
        return local
    total = torch.tensor(local, dtype=torch.int64, device=labels_list[0].device)
    dist.all_reduce(total, group=group)  # type: ignore[arg-type]
    return int(total)


def token_normalized(
    loss_sum: torch.Tensor, num_items_in_batch: int | float | torch.Tensor, *, world_size: int = 1
) -> torch.Tensor:
    """``loss_sum * world_size / num_items_in_batch``: what one micro-batch on one rank backwards.

    ``loss_sum`` is the micro-batch's loss summed over its non-ignored tokens, and
    ``num_items_in_batch`` the step's global token count (:func:`num_items_in_batch`).
    ``world_size`` undoes DDP's averaging of gradients over ranks
    (:func:`data_parallel_world_size`). With 0 tokens in the step the loss is 0.
    """
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.item()
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(f"num_items_in_batch must be a number, got {num_items_in_batch!r}")
    if num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    return loss_sum * (world_size / max(num_items_in_batch, 1))
