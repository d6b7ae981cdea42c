"""The fused lm-head loss: a logit divergence computed from hidden states and the two lm heads,
a chunk of positions at a time, never holding either model's full logits."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from kdcore.validation import IGNORE_INDEX, check_int
from kdcore_builtins.divergences.chunked import (
    ChunkSpec,
    Rows,
    compute_dtype,
    rows_per_chunk,
    run_kernel,
)
from kdcore_builtins.divergences.kernels import (
    Kernel,
    check_alpha,
    check_beta,
    check_divergence,
    check_k,
    check_tail_bucket,
    checked_kernel,
    make_kernel,
)
from kdcore_builtins.divergences.masks import (
    DEFAULT_MAX_VOCAB_PADDING,
    align_vocabularies,
    check_num_items,
    check_shared_arguments,
    kept_count,
    kept_rows,
    reduce_rows,
    reduction_denominator,
)

#: Elements of logits per chunk (larger than the unfused losses', for efficient matrix products).
FUSED_CHUNK_ELEMENTS = 1 << 23


class _FusedLinearDivergence(torch.autograd.Function):
    """The divergence of ``hs @ ws.T + bs`` from ``ht @ wt.T + bt``, a chunk of rows at a time.

    With ``eager`` (a scalar reduction follows) the output is the sum of the row divergences and
    forward also computes the gradients for the student's hidden states, weight and bias (one
    ``[N, H]``, one ``[V, H]`` and one ``[V]`` tensor), which backward scales; otherwise (per-row
    output) backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hs: torch.Tensor,
        ht: torch.Tensor,
        ws: torch.Tensor,
        wt: torch.Tensor,
        bs: torch.Tensor | None,
        bt: torch.Tensor | None,
        rows: torch.Tensor | None,
        spec: ChunkSpec,
        eager: bool,
    ) -> torch.Tensor:
        ctx.spec, ctx.eager = spec, eager
        need = ctx.needs_input_grad
        want_grad = eager and (need[0] or need[2] or (bs is not None and need[4]))
        count = kept_count(rows, hs)
        losses = torch.empty(count, dtype=spec.dtype, device=hs.device)
        grads = _FusedGrads(hs, ws, bs, rows, need, count) if want_grad else None
        hs_rows, ht_rows = Rows(hs), Rows(ht)
        for start in range(0, count, spec.chunk_rows):
            stop = min(start + spec.chunk_rows, count)
            hs_chunk, a, b = _fused_chunk(spec, hs_rows, ht_rows, ws, wt, bs, bt, rows, start, stop)
            A, B = torch.logsumexp(a, -1), torch.logsumexp(b, -1)
            loss, g = run_kernel(spec, a, b, A, B, True, grads is not None)
            assert loss is not None
            losses[start:stop] = loss
            if grads is not None:
                assert g is not None
                grads.add(hs_chunk, g.div_(spec.temperature), start, stop)
        if eager:
            # Saved (not kept on ctx) so that autograd frees them after a backward without
            # retain_graph, keeps them for one with it, and reports a second backward as usual.
            ctx.has_grads = grads is not None
            ctx.save_for_backward(*(grads.finish() if grads is not None else ()))
            return losses.sum()
        ctx.save_for_backward(hs, ht, ws, wt, bs, bt, rows)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        spec: ChunkSpec = ctx.spec
        if ctx.eager:
            grads = ctx.saved_tensors if ctx.has_grads else (None, None, None)
            scaled = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
            return scaled[0], None, scaled[1], None, scaled[2], None, None, None, None
        hs, ht, ws, wt, bs, bt, rows = ctx.saved_tensors
        count = kept_count(rows, hs)
        accumulate = _FusedGrads(hs, ws, bs, rows, ctx.needs_input_grad, count)
        hs_rows, ht_rows = Rows(hs), Rows(ht)
        weights = grad_output / spec.temperature
        for start in range(0, count, spec.chunk_rows):
            stop = min(start + spec.chunk_rows, count)
            hs_chunk, a, b = _fused_chunk(spec, hs_rows, ht_rows, ws, wt, bs, bt, rows, start, stop)
            A, B = torch.logsumexp(a, -1), torch.logsumexp(b, -1)
            _, g = run_kernel(spec, a, b, A, B, False, True)
            assert g is not None
            accumulate.add(hs_chunk, g.mul_(weights[start:stop, None]), start, stop)
        grad_hs, grad_ws, grad_bs = accumulate.finish()
        return grad_hs, None, grad_ws, None, grad_bs, None, None, None, None


