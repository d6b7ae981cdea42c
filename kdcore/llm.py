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

On-policy batches. :func:`generate_completions` samples completions from a model (the student,
for on-policy distillation, also when given the model ``kd.convert`` made) and returns a batch
whose ``labels`` cover the generated tokens only, ready for the same loss as a fixed-text batch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kdcore._errors import ConfigError
from kdcore._model import is_distillation_model
from kdcore.validation import (
    IGNORE_INDEX,
    check_labels,
    check_positive_int,
    check_temperature,
    check_unit_interval,
)

__all__ = [
    "IGNORE_INDEX",
    "causal_shift",
    "count_tokens",
    "data_parallel_world_size",
    "generate_completions",
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


def generate_completions(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    sync_ranks: bool = False,
) -> dict[str, torch.Tensor]:
    """Sample a completion of each prompt from ``model``: a batch to train on.

    ``prompt_ids`` is ``[B, P]`` with ``attention_mask`` 0 on padding (on either side; ``None``:
    no padding). ``model`` is a causal LM (a Hugging Face ``*ForCausalLM``) taking
    ``input_ids``, ``attention_mask``, ``position_ids``, ``use_cache`` and ``cache`` (or
    ``past_key_values``), and returning ``logits`` and the cache under the same name; or a
    model ``kd.convert`` made, whose student then samples alone (its teacher does not run),
    unless inside ``model.only_teacher_forward()``, where the teacher samples. It
    samples in eval mode without gradients, with its KV cache, and is put back in the mode it
    was in. Each new token is drawn from ``softmax(logits / temperature)`` restricted to its
    top-``top_p`` nucleus, with ``generator`` (seed it for reproducible batches); a row stops at
    ``eos_token_id`` (or any of several), which is kept and labelled, so the model learns to stop.
    Sampling stops once every row has stopped. With ``sync_ranks=True`` (every rank of the
    ``torch.distributed`` default group calling at once) it stops once every row of every rank
    has: a rank whose rows are done steps on with them masked, so all ranks run the model the
    same number of times, as a forward holding collectives (FSDP2's parameter gathering) needs.
    The tokens are the same either way.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each ``[B, L]`` and right-padded:
    every row is its prompt followed by its completion from position 0, so the model's default
    positions are right. ``labels`` are the input ids on the completion and ``-100`` on the
    prompt, the padding and after EOS (Hugging Face's unshifted convention: pass them through
    :func:`shift_labels` for kdcore's divergences). Padding holds the (first) ``eos_token_id``
    (or 0).

    ::

        model = kd.convert(student, [("kd_loss", kd_config)])
        batch = llm.generate_completions(model, prompts, mask, max_new_tokens=64,
                                         eos_token_id=tokenizer.eos_token_id,
                                         generator=torch.Generator().manual_seed(step))
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = model.compute_kd_loss(labels=llm.shift_labels(batch["labels"]))
    """
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
    temperature = check_temperature(temperature)
    top_p = check_unit_interval("top_p", top_p)
    if top_p == 0:
        raise ConfigError("top_p must be in (0, 1], got 0 (no token would be kept)")
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2:
        raise ConfigError(
            f"generate_completions: prompt_ids must be a [B, P] tensor of token ids, got "
            f"{tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else prompt_ids!r}"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(prompt_ids)
    if attention_mask.shape != prompt_ids.shape:
        raise ConfigError(
            f"generate_completions: attention_mask {tuple(attention_mask.shape)} does not match "
            f"prompt_ids {tuple(prompt_ids.shape)}"
        )
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ())
    pad = eos[0] if eos else 0
    mask = attention_mask.bool()
    # Sampling runs left-padded (the new tokens line up in the last column) with explicit
    # positions, so every row's prompt starts at position 0 whatever its padding.
    left = _packed(mask, to_the_right=True)
    ids, step_mask = prompt_ids.gather(1, left), mask.gather(1, left).long()
    positions = (step_mask.cumsum(-1) - 1).clamp(min=0)
    next_position = positions[:, -1:] + 1
    finished = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    eos_ids = torch.tensor(eos, dtype=ids.dtype, device=ids.device)
    tokens, kept = [], []
    sampler, side = _sampling_side(model)
    # transformers 5 renamed ``past_key_values`` to ``cache``
    parameters = inspect.signature(sampler.forward).parameters
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), side:
            inputs = {"input_ids": ids, "position_ids": positions}
            cache = None
            for _ in range(max_new_tokens):
                out = model(
                    **inputs, attention_mask=step_mask, use_cache=True, **{cache_name: cache}
                )
                cache = out.get(cache_name)
                logits = (out.logits if hasattr(out, "logits") else out[0])[:, -1, :]
                token = _sample(logits, temperature, top_p, generator).masked_fill(finished, pad)
                tokens.append(token)
                kept.append(~finished)
                finished = finished | torch.isin(token, eos_ids)
                if _all_done(finished, sync_ranks):
                    break
                inputs = {"input_ids": token[:, None], "position_ids": next_position}
                step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
                next_position = next_position + 1
    finally:
        model.train(was_training)
    completion, completion_kept = torch.stack(tokens, 1), torch.stack(kept, 1)
    all_ids = torch.cat([prompt_ids, completion], dim=1)
    keep = torch.cat([mask, completion_kept], dim=1)
    is_completion = torch.cat([torch.zeros_like(mask), completion_kept], dim=1)
    right = _packed(keep, to_the_right=False)
    length = int(keep.sum(-1).max())
    keep = keep.gather(1, right)[:, :length]
    input_ids = all_ids.gather(1, right)[:, :length].masked_fill(~keep, pad)
    labels = input_ids.masked_fill(~is_completion.gather(1, right)[:, :length], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": keep.long(), "labels": labels}


def _sampling_side(model: torch.nn.Module) -> tuple[Any, contextlib.AbstractContextManager[None]]:
    """The model that samples (its ``forward`` takes the cache) and the context to sample in.

    A distillation model's forward runs the teacher and the student: sampling runs the student
    alone (the teacher would cost a forward a token and be handed the student's cache), unless
    the caller chose the teacher with ``only_teacher_forward()``."""
    if not is_distillation_model(model):
        return model, contextlib.nullcontext()
    if model.kd_state.only_teacher:
        return model.teacher_model, contextlib.nullcontext()
    return model.kd_state.original_class, model.only_student_forward()


def _all_done(finished: torch.Tensor, sync_ranks: bool) -> bool:
    """Whether every row has stopped (on every rank, with ``sync_ranks``)."""
    import torch.distributed as dist

    running = (~finished).any().to(torch.int32)
    if sync_ranks and dist.is_available() and dist.is_initialized():
        dist.all_reduce(running, op=dist.ReduceOp.MAX)
    return not bool(running)


def _packed(keep: torch.Tensor, *, to_the_right: bool) -> torch.Tensor:
    """The gather indices that move each row's kept positions to its right (or left) end, in
    their order."""
    key = keep.int() if to_the_right else (~keep).int()
    return torch.sort(key, dim=-1, stable=True).indices


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token a row from ``softmax(logits / temperature)`` cut to its top-``top_p`` nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass before it is under top_p (the most likely always stays)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
