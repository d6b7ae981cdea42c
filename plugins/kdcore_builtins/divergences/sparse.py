"""The divergences that accept a cached (sparse) teacher: ``topk_kl`` and ``forward_kl``.

A teacher cache (:func:`kdcore.cache_teacher`) keeps, per position, the teacher's ``K`` largest
scaled logits ``t_j / T`` and the log-sum-exps of all of them and of the others: so the kept
log-probabilities ``log q_j`` under ``softmax(t / T)`` and the tail's ``log q_tail``. The
student's full distribution ``p = softmax(s / T)`` is at hand. The estimators, with ``I`` the
kept entries:

- ``topk_kl`` with ``tail_bucket``: ``sum_I q_j log(q_j / p_j) + q_tail log(q_tail / p_tail)``,
  over ``k + 1`` outcomes; exactly the online loss when the cache kept at least its ``k``.
- ``topk_kl`` without it: the KL of both distributions renormalised over ``I``; exactly the
  online loss too.
- ``forward_kl``: the full KL's terms on the kept support, ``sum_I q_j log(q_j / p_j)`` (the
  sparse KL of Megatron-LM and MaxText). Its bias is the omitted tail terms
  ``sum_{j not in I} q_j log(q_j / p_j)``, of either sign; its gradient
  ``(sum_I q_j) p - q_I`` ignores the tail's mass. Exact when ``K`` is the vocabulary.

Rows are processed in chunks as by :mod:`kdcore_builtins.divergences.chunked`: forward keeps
its inputs, backward recomputes each chunk and writes one ``[N, V]`` gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from kdcore.plugin import SparseTeacherOutput
from kdcore_builtins.divergences.chunked import CHUNK_ELEMENTS, Rows, compute_dtype, rows_per_chunk
from kdcore_builtins.divergences.kernels import _floor_, zero_where_nan_
from kdcore_builtins.divergences.masks import check_num_items, kept_rows, reduce_rows


def _kernel(
    mode: str,
    a: torch.Tensor,
    idx: torch.Tensor,
    b_top: torch.Tensor,
    B: torch.Tensor,
    b_rest: torch.Tensor,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss (and gradient with respect to the scaled student logits ``a``), from the
    teacher's kept scaled logits ``b_top``, their log-sum-exp ``B`` and the tail's ``b_rest``;
    the operations are those of the online ``topk_kl`` kernel."""
    A = torch.logsumexp(a, -1)
    kept = ~b_top.isneginf()
    if mode == "renormalised":
        a_top = a.gather(-1, idx).masked_fill_(~kept, -math.inf)
        lq_r = torch.log_softmax(b_top, dim=-1)
        lp_r = a_top.sub_(_floor_(torch.logsumexp(a_top, -1))[:, None])
        q_r = lq_r.exp()
        loss = zero_where_nan_(q_r * (lq_r - lp_r)).sum(-1)
        if not want_grad:
            return loss, None
        delta = lp_r.exp_().sub_(q_r).masked_fill_(~kept, 0.0)
        return loss, torch.zeros_like(a).scatter_add_(-1, idx, delta)
    lq = b_top.sub(B[:, None])
    q = lq.exp()
    lp_top = a.gather(-1, idx).sub_(A[:, None])
    loss = zero_where_nan_(q * (lq - lp_top)).sum(-1)
    if mode == "support":
        if not want_grad:
            return loss, None
        mass = q.sum(-1, keepdim=True)
        return loss, torch.sub(a, A[:, None]).exp_().mul_(mass).scatter_add_(-1, idx, -q)
    a_rest = torch.logsumexp(a.scatter(-1, idx, -math.inf), -1)
    lq_tail = b_rest - B
    q_tail = lq_tail.exp()
    loss.add_(torch.where(q_tail > 0, q_tail * (lq_tail - (a_rest - A)), 0.0))
    if not want_grad:
        return loss, None
    scale = torch.where(q_tail > 0, q_tail, 0.0)[:, None]
    grad = torch.sub(a, A[:, None]).exp_()
    grad.sub_(torch.sub(a, _floor_(a_rest)[:, None]).exp_().mul_(scale))
    delta = lp_top.exp_().sub_(q).masked_fill_(~kept, 0.0)
    return loss, grad.scatter_(-1, idx, 0.0).scatter_add_(-1, idx, delta)