def _fused_chunk(
    spec: ChunkSpec,
    hs_rows: Rows,
    ht_rows: Rows,
    ws: torch.Tensor,
    wt: torch.Tensor,
    bs: torch.Tensor | None,
    bt: torch.Tensor | None,
    rows: torch.Tensor | None,
    start: int,
    stop: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student hidden rows, their scaled student logits, the scaled teacher logits)."""
    width, teacher_width = spec.width, spec.teacher_width
    hs_chunk = hs_rows.take(rows, start, stop)
    student = F.linear(hs_chunk, ws[:width], None if bs is None else bs[:width])
    teacher = F.linear(
        ht_rows.take(rows, start, stop),
        wt[:teacher_width],
        None if bt is None else bt[:teacher_width],
    )
    return hs_chunk, spec.scaled(student, width), spec.scaled(teacher, teacher_width)


class _FusedGrads:
    """Accumulates the student-side gradients of the fused loss, chunk by chunk."""

    def __init__(
        self,
        hs: torch.Tensor,
        ws: torch.Tensor,
        bs: torch.Tensor | None,
        rows: torch.Tensor | None,
        need: tuple[bool, ...],
        count: int,
    ) -> None:
        self.hs_dtype, self.ws, self.rows = hs.dtype, ws, rows
        self.grad_hs = None
        if need[0]:
            partial = count < math.prod(hs.shape[:-1])
            self.grad_hs = (torch.zeros if partial else torch.empty)(
                hs.shape, dtype=hs.dtype, device=hs.device
            )
        # Weight and bias gradients are sums over rows: accumulate them in float32 at least.
        acc_dtype = torch.promote_types(ws.dtype, torch.float32)
        self.grad_ws = torch.zeros(ws.shape, dtype=acc_dtype, device=ws.device) if need[2] else None
        self.grad_bs = None
        if bs is not None and need[4]:
            self.grad_bs = torch.zeros(bs.shape, dtype=acc_dtype, device=bs.device)
        self.bs_dtype = None if bs is None else bs.dtype

    def add(self, hs_chunk: torch.Tensor, g: torch.Tensor, start: int, stop: int) -> None:
        """Add the contribution of logits gradient ``g`` ([c, width], compute dtype)."""
        width = g.shape[1]
        g_low = g.to(self.hs_dtype)
        if self.grad_hs is not None:
            part = g_low @ self.ws[:width].to(self.hs_dtype)
            flat = self.grad_hs.view(-1, self.grad_hs.shape[-1])
            if self.rows is None:
                flat[start:stop] = part
            else:
                flat[self.rows[start:stop]] = part
        if self.grad_ws is not None:
            target = self.grad_ws[:width]
            if target.dtype == g_low.dtype:
                target.addmm_(g_low.t(), hs_chunk.to(g_low.dtype))
            else:
                target.add_(g_low.t() @ hs_chunk.to(g_low.dtype))
        if self.grad_bs is not None:
            self.grad_bs[:width].add_(g.sum(0))

    def finish(self) -> list[torch.Tensor | None]:
        grad_ws = None if self.grad_ws is None else self.grad_ws.to(self.ws.dtype)
        grad_bs = None
        if self.grad_bs is not None and self.bs_dtype is not None:
            grad_bs = self.grad_bs.to(self.bs_dtype)
        return [self.grad_hs, grad_ws, grad_bs]


def _check_head(
    hidden: torch.Tensor, weight: Any, bias: Any, side: str, what: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"{what}: the {side} lm-head weight must be a [vocab, hidden] tensor, got "
            f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{what}: {side} hidden states {tuple(hidden.shape)} do not fit the {side} lm-head "
            f"weight {tuple(weight.shape)} (hidden sizes {hidden.shape[-1]} and {weight.shape[1]})"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(
            f"{what}: the {side} lm-head bias "
            f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__} "
            f"does not match its weight {tuple(weight.shape)}"
        )
    return weight, bias


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``logit_divergence`` of ``student_hidden @ student_weight.T (+ bias)`` from the teacher's,
    without ever holding either model's full logits (see :class:`FusedLogitsLoss`).

    The gradient flows to ``student_hidden``, ``student_weight`` and ``student_bias``; the teacher
    side is treated as constant. ``chunk_size`` is the number of positions per chunk (default:
    about 8M logits per chunk).
    """
    kernel = checked_kernel(divergence, beta=beta, alpha=alpha, k=k, tail_bucket=tail_bucket)
    temperature, reduction, ignore_index, vocab_alignment, max_vocab_padding = (
        check_shared_arguments(
            temperature, reduction, ignore_index, vocab_alignment, max_vocab_padding
        )
    )
    return _fused(
        kernel,
        student_hidden,
        teacher_hidden,
        student_weight,
        teacher_weight,
        student_bias,
        teacher_bias,
        what=f"fused {divergence}",
        temperature=temperature,
        reduction=reduction,
        labels=labels,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        vocab_alignment=vocab_alignment,
        max_vocab_padding=max_vocab_padding,
        chunk_size=None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1),
    )


