"""The chunked divergence: a custom autograd function over chunks of rows, and its front end.

The plain PyTorch formula (``F.kl_div(F.log_softmax(s / T), F.softmax(t / T))``) keeps several
``[N, V]`` float32 temporaries alive for backward, and backward makes several more. Here a
custom autograd function walks the rows in chunks of about two million logits (8 MiB in float32;
``CHUNK_ELEMENTS``): its forward keeps only its inputs (references, not copies) and two floats per
row (the log-sum-exp of each side); its backward recomputes each chunk and writes its gradient
into one preallocated ``[N, V]`` tensor (in the student's dtype), which is the only ``[N, V]``
allocation. Half-precision logits are upcast to float32 one chunk at a time (float64 logits are
computed in float64). The loss comes back in that compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kdcore.validation import IGNORE_INDEX
from kdcore_builtins.divergences.kernels import Kernel, _ForwardKL, checked_kernel
from kdcore_builtins.divergences.masks import (
    DEFAULT_MAX_VOCAB_PADDING,
    VOCAB_HINT,
    SharedArguments,
    align_vocabularies,
    check_num_items,
    check_shared_arguments,
    kept_count,
    kept_rows,
    reduce_rows,
    reduction_denominator,
)

#: Elements per chunk and temporary (8 MiB in float32). Each chunk runs a dozen parallel regions,
#: each a thread barrier that stalls when the machine is oversubscribed: on a loaded 2-core
#: machine 1M-element chunks took twice as long as 4M ones. Larger chunks cost memory (peak above
#: the inputs at 2048 x 32000, forward KL: 1M 0.25x the plain formula's, 2M 0.27x, 4M 0.30x with
#: swings to 0.35x); 2M is the compromise.
CHUNK_ELEMENTS = 1 << 21
#: Padded teacher columns sit this far below the row's maximum: exp() underflows to exactly 0
#: in float32 and float64, while every difference stays finite (no inf - inf, no 0 * inf).
_PAD_BELOW_MAX = 1.0e4


class Rows:
    """Row access to logits of any leading shape and strides, without copying the whole tensor.

    A tensor that views as ``[P, V]`` is sliced; one that does not (``logits[..., :-1, :]``, say)
    is gathered one chunk of rows at a time.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.lead_shape = tuple(x.shape[:-1])
        self.flat: torch.Tensor | None
        try:
            self.flat = x.view(-1, x.shape[-1])
        except RuntimeError:
            self.flat = None
        self.x = x

    def take(self, rows: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        if self.flat is not None:
            if rows is None:
                return self.flat[start:stop]
            return self.flat.index_select(0, rows[start:stop])
        index = (
            torch.arange(start, stop, device=self.x.device) if rows is None else rows[start:stop]
        )
        return self.x[torch.unravel_index(index, self.lead_shape)]


class ChunkSpec:
    """What the autograd functions need beyond tensors (plain Python, not saved for backward)."""

    def __init__(
        self,
        kernel: Kernel | None,
        temperature: float,
        width: int,
        teacher_width: int,
        chunk_rows: int,
        dtype: torch.dtype,
    ) -> None:
        self.kernel = kernel  # None: no divergence (the fused cross-entropy alone)
        self.temperature = temperature
        self.width = width  # student columns compared
        self.teacher_width = teacher_width  # real teacher columns (<= width; the rest padded)
        self.chunk_rows = chunk_rows
        self.dtype = dtype

    def scaled(self, chunk: torch.Tensor, columns: int) -> torch.Tensor:
        """``chunk[:, :columns] / T`` in the compute dtype, padded to ``width`` columns."""
        if chunk.dtype == self.dtype and columns == self.width == chunk.shape[1]:
            return torch.div(chunk, self.temperature) if self.temperature != 1.0 else chunk.clone()
        out = torch.empty((chunk.shape[0], self.width), dtype=self.dtype, device=chunk.device)
        real = out[:, :columns] if columns < self.width else out
        real.copy_(chunk[:, :columns])
        if self.temperature != 1.0:
            real.div_(self.temperature)
        if columns < self.width and out.shape[0]:
            out[:, columns:] = real.amax(-1, keepdim=True) - _PAD_BELOW_MAX
        return out

    def load(
        self, student: Rows, teacher: Rows, rows: torch.Tensor | None, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.scaled(student.take(rows, start, stop), self.width)
        b = self.scaled(teacher.take(rows, start, stop), self.teacher_width)
        return a, b


def run_kernel(
    spec: ChunkSpec,
    a: torch.Tensor,
    b: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    want_loss: bool,
    want_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``spec.kernel`` on one chunk; rows without a finite log-sum-exp on either side come out
    NaN, loss and gradient, whatever the kernel's handling of masked classes made of them."""
    assert spec.kernel is not None
    loss, grad = spec.kernel(a, b, A, B, spec.teacher_width, want_loss, want_grad)
    undefined = torch.mul(A, 0.0).add_(torch.mul(B, 0.0))  # 0, or NaN where A or B is not finite
    if loss is not None:
        loss.add_(undefined)
    if grad is not None:
        grad.add_(undefined[:, None])
    return loss, grad


class _ChunkedDivergence(torch.autograd.Function):
    """Per-row divergences of ``student`` from ``teacher`` (rows ``rows``, or all), chunk by chunk.

    Forward keeps the inputs and the two row log-sum-exps; backward recomputes each chunk and
    writes the student's gradient into one preallocated tensor. When all rows fit in one chunk
    (small inputs: at most ``CHUNK_ELEMENTS`` logits), forward computes that chunk's gradient
    at once and keeps it instead, which saves the recomputation's per-call overhead.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor,
        rows: torch.Tensor | None,
        spec: ChunkSpec,
    ) -> torch.Tensor:
        count = kept_count(rows, student)
        student_rows, teacher_rows = Rows(student), Rows(teacher)
        ctx.spec, ctx.eager = spec, count <= spec.chunk_rows and ctx.needs_input_grad[0]
        if ctx.eager:  # one chunk: its gradient (at most CHUNK_ELEMENTS) now, not recomputed
            a, b = spec.load(student_rows, teacher_rows, rows, 0, count)
            A, B = torch.logsumexp(a, -1), torch.logsumexp(b, -1)
            losses, g = run_kernel(spec, a, b, A, B, True, True)
            assert losses is not None
            ctx.save_for_backward(student, rows, g)
            return losses
        losses = torch.empty(count, dtype=spec.dtype, device=student.device)
        stats = torch.empty(2, count, dtype=spec.dtype, device=student.device)
        for start in range(0, count, spec.chunk_rows):
            stop = min(start + spec.chunk_rows, count)
            a, b = spec.load(student_rows, teacher_rows, rows, start, stop)
            A, B = torch.logsumexp(a, -1), torch.logsumexp(b, -1)
            stats[0, start:stop], stats[1, start:stop] = A, B
            loss, _ = run_kernel(spec, a, b, A, B, True, False)
            assert loss is not None
            losses[start:stop] = loss
        ctx.save_for_backward(student, teacher, rows, stats)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: torch.Tensor) -> Any:
        spec: ChunkSpec = ctx.spec
        weights = grad_losses / spec.temperature  # d loss / d a times d a / d s
        if ctx.eager:
            student, rows, g = ctx.saved_tensors
            g = g * weights[:, None]
            if rows is None and spec.width == student.shape[-1]:
                return g.to(student.dtype).view(student.shape), None, None, None
        else:
            student, teacher, rows, stats = ctx.saved_tensors
        count = kept_count(rows, student)
        vocab = student.shape[-1]
        partial = count < math.prod(student.shape[:-1]) or spec.width < vocab
        grad = (torch.zeros if partial else torch.empty)(
            student.shape, dtype=student.dtype, device=student.device
        )
        flat = grad.view(-1, vocab)
        if ctx.eager:
            if rows is None:
                flat[:, : spec.width] = g
            else:
                flat[rows, : spec.width] = g.to(grad.dtype)
            return grad, None, None, None
        student_rows, teacher_rows = Rows(student), Rows(teacher)
        for start in range(0, count, spec.chunk_rows):
            stop = min(start + spec.chunk_rows, count)
            a, b = spec.load(student_rows, teacher_rows, rows, start, stop)
            A, B = stats[0, start:stop], stats[1, start:stop]
            _, g = run_kernel(spec, a, b, A, B, False, True)
            assert g is not None
            g.mul_(weights[start:stop, None])
            if rows is None:
                flat[start:stop, : spec.width] = g
            else:
                flat[rows[start:stop], : spec.width] = g.to(grad.dtype)
        return grad, None, None, None


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    for tensor in tensors:
        if tensor.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _check_logits(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if (
        student.dim()
        and teacher.dim()
        and student.is_floating_point()
        and teacher.is_floating_point()
        and student.shape[:-1] == teacher.shape[:-1]
    ):
        return
    for side, tensor in (("student", student), ("teacher", teacher)):
        if tensor.dim() == 0:
            raise ValueError(f"{what}: the {side} output is a scalar; expected logits [..., V]")
        if not tensor.is_floating_point():
            raise TypeError(f"{what}: the {side} logits must be floating point, got {tensor.dtype}")
    raise ValueError(
        f"{what}: student output {tuple(student.shape)} and teacher output "
        f"{tuple(teacher.shape)} differ in shape (positions differ, not only vocabularies)"
    )


def rows_per_chunk(width: int, elements: int) -> int:
    return max(1, elements // max(width, 1))


def logit_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    beta: float = 0.5,
    alpha: float = 0.1,
    k: int | None = None,
    tail_bucket: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Any = None,
    vocab_alignment: str = "error",
    max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
) -> torch.Tensor:
    """Functional form of the divergence losses: ``divergence`` of the student from the teacher.

    ``divergence`` is one of ``forward_kl`` (KL(q || p), Hinton's KD), ``reverse_kl``, ``jsd``
    (``beta``), ``skew_kl``/``skew_reverse_kl`` (``alpha``), ``tvd`` and ``topk_kl`` (``k``,
    ``tail_bucket``); their loss classes (:mod:`kdcore_builtins.divergences.losses`) document
    each. Arguments are checked as the classes
    check them.
    """
    kernel = checked_kernel(divergence, beta=beta, alpha=alpha, k=k, tail_bucket=tail_bucket)
    shared = check_shared_arguments(
        temperature, reduction, ignore_index, vocab_alignment, max_vocab_padding
    )
    return chunked_divergence(
        kernel,
        student_logits,
        teacher_logits,
        shared,
        what=divergence,
        labels=labels,
        num_items_in_batch=num_items_in_batch,
    )


def _small_forward_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    reduction: str,
    labelled: bool,
    num_items: float | None,
) -> torch.Tensor:
    """Forward KL of inputs that fit in one chunk (no position ignored, same vocabularies) by
    the plain formula, reduced directly: the fewest operations per call."""
    log_p = F.log_softmax(student / temperature, dim=-1)
    q = F.softmax(teacher.detach() / temperature, dim=-1)
    pointwise = F.kl_div(log_p, q, reduction="none")
    with torch.no_grad():
        # A class the teacher gives no mass adds 0 (0 log 0 = 0), where F.kl_div makes
        # 0 * -inf = NaN for a class masked on both sides; its gradient (-q) is 0 already and
        # nothing saved ``pointwise``, so the fill needs no autograd record. A row without a
        # distribution (a NaN logit, or every logit of one side -inf) keeps a NaN where q > 0 or
        # q is NaN, so it stays NaN. Two operations: this path is for small, frequent calls.
        pointwise.masked_fill_(q == 0, 0.0)
    scale = temperature**2
    if reduction == "none":
        return pointwise.sum(-1) * scale
    if reduction == "mean":
        return pointwise.mean() * scale
    positions = math.prod(student.shape[:-1])
    denominator = reduction_denominator(
        reduction, labelled, positions, student.shape[0], 0, num_items
    )
    return pointwise.sum() * (scale / denominator)


def chunked_divergence(
    kernel: Kernel,
    student: torch.Tensor,
    teacher: torch.Tensor,
    shared: SharedArguments,
    *,
    what: str,
    labels: Any,
    num_items_in_batch: Any,
    vocab_hint: str = VOCAB_HINT,
) -> torch.Tensor:
    temperature, reduction = shared.temperature, shared.reduction
    _check_logits(student, teacher, what)
    num_items = check_num_items(num_items_in_batch, reduction, what)
    student_vocab, teacher_vocab = student.shape[-1], teacher.shape[-1]
    width, teacher_width = student_vocab, teacher_vocab
    if student_vocab != teacher_vocab:
        width, teacher_width = align_vocabularies(
            student_vocab,
            teacher_vocab,
            vocab_alignment=shared.vocab_alignment,
            max_vocab_padding=shared.max_vocab_padding,
            what=what,
            shapes=(tuple(student.shape), tuple(teacher.shape)),
            hint=vocab_hint,
        )
    if (
        labels is None
        and type(kernel) is _ForwardKL
        and student_vocab == teacher_vocab
        and student.dtype == teacher.dtype
        and student.dtype in (torch.float32, torch.float64)
        and student.numel() <= CHUNK_ELEMENTS
    ):  # small enough for memory not to matter: the plain formula has less per-call overhead
        return _small_forward_kl(student, teacher, temperature, reduction, False, num_items)
    kernel.check_fits(width, teacher_width, what)
    positions_shape = tuple(student.shape[:-1])
    chunk_rows = rows_per_chunk(width, CHUNK_ELEMENTS)
    rows = kept_rows(labels, positions_shape, shared.ignore_index, student.device, what)
    dtype = compute_dtype(student, teacher)
    spec = ChunkSpec(kernel, temperature, width, teacher_width, chunk_rows, dtype)
    per_row = _ChunkedDivergence.apply(student, teacher.detach(), rows, spec)
    return reduce_rows(
        per_row,
        reduction=reduction,
        rows=rows,
        labelled=labels is not None,
        positions_shape=positions_shape,
        first_dim=student.shape[0],
        classes=width,
        num_items=num_items,
        scale=temperature**2,
    )
