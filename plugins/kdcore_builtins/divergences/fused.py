"""The fused lm-head loss: a logit divergence computed from hidden states and the two lm heads,
a chunk of positions at a time, never holding either model's full logits."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from kdcore import UnknownLayerError
from kdcore.plugin import did_you_mean
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
    SharedArguments,
    align_vocabularies,
    check_num_items,
    check_shared_arguments,
    kept_count,
    kept_rows,
    reduce_rows,
)

#: Elements of logits per chunk (larger than the unfused losses', for efficient matrix products).
FUSED_CHUNK_ELEMENTS = 1 << 23


#: No gradient for the inputs of :class:`_FusedLinearLosses` after the student's bias (the
#: teacher's bias, rows, targets, spec, teacher_gathered).
_CONSTANT_INPUTS = (None,) * 5


class _FusedLinearLosses(torch.autograd.Function):
    """Per kept row: the divergence of ``hs @ ws.T + bs`` from ``ht @ wt.T + bt`` (when
    ``spec.kernel`` is set) and the cross-entropy with ``targets`` (when given), from one pass
    over chunks of rows; the two share each chunk's student logits. An unused loss comes back
    empty.

    Forward keeps its inputs (references) and up to three floats a row (log-sum-exps); backward
    recomputes each chunk's logits, combines the two losses' logit gradients with their incoming
    weights, and makes one product with the head for the hidden states and one for the weight
    (and bias). Nothing the size of the vocabulary outlives a chunk, so the activation memory is
    flat in the vocabulary. (Computing each loss's weight gradient in forward saves the two
    recomputed logit products but keeps a float32 ``[V, H]`` buffer a loss from forward to
    backward, until the losses' weights are known: 1.6x this path's activations in
    ``benchmarks/llm_end_to_end.py`` at a 128k vocabulary, growing with it.)
    ``teacher_gathered`` is a context in which ``wt`` is whole again in backward (FSDP2).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hs: torch.Tensor,
        ht: torch.Tensor | None,
        ws: torch.Tensor,
        wt: torch.Tensor | None,
        bs: torch.Tensor | None,
        bt: torch.Tensor | None,
        rows: torch.Tensor | None,
        targets: torch.Tensor | None,
        spec: ChunkSpec,
        teacher_gathered: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # an unused loss gets None: no gradient to compute
        ctx.spec, ctx.teacher_gathered = spec, teacher_gathered
        count = kept_count(rows, hs)
        divergences = hs.new_empty(count if spec.kernel is not None else 0, dtype=spec.dtype)
        entropies = hs.new_empty(count if targets is not None else 0, dtype=spec.dtype)
        stats = hs.new_empty((3, count), dtype=spec.dtype)  # log-sum-exps: a, b, cross-entropy
        chunks = _Chunks(spec, hs, ht, ws, wt, bs, bt, rows, cross_entropy=targets is not None)
        for start, stop, _, student in chunks:
            if spec.kernel is not None:
                a, b = chunks.scaled_pair(student, start, stop)
                A, B = torch.logsumexp(a, -1), torch.logsumexp(b, -1)
                stats[0, start:stop], stats[1, start:stop] = A, B
                loss, _ = run_kernel(spec, a, b, A, B, True, False)
                assert loss is not None
                divergences[start:stop] = loss
            if targets is not None:
                logits = student.to(spec.dtype)
                lse = torch.logsumexp(logits, -1)
                stats[2, start:stop] = lse
                chosen = logits.gather(1, targets[start:stop, None]).squeeze(1)
                entropies[start:stop] = lse - chosen
        ctx.save_for_backward(hs, ht, ws, wt, bs, bt, rows, targets, stats)
        return divergences, entropies

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_kd: torch.Tensor | None, grad_ce: torch.Tensor | None) -> Any:
        spec: ChunkSpec = ctx.spec
        hs, ht, ws, wt, bs, bt, rows, targets, stats = ctx.saved_tensors
        divergence = spec.kernel is not None and grad_kd is not None
        cross_entropy = targets is not None and grad_ce is not None
        grads = _FusedGrads(hs, ws, bs, rows, ctx.needs_input_grad, kept_count(rows, hs))
        with ctx.teacher_gathered() if divergence else contextlib.nullcontext():
            chunks = _Chunks(spec, hs, ht, ws, wt, bs, bt, rows, cross_entropy=cross_entropy)
            for start, stop, hs_chunk, student in chunks:
                g = None
                if divergence:
                    assert grad_kd is not None
                    a, b = chunks.scaled_pair(student, start, stop)
                    A, B = stats[0, start:stop], stats[1, start:stop]
                    _, g = run_kernel(spec, a, b, A, B, False, True)
                    assert g is not None
                    g.mul_((grad_kd[start:stop] / spec.temperature)[:, None])
                if cross_entropy:
                    assert grad_ce is not None and targets is not None
                    # softmax(z) - onehot(target), in the chunk's logits (read for the last time)
                    logits = student.to(spec.dtype)
                    g_ce = logits.sub_(stats[2, start:stop, None]).exp_()
                    g_ce.scatter_add_(
                        1, targets[start:stop, None], g_ce.new_full((stop - start, 1), -1.0)
                    )
                    g_ce.mul_(grad_ce[start:stop, None])
                    if g is not None:
                        g_ce[:, : g.shape[1]].add_(g)
                    g = g_ce
                if g is not None:
                    grads.add(hs_chunk, g, start, stop)
        grad_hs, grad_ws, grad_bs = grads.finish()
        return grad_hs, None, grad_ws, None, grad_bs, *_CONSTANT_INPUTS