def _fused(
    kernel: Kernel,
    hs: torch.Tensor,
    ht: torch.Tensor,
    ws: Any,
    wt: Any,
    bs: Any,
    bt: Any,
    *,
    what: str,
    temperature: float,
    reduction: str,
    labels: Any,
    ignore_index: int,
    num_items_in_batch: Any,
    vocab_alignment: str,
    max_vocab_padding: int,
    chunk_size: int | None,
) -> torch.Tensor:
    for side, tensor in (("student", hs), ("teacher", ht)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            raise TypeError(
                f"{what}: expected the {side} hidden states as a [..., hidden] tensor, got "
                f"{type(tensor).__name__ if not isinstance(tensor, torch.Tensor) else 'a scalar'}"
            )
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"{what}: student hidden states {tuple(hs.shape)} and teacher hidden states "
            f"{tuple(ht.shape)} differ in their positions"
        )
    ws, bs = _check_head(hs, ws, bs, "student", what)
    wt, bt = _check_head(ht, wt, bt, "teacher", what)
    num_items = check_num_items(num_items_in_batch, reduction, what)
    width, teacher_width = align_vocabularies(
        ws.shape[0],
        wt.shape[0],
        vocab_alignment=vocab_alignment,
        max_vocab_padding=max_vocab_padding,
        what=what,
    )
    kernel.check_fits(width, teacher_width, what)
    positions_shape = tuple(hs.shape[:-1])
    rows = kept_rows(labels, positions_shape, ignore_index, hs.device, what)
    dtype = compute_dtype(hs, ht, ws, wt)
    chunk = chunk_size or rows_per_chunk(width, FUSED_CHUNK_ELEMENTS)
    spec = ChunkSpec(kernel, temperature, width, teacher_width, chunk, dtype)
    eager = reduction != "none"
    out = _FusedLinearDivergence.apply(
        hs,
        ht.detach(),
        ws,
        wt.detach(),
        bs,
        None if bt is None else bt.detach(),
        rows,
        spec,
        eager,
    )
    if eager:
        kept = kept_count(rows, hs)
        first_dim = hs.shape[0] if hs.dim() > 1 else 1
        denominator = reduction_denominator(
            reduction, labels is not None, kept, first_dim, width, num_items
        )
        return out * (temperature**2 / denominator)
    return reduce_rows(
        out,
        reduction=reduction,
        rows=rows,
        labelled=labels is not None,
        positions_shape=positions_shape,
        first_dim=hs.shape[0],
        classes=width,
        num_items=num_items,
        scale=temperature**2,
    )


def _check_heads(
    student_module: nn.Module, teacher_module: nn.Module
) -> tuple[nn.Module, nn.Module]:
    for side, module in (("student", student_module), ("teacher", teacher_module)):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(
                f"FusedLogitsLoss: the {side} layer must be the lm head (a linear layer with a "
                f"[vocab, hidden] weight; pair its input, e.g. 'lm_head:input'), got "
                f"{type(module).__name__}"
            )
    return student_module, teacher_module