class _Spec:
    def __init__(self, mode: str, temperature: float, chunk_rows: int, dtype: torch.dtype) -> None:
        self.mode, self.temperature = mode, temperature
        self.chunk_rows, self.dtype = chunk_rows, dtype

    def load(
        self, student: Rows, teacher: tuple[torch.Tensor, ...], rows: Any, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        a = student.take(rows, start, stop).to(self.dtype)
        a = a / self.temperature if self.temperature != 1.0 else a.clone()
        idx, b_top, B, b_rest = (
            (t[start:stop] if rows is None else t[rows[start:stop]]).to(a.device) for t in teacher
        )
        return a, idx, b_top.to(self.dtype), B.to(self.dtype), b_rest.to(self.dtype)


class _SparseDivergence(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: torch.Tensor,
        idx: torch.Tensor,
        b_top: torch.Tensor,
        B: torch.Tensor,
        b_rest: torch.Tensor,
        rows: torch.Tensor | None,
        spec: _Spec,
    ) -> torch.Tensor:
        count = int(rows.numel()) if rows is not None else idx.shape[0]
        losses = torch.empty(count, dtype=spec.dtype, device=student.device)
        student_rows = Rows(student)
        for start in range(0, count, spec.chunk_rows):
            stop = min(start + spec.chunk_rows, count)
            chunk = spec.load(student_rows, (idx, b_top, B, b_rest), rows, start, stop)
            losses[start:stop] = _kernel(spec.mode, *chunk, False)[0]
        ctx.spec = spec
        ctx.save_for_backward(student, idx, b_top, B, b_rest, rows)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: torch.Tensor) -> Any:
        spec: _Spec = ctx.spec
        student, *teacher, rows = ctx.saved_tensors
        weights = grad_losses / spec.temperature
        grad = torch.zeros(student.shape, dtype=student.dtype, device=student.device)
        flat = grad.view(-1, student.shape[-1])
        student_rows = Rows(student)
        count = weights.shape[0]
        for start in range(0, count, spec.chunk_rows):
            stop = min(start + spec.chunk_rows, count)
            chunk = spec.load(student_rows, tuple(teacher), rows, start, stop)
            _, g = _kernel(spec.mode, *chunk, True)
            assert g is not None
            g.mul_(weights[start:stop, None])
            if rows is None:
                flat[start:stop] = g
            else:
                flat[rows[start:stop]] = g.to(grad.dtype)
        return grad, None, None, None, None, None, None


def sparse_divergence(
    loss: Any,
    student: torch.Tensor,
    teacher: SparseTeacherOutput,
    labels: Any,
    num_items_in_batch: Any,
) -> torch.Tensor:
    """``loss`` (a :class:`~kdcore_builtins.divergences.LogitDivergenceLoss`) of ``student``
    logits from a cached teacher's sparse distribution."""
    what = type(loss).__name__
    if loss.divergence == "topk_kl":
        mode = "tail" if loss.tail_bucket else "renormalised"
    elif loss.divergence == "forward_kl":
        mode = "support"
    else:
        raise ValueError(
            f"{what} needs the teacher's full distribution; a cached teacher ({teacher.source}) "
            "keeps only its top entries: use 'topk_kl' or 'forward_kl'"
        )
    if tuple(student.shape[:-1]) != tuple(teacher.shape):
        raise ValueError(
            f"{what}: student output {tuple(student.shape)} and the cached teacher's positions "
            f"{tuple(teacher.shape)} differ in shape"
        )
    if student.shape[-1] != teacher.vocab_size:
        raise ValueError(
            f"{what}: the student's vocabulary ({student.shape[-1]}) is not the cached "
            f"teacher's ({teacher.vocab_size}, {teacher.source})"
        )
    if loss.temperature != teacher.temperature:
        raise ValueError(
            f"{what}: temperature={loss.temperature}, but the teacher cache {teacher.source} "
            f"holds log-probabilities at temperature {teacher.temperature}"
        )
    cached_k = teacher.indices.shape[-1]
    k = getattr(loss, "k", cached_k)
    if k > cached_k:
        raise ValueError(f"{what}: k={k}, but the teacher cache {teacher.source} kept {cached_k}")
    num_items = check_num_items(num_items_in_batch, loss.reduction, what)
    positions_shape = tuple(student.shape[:-1])
    rows = kept_rows(labels, positions_shape, loss.ignore_index, student.device, what)
    covered = teacher.covered.reshape(-1)
    missing = int((~(covered if rows is None else covered[rows.to(covered.device)])).sum())
    if missing:
        raise ValueError(
            f"{what}: {missing} of the positions to distil are not in the teacher cache "
            f"{teacher.source} (it skipped the padding and the positions whose shifted label "
            "was -100): pass labels=kdcore.llm.shift_labels(labels)"
        )
    vocab = student.shape[-1]
    idx = teacher.indices.reshape(-1, cached_k)[:, :k]
    b_top = teacher.logits.reshape(-1, cached_k)[:, :k]
    b_rest = teacher.tail_logsumexp.reshape(-1)
    if k < cached_k:  # the kept entries are sorted: the first k are the top k; the rest is tail
        others = teacher.logits.reshape(-1, cached_k)[:, k:]
        b_rest = torch.logaddexp(b_rest, torch.logsumexp(others, -1))
    dtype = compute_dtype(student)
    spec = _Spec(mode, loss.temperature, rows_per_chunk(vocab, CHUNK_ELEMENTS), dtype)
    B = teacher.logsumexp.reshape(-1)
    per_row = _SparseDivergence.apply(student, idx, b_top, B, b_rest, rows, spec)
    return reduce_rows(
        per_row,
        reduction=loss.reduction,
        rows=rows,
        labelled=labels is not None,
        positions_shape=positions_shape,
        first_dim=student.shape[0],
        classes=vocab,
        num_items=num_items,
        scale=loss.temperature**2,
    )