class _Chunks:
    """The chunks of rows of the fused losses: ``(start, stop, hidden states, student logits)``
    for each; the student's logits cover all its columns when the cross-entropy reads them, else
    the ``spec.width`` the divergence compares."""

    def __init__(
        self,
        spec: ChunkSpec,
        hs: torch.Tensor,
        ht: torch.Tensor | None,
        ws: torch.Tensor,
        wt: torch.Tensor | None,
        bs: torch.Tensor | None,
        bt: torch.Tensor | None,
        rows: torch.Tensor | None,
        cross_entropy: bool,
    ) -> None:
        self.spec, self.rows, self.count = spec, rows, kept_count(rows, hs)
        self.cross_entropy = cross_entropy
        columns = ws.shape[0] if cross_entropy else spec.width
        self.ws, self.bs = ws[:columns], None if bs is None else bs[:columns]
        tw = spec.teacher_width
        self.wt = None if wt is None else wt[:tw]
        self.bt = None if bt is None else bt[:tw]
        self.hs_rows, self.ht_rows = Rows(hs), None if ht is None else Rows(ht)

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        for start in range(0, self.count, self.spec.chunk_rows):
            stop = min(start + self.spec.chunk_rows, self.count)
            hs_chunk = self.hs_rows.take(self.rows, start, stop)
            yield start, stop, hs_chunk, F.linear(hs_chunk, self.ws, self.bs)

    def scaled_pair(
        self, student: torch.Tensor, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's scaled student logits and the teacher's, aligned (``spec.width``
        columns); ``student`` is scaled in place unless the cross-entropy reads it after."""
        assert self.ht_rows is not None and self.wt is not None
        spec = self.spec
        teacher = F.linear(self.ht_rows.take(self.rows, start, stop), self.wt, self.bt)
        a = (
            spec.scaled(student, spec.width)
            if self.cross_entropy
            else _scaled_in_place(spec, student)
        )
        return a, _scaled_in_place(spec, teacher)


def _scaled_in_place(spec: ChunkSpec, logits: torch.Tensor) -> torch.Tensor:
    """``spec.scaled(logits)``, in ``logits``' own storage when it already has the compute dtype
    and all the columns (a chunk's fresh logits: one ``[c, V]`` temporary less)."""
    if logits.dtype != spec.dtype or logits.shape[1] != spec.width:
        return spec.scaled(logits, min(logits.shape[1], spec.width))
    return logits.div_(spec.temperature) if spec.temperature != 1.0 else logits


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
        looks_like_logits = hidden.shape[-1] == weight.shape[0]
        raise ValueError(
            f"{what}: {side} hidden states {tuple(hidden.shape)} do not fit the {side} lm-head "
            f"weight {tuple(weight.shape)} (hidden sizes {hidden.shape[-1]} and {weight.shape[1]})"
            + (
                "; they are as wide as the vocabulary, so they look like the head's output: pair "
                "the final hidden states, the head's input (e.g. 'lm_head:input' or the final "
                "norm layer such as 'model.norm')"
                if looks_like_logits
                else ""
            )
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
    shared = check_shared_arguments(
        temperature, reduction, ignore_index, vocab_alignment, max_vocab_padding
    )
    divergence_value, _ = _fused(
        kernel,
        student_hidden,
        teacher_hidden,
        student_weight,
        teacher_weight,
        student_bias,
        teacher_bias,
        shared,
        what=f"fused {divergence}",
        labels=labels,
        num_items_in_batch=num_items_in_batch,
        chunk_size=None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1),
    )
    assert divergence_value is not None
    return divergence_value


def _check_hidden(tensor: Any, side: str, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        raise TypeError(
            f"{what}: expected the {side} hidden states as a [..., hidden] tensor, got "
            f"{type(tensor).__name__ if not isinstance(tensor, torch.Tensor) else 'a scalar'}"
        )
    return tensor


def _targets(
    labels: Any, rows: torch.Tensor | None, vocab: int, device: torch.device, what: str
) -> torch.Tensor:
    """The kept rows' labels, refused (naming the first bad one) outside ``[0, vocab)``."""
    if labels is None:
        raise ValueError(f"{what}: the student's cross-entropy needs labels= (its targets)")
    flat = labels.reshape(-1).to(device)
    targets = flat if rows is None else flat.index_select(0, rows)
    bad = (targets < 0) | (targets >= vocab)
    if targets.numel() and bool(bad.any()):
        value = int(targets[bad.nonzero()[0, 0]])
        raise ValueError(
            f"{what}: label {value} is not a token of the student's vocabulary of {vocab} "
            "(labels are token ids, or ignore_index where no loss counts)"
        )
    return targets.long()


def _fused(
    kernel: Kernel | None,
    hs: Any,
    ht: Any,
    ws: Any,
    wt: Any,
    bs: Any,
    bt: Any,
    shared: SharedArguments,
    *,
    what: str,
    labels: Any,
    num_items_in_batch: Any,
    chunk_size: int | None,
    cross_entropy: bool = False,
    teacher_gathered: Callable[
        [], contextlib.AbstractContextManager[None]
    ] = contextlib.nullcontext,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the divergence, when ``kernel`` is set; the student's cross-entropy with ``labels``,
    when ``cross_entropy``), from one pass over the chunks. The cross-entropy is the sum over
    the kept positions with ``reduction="sum"``, else that sum over ``num_items_in_batch`` (or
    over the kept positions): the mean per token of ``"batchmean"`` with labels."""
    temperature, reduction = shared.temperature, shared.reduction
    hs = _check_hidden(hs, "student", what)
    ws, bs = _check_head(hs, ws, bs, "student", what)
    width = teacher_width = ws.shape[0]
    if kernel is not None:
        ht = _check_hidden(ht, "teacher", what)
        if hs.shape[:-1] != ht.shape[:-1]:
            raise ValueError(
                f"{what}: student hidden states {tuple(hs.shape)} and teacher hidden states "
                f"{tuple(ht.shape)} differ in their positions"
            )
        wt, bt = _check_head(ht, wt, bt, "teacher", what)
        width, teacher_width = align_vocabularies(
            ws.shape[0],
            wt.shape[0],
            vocab_alignment=shared.vocab_alignment,
            max_vocab_padding=shared.max_vocab_padding,
            what=what,
        )
        kernel.check_fits(width, teacher_width, what)
    num_items = check_num_items(num_items_in_batch, reduction, what)
    positions_shape = tuple(hs.shape[:-1])
    rows = kept_rows(labels, positions_shape, shared.ignore_index, hs.device, what)
    targets = _targets(labels, rows, ws.shape[0], hs.device, what) if cross_entropy else None
    dtype = compute_dtype(*(t for t in (hs, ht, ws, wt) if t is not None))
    chunk = chunk_size or rows_per_chunk(ws.shape[0], FUSED_CHUNK_ELEMENTS)
    spec = ChunkSpec(kernel, temperature, width, teacher_width, chunk, dtype)
    if cross_entropy and reduction == "none":
        raise ValueError(
            f"{what}: the student's cross-entropy needs a scalar reduction, not 'none'"
        )
    kd, ce = _FusedLinearLosses.apply(
        hs,
        None if ht is None else ht.detach(),
        ws,
        None if wt is None else wt.detach(),
        bs,
        None if bt is None else bt.detach(),
        rows,
        targets,
        spec,
        teacher_gathered,
    )
    kept = kept_count(rows, hs)
    if cross_entropy:
        ce = ce.sum() / (1.0 if reduction == "sum" else (num_items or float(max(kept, 1))))
    if kernel is None:
        return None, ce if cross_entropy else None
    kd = reduce_rows(
        kd,
        reduction=reduction,
        rows=rows,
        labelled=labels is not None,
        positions_shape=positions_shape,
        first_dim=hs.shape[0] if hs.dim() > 1 else 1,
        classes=width,
        num_items=num_items,
        scale=temperature**2,
    )
    return kd, ce if cross_entropy else None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Any = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=...)`` without ever
    holding the ``[positions, vocab]`` logits: a chunk of positions at a time, as
    :func:`fused_linear_divergence`.

    ``labels`` has one token id a position (``ignore_index`` where no loss counts; shift them
    first for a causal LM, :func:`kdcore.llm.shift_labels`). ``reduction="mean"`` divides the
    sum over the kept positions by ``num_items_in_batch`` when given (the step's token count,
    see :mod:`kdcore.llm`), else by their number; ``"sum"`` keeps the sum. Half-precision
    logits are upcast to float32 a chunk at a time; the gradient reaches ``hidden``, ``weight``
    and ``bias``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"fused cross-entropy: reduction must be 'mean' or 'sum', got {reduction!r}"
        )
    shared = check_shared_arguments(
        1.0,
        "batchmean" if reduction == "mean" else "sum",
        ignore_index,
        "error",
        DEFAULT_MAX_VOCAB_PADDING,
    )
    _, ce = _fused(
        None,
        hidden,
        None,
        weight,
        None,
        bias,
        None,
        shared,
        what="fused cross-entropy",
        labels=labels,
        num_items_in_batch=num_items_in_batch,
        chunk_size=None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1),
        cross_entropy=True,
    )
    assert ce is not None
    return ce


def _check_heads(
    student_module: nn.Module,
    teacher_module: nn.Module,
    hint: str = "pair its input, e.g. "
    "'lm_head:input', or name the heads: student_head='lm_head', teacher_head='lm_head'",
) -> tuple[nn.Module, nn.Module]:
    for side, module in (("student", student_module), ("teacher", teacher_module)):
        if isinstance(module, nn.Embedding):
            # Its weight is [vocab, hidden] too, but unless the head is tied to it, it is not the
            # layer that makes the logits: the loss would train against the wrong matrix.
            raise TypeError(
                f"FusedLogitsLoss: the {side} layer is an embedding ({type(module).__name__}), not "
                f"the lm head; name the layer the model calls on its final hidden states ({hint}; "
                "with tied embeddings the head shares the embedding's weight)"
            )
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(
                f"FusedLogitsLoss: the {side} layer must be the lm head (a linear layer with a "
                f"[vocab, hidden] weight; {hint}), got {type(module).__name__}"
            )
    return student_module, teacher_module


def _resolve_head(model: nn.Module, head: str, side: str) -> nn.Module:
    names = [name for name, _ in model.named_modules() if name]
    if head not in names:
        raise UnknownLayerError(
            f"FusedLogitsLoss {side}_head: the {side} ({type(model).__name__}) has no layer "
            f"{head!r}{did_you_mean(head, names)}" + getattr(model, "layers_note", ""),
            name=head,
        )
    return model.get_submodule(head)


def _check_head_name(head: Any, side: str) -> str | None:
    if head is None or (isinstance(head, str) and head):
        return head
    raise TypeError(f"{side}_head must be the lm head's layer name (e.g. 'lm_head'), got {head!r}")


class FusedLogitsLoss(nn.Module, SharedArguments):
    """A logit divergence computed from hidden states and the two lm heads, never holding the
    full logits of either model (as Liger Kernel's fused linear JSD/KL, Hsu et al., 2024,
    arXiv 2410.10989).

    Positions are processed in chunks (``chunk_size`` positions; default about 8M logits per
    chunk): forward computes each chunk's student and teacher logits and the divergence;
    backward computes them again, and the gradients with respect to the student's hidden
    states, lm-head weight and bias, which are accumulated (nothing the size of the vocabulary
    is kept from forward to backward). ``divergence`` is one of ``forward_kl``, ``reverse_kl``,
    ``jsd`` (``beta``), ``skew_kl``, ``skew_reverse_kl`` (``alpha``), ``tvd``, ``topk_kl`` (``k``,
    ``tail_bucket``), with the values, reductions, ``labels``/``ignore_index`` masks,
    ``num_items_in_batch`` and ``vocab_alignment`` of the unfused losses (see
    :mod:`kdcore_builtins.divergences`).

    In kdcore, pair the layers whose outputs are the final hidden states (``"model.norm"`` in
    Hugging Face Llama-style models, ``"transformer.ln_f"`` in GPT-2) and name the lm heads
    (``student_head``/``teacher_head``, layer names; or bind the head modules with
    ``bind_layers``)::

        kd.convert(student, [("kd_loss", {
            "teacher_model": teacher,
            "criterion": {("model.norm", "model.norm"): {
                "name": "fused_logits", "divergence": "jsd",
                "student_head": "lm_head", "teacher_head": "lm_head"}}})])

    The capture then does not depend on the heads running at all, so the models' forwards can
    skip them (``model(input_ids, logits_to_keep=1)`` in Hugging Face causal LMs; ``KDTrainer``
    does it by itself). Without head names, pair the heads' *inputs* instead
    (``("lm_head:input", "lm_head:input")``): the heads then have to run on every position.

    At convert time kdcore calls ``bind_layers(student_layer, teacher_layer)`` and
    ``bind_models(student, teacher)``; the loss keeps plain references to the heads (not as
    submodules, so their weights are not registered a second time) and reads
    ``.weight``/``.bias`` at every call, so the gradient reaches the student's lm-head weight
    (and tied embeddings) and its hidden states. ``forward(student_hidden, teacher_hidden,
    labels=None, num_items_in_batch=None, lm_heads=None)``; ``lm_heads=(student_head,
    teacher_head)`` overrides the bound heads. :meth:`student_cross_entropy` gives the student's
    own loss from the same pass. A head that FSDP2 shards as its own unit is gathered for the
    loss and released after (the teacher's at once, and again for backward, which recomputes each
    chunk's logits; the student's by FSDP's post-backward); heads in the root unit are whole
    after the forward anyway. DeepSpeed ZeRO-3 is not handled.
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
        student_head: str | None = None,
        teacher_head: str | None = None,
    ) -> None:
        super().__init__()
        self.divergence = check_divergence(divergence)
        self.set_shared_arguments(
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
        self.student_head = _check_head_name(student_head, "student")
        self.teacher_head = _check_head_name(teacher_head, "teacher")
        if (student_head is None) != (teacher_head is None):
            raise ValueError("name both lm heads (student_head and teacher_head), or neither")
        # Plain references in tuples (a tuple is not registered as a submodule).
        self._lm_heads: tuple[nn.Module, nn.Module] | None = None
        self._pending: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @property
    def names_heads(self) -> bool:
        """Whether the heads are named (the paired layers are then the final hidden states, and
        the models may skip their heads)."""
        return self.student_head is not None

    @property
    def bound_heads(self) -> tuple[nn.Module, nn.Module] | None:
        """The ``(student, teacher)`` lm heads bound at convert time; None before."""
        return self._lm_heads

    def bind_layers(self, student_module: nn.Module, teacher_module: nn.Module) -> None:
        """Keep the paired lm heads (unless named); called by kdcore at convert time."""
        if not self.names_heads:
            self._lm_heads = _check_heads(student_module, teacher_module)

    def bind_models(self, student: nn.Module, teacher: nn.Module) -> None:
        """Find the named lm heads in the two models; called by kdcore at convert time."""
        student_head, teacher_head = self.student_head, self.teacher_head
        if student_head is not None and teacher_head is not None:
            self._lm_heads = _check_heads(
                _resolve_head(student, student_head, "student"),
                _resolve_head(teacher, teacher_head, "teacher"),
                hint="student_head and teacher_head name the lm heads",
            )

    def kernel(self) -> Kernel:
        return make_kernel(
            self.divergence,
            beta=self.beta,
            alpha=self.alpha,
            k=self.k,
            tail_bucket=self.tail_bucket,
        )

    def _heads(self, lm_heads: tuple[nn.Module, nn.Module] | None) -> tuple[nn.Module, nn.Module]:
        if lm_heads is not None:
            return _check_heads(*lm_heads)
        if self._lm_heads is None:
            raise RuntimeError(
                "FusedLogitsLoss has no lm heads: pair ('lm_head:input', 'lm_head:input') or "
                "name them (student_head=, teacher_head=) in kd.convert, call "
                "bind_layers(student_head, teacher_head), or pass lm_heads="
            )
        return self._lm_heads

    def _losses(
        self,
        student_hidden: Any,
        teacher_hidden: Any,
        labels: torch.Tensor | None,
        num_items_in_batch: Any,
        lm_heads: tuple[nn.Module, nn.Module] | None,
        cross_entropy: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        student_head, teacher_head = self._heads(lm_heads)
        # The student's head stays gathered for backward (FSDP's post-backward reshards it).
        with _gathered(student_head, keep=torch.is_grad_enabled()), _gathered(teacher_head):
            return _fused(
                self.kernel(),
                student_hidden,
                teacher_hidden,
                student_head.weight,
                teacher_head.weight,
                getattr(student_head, "bias", None),
                getattr(teacher_head, "bias", None),
                self,
                what=type(self).__name__,
                labels=labels,
                num_items_in_batch=num_items_in_batch,
                chunk_size=self.chunk_size,
                cross_entropy=cross_entropy,
                teacher_gathered=lambda: _gathered(teacher_head),
            )

    def forward(
        self,
        student_hidden: Any,
        teacher_hidden: Any,
        labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        lm_heads: tuple[nn.Module, nn.Module] | None = None,
    ) -> torch.Tensor:
        pending, self._pending = self._pending, None
        arguments = (student_hidden, teacher_hidden, labels, num_items_in_batch, lm_heads)
        if pending is not None and _same_arguments(pending[0], arguments):
            return pending[1]
        value, _ = self._losses(*arguments, cross_entropy=False)
        assert value is not None
        return value

    def student_cross_entropy(
        self,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch: Any = None,
        lm_heads: tuple[nn.Module, nn.Module] | None = None,
    ) -> torch.Tensor:
        """The student's cross-entropy with ``labels`` (its lm head on ``student_hidden``,
        reduced as the divergence: the mean per kept token, or the sum over
        ``num_items_in_batch``; the sum with ``reduction="sum"``), from the same pass over the
        chunks as the divergence.

        The divergence is kept, and the next call of the loss with the same arguments (the
        ``compute_kd_loss`` that follows, say) returns it rather than computing it again; any
        other call computes afresh. Not with ``reduction="none"``.
        """
        arguments = (student_hidden, teacher_hidden, labels, num_items_in_batch, lm_heads)
        value, cross_entropy = self._losses(*arguments, cross_entropy=True)
        assert value is not None and cross_entropy is not None
        self._pending = (arguments, value)
        return cross_entropy

    def extra_repr(self) -> str:
        heads = ""
        if self.names_heads:
            heads = f", student_head={self.student_head!r}, teacher_head={self.teacher_head!r}"
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}{heads}"
        )


@contextlib.contextmanager
def _gathered(head: nn.Module, keep: bool = False) -> Iterator[None]:
    """``head``'s weights whole while the loss reads them, where FSDP2 shards them (its own
    ``fully_shard`` unit, resharded after its forward): gathered, and released after unless
    ``keep``."""
    sharded = hasattr(getattr(head, "weight", None), "placements") and callable(
        getattr(head, "unshard", None)
    )
    if sharded:
        head.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        if sharded and not keep:
            head.reshard()  # type: ignore[operator]


def _same_arguments(kept: tuple[Any, ...], given: tuple[Any, ...]) -> bool:
    """Whether two calls have the very same arguments (the same tensors, equal numbers)."""
    return all(
        a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)
        for a, b in zip(kept, given, strict=True)
    )