class FusedLogitsLoss(nn.Module):
    """A logit divergence computed from hidden states and the two lm heads, never holding the
    full logits of either model (as Liger Kernel's fused linear JSD/KL, Hsu et al., 2024,
    arXiv 2410.10989).

    Positions are processed in chunks (``chunk_size`` positions; default about 8M logits per
    chunk): each chunk's student and teacher logits are computed, then the divergence and its
    gradients with respect to the student's hidden states, lm-head weight and bias, which are
    accumulated. ``divergence`` is one of ``forward_kl``, ``reverse_kl``, ``jsd`` (``beta``),
    ``skew_kl``, ``skew_reverse_kl`` (``alpha``), ``tvd``, ``topk_kl`` (``k``, ``tail_bucket``),
    with the values, reductions, ``labels``/``ignore_index`` masks, ``num_items_in_batch`` and
    ``vocab_alignment`` of the unfused losses (see :mod:`kdcore_builtins.divergences`).

    In kdcore, pair the lm heads' *inputs*: ``"layer:input"`` captures the first positional
    input of a layer (a forward pre-hook), where ``"layer"`` or ``"layer:output"`` would capture
    its output::

        kd.convert(student, [("kd_loss", {
            "teacher_model": teacher,
            "criterion": {("lm_head:input", "lm_head:input"): {"name": "fused_logits",
                                                               "divergence": "jsd"}}})])

    At convert time kdcore calls ``bind_layers(student_lm_head, teacher_lm_head)`` with the two
    paired modules; the loss keeps plain references to them (not as submodules, so their weights
    are not registered a second time) and reads ``.weight``/``.bias`` at every call, so the
    gradient reaches the student's lm-head weight (and tied embeddings) and its hidden states.
    ``forward(student_hidden, teacher_hidden, labels=None, num_items_in_batch=None,
    lm_heads=None)``; ``lm_heads=(student_head, teacher_head)`` overrides the bound heads.

    The loss never materialises logits, but the models' own forwards still run their lm heads
    (kdcore captures the heads' inputs, it does not skip them): the memory saved is the loss's
    own ``[N, V]`` temporaries and gradient. Under FSDP/ZeRO-3 the heads' weights must be
    gathered when the loss runs.
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        reduction: str = "batchmean",
        beta: float = 0.5,
        alpha: float = 0.1,
        k: int | None = None,
        tail_bucket: bool = False,
        ignore_index: int = IGNORE_INDEX,
        vocab_alignment: str = "error",
        max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.divergence = check_divergence(divergence)
        (
            self.temperature,
            self.reduction,
            self.ignore_index,
            self.vocab_alignment,
            self.max_vocab_padding,
        ) = check_shared_arguments(
            temperature, reduction, ignore_index, vocab_alignment, max_vocab_padding
        )
        self.beta = check_beta(beta)
        self.alpha = check_alpha(alpha)
        if (k is None) != (divergence != "topk_kl"):
            raise ValueError(
                "k is required with divergence='topk_kl'"
                if k is None
                else f"k={k!r} is only used by divergence='topk_kl' (got {divergence!r})"
            )
        self.k = None if k is None else check_k(k)
        self.tail_bucket = check_tail_bucket(tail_bucket)
        self.chunk_size = (
            None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1)
        )
        # Plain references (a tuple is not registered as a submodule).
        self._lm_heads: tuple[nn.Module, nn.Module] | None = None

    def bind_layers(self, student_module: nn.Module, teacher_module: nn.Module) -> None:
        """Keep the paired lm heads; called by kdcore at convert time."""
        self._lm_heads = _check_heads(student_module, teacher_module)

    def kernel(self) -> Kernel:
        return make_kernel(
            self.divergence,
            beta=self.beta,
            alpha=self.alpha,
            k=self.k,
            tail_bucket=self.tail_bucket,
        )

    def forward(
        self,
        student_hidden: Any,
        teacher_hidden: Any,
        labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        lm_heads: tuple[nn.Module, nn.Module] | None = None,
    ) -> torch.Tensor:
        if lm_heads is not None:
            heads = _check_heads(*lm_heads)
        elif self._lm_heads is None:
            raise RuntimeError(
                "FusedLogitsLoss has no lm heads: pair ('lm_head:input', 'lm_head:input') in "
                "kd.convert, call bind_layers(student_head, teacher_head), or pass lm_heads="
            )
        else:
            heads = self._lm_heads
        student_head, teacher_head = heads
        return _fused(
            self.kernel(),
            student_hidden,
            teacher_hidden,
            student_head.weight,
            teacher_head.weight,
            getattr(student_head, "bias", None),
            getattr(teacher_head, "bias", None),
            what=type(self).__name__,
            temperature=self.temperature,
            reduction=self.reduction,
            labels=labels,
            ignore_index=self.ignore_index,
            num_items_in_batch=num_items_in_batch,
            vocab_alignment=self.vocab_alignment,
            max_vocab_padding=self.max_vocab_padding,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}"
        )
