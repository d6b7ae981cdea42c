"""Logit divergences for distillation, computed in row chunks so that large vocabularies fit.

Every divergence here compares the teacher's distribution ``q = softmax(t / T)`` with the
student's ``p = softmax(s / T)`` position by position (a position is one row of the logits: one
token of a language model, one sample of a classifier) and multiplies by ``T**2`` (Hinton et al.,
2015), so that gradient magnitudes do not shrink as the temperature grows.

Memory. The plain PyTorch formula (``F.kl_div(F.log_softmax(s / T), F.softmax(t / T))``) keeps
several ``[N, V]`` float32 temporaries alive for backward, and backward makes several more. Here
a custom autograd function walks the rows in chunks of about two million logits (8 MiB in
float32; ``CHUNK_ELEMENTS``): its forward keeps only
its inputs (references, not copies) and two floats per row (the log-sum-exp of each side); its
backward recomputes each chunk and writes its gradient into one preallocated ``[N, V]`` tensor
(in the student's dtype), which is the only ``[N, V]`` allocation. Half-precision logits are
upcast to float32 one chunk at a time (float64 logits are computed in float64). The loss comes
back in that compute dtype.

Masks, reductions and normalisation (the same for every divergence here, and for
``LogitsDistillationLoss`` in ``criteria.py``). Logits have any leading shape ``[..., V]``;
``P`` is the number of positions. With ``labels=`` (one integer per position), positions whose
label is ``ignore_index`` are left out as if absent (no loss, zero gradient, never read); ``K``
is the number of positions kept (``K = P`` without labels). Then:

* ``"sum"``: the sum over the kept positions;
* ``"mean"``: that sum over ``K * V`` (PyTorch's elementwise mean, classes included);
* ``"batchmean"``: that sum over ``num_items_in_batch`` when given, else over ``K`` when labels
  are given (the mean per kept token), else over ``logits.shape[0]`` (what ``F.kl_div`` does: for
  ``[B, S, V]`` logits without labels that is a mean per *sequence*);
* ``"none"``: one loss per position, in the leading shape, 0 where ignored.

With no position kept the loss is 0 (denominators are at least 1). ``num_items_in_batch`` (only
with ``"batchmean"``) is the number of kept positions over the *whole* optimiser step, all
gradient-accumulation micro-batches and all data-parallel ranks together; see
:mod:`kdcore_builtins.llm` for why and how to count it.

Vocabularies. Same-family models often pad their vocabularies differently (151936 vs 152064
columns): ``vocab_alignment="error"`` (the default) refuses any difference, naming both shapes;
``"truncate"`` compares the first ``min(V_s, V_t)`` columns only (both softmaxes over the shared
columns); ``"mask"`` keeps the student's softmax over all its columns and gives the teacher zero
probability on columns it lacks (the student learns to leave padding tokens empty), while teacher
columns the student lacks are dropped. Differences larger than ``max_vocab_padding`` columns are
refused either way, naming both sizes: those are different tokenizers, not padding.

Masked classes. A logit of -inf (on either side, in the chunked and the fused losses) gives its
class probability 0, and each divergence takes its value with 0 log 0 = 0: a class masked on
both sides adds nothing, and a masked student class gets gradient 0. JSD (0 < beta < 1), skew
KL, skew reverse KL and TVD are then always finite (a mixture has mass wherever either side
has). A KL is +inf where it weighs a class the other side masks: forward KL (and top-k KL,
JSD with beta = 0, skew KL with alpha = 0) where the student masks a class the teacher keeps,
reverse KL (JSD with beta = 1, skew reverse KL with alpha = 0) where the teacher masks one the
student keeps. That row's loss is +inf, never NaN, and its gradient stays finite: the limit
``p - q`` for the forward kinds, 0 for the reverse KL (whose gradient grows without bound). A
row with every logit of one side -inf (or any NaN or +inf logit) has no distribution: its loss
and gradient are NaN; leave such positions out with ``labels``/``ignore_index``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import kdcore
from kdcore.registry import Registry

IGNORE_INDEX = -100
VOCAB_ALIGNMENTS = ("error", "truncate", "mask")
DEFAULT_MAX_VOCAB_PADDING = 256
#: Elements per chunk and temporary (8 MiB in float32). Each chunk runs a dozen parallel regions,
#: each a thread barrier that stalls when the machine is oversubscribed: on a loaded 2-core
#: machine 1M-element chunks took twice as long as 4M ones. Larger chunks cost memory (peak above
#: the inputs at 2048 x 32000, forward KL: 1M 0.25x the plain formula's, 2M 0.27x, 4M 0.30x with
#: swings to 0.35x); 2M is the compromise.
CHUNK_ELEMENTS = 1 << 21
#: Elements of logits per chunk in the fused loss (larger, for efficient matrix products).
FUSED_CHUNK_ELEMENTS = 1 << 23
#: Padded teacher columns sit this far below the row's maximum: exp() underflows to exactly 0
#: in float32 and float64, while every difference stays finite (no inf - inf, no 0 * inf).
_PAD_BELOW_MAX = 1.0e4
VOCAB_HINT = "pass vocab_alignment='truncate' or 'mask'"

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "topk_kl")


_criteria_module: Any = None


def _criteria() -> Any:
    # The checks live in criteria.py, which imports this module for LogitsDistillationLoss.
    global _criteria_module
    if _criteria_module is None:
        from kdcore_builtins import criteria

        _criteria_module = criteria
    return _criteria_module


# ====================================================================== argument checks
def check_temperature(temperature: Any) -> float:
    return _criteria()._check_temperature(temperature)  # type: ignore[no-any-return]


def check_reduction(reduction: Any) -> str:
    return _criteria()._check_reduction(reduction)  # type: ignore[no-any-return]


def check_unit_interval(name: str, value: Any, *, upper_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_ignore_index(ignore_index: Any) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    return ignore_index


def check_vocab_alignment(vocab_alignment: Any) -> str:
    if vocab_alignment not in VOCAB_ALIGNMENTS:
        raise ValueError(
            f"vocab_alignment must be one of {', '.join(VOCAB_ALIGNMENTS)}; got {vocab_alignment!r}"
        )
    return str(vocab_alignment)


def check_divergence(divergence: Any) -> str:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    return str(divergence)


# ====================================================================== kernels
# A kernel turns one chunk of scaled logits (student ``a``, teacher ``b``, [c, W] in the compute
# dtype, both free to overwrite) and their row log-sum-exps (A, B) into the divergence of each row
# and/or its gradient with respect to ``a``. ``tw`` is the number of real teacher columns; columns
# past it are padding with zero teacher probability (vocab_alignment="mask").
#
# Masked classes. A logit of -inf gives its class probability 0, and log-probabilities of -inf
# make 0 * inf and inf - inf (NaN) where the definitions, with 0 log 0 = 0, have a limit: each
# kernel computes that limit (see "Masked classes" in the module docstring). The repairs are
# in-place passes over a chunk (no [c, W] allocation), so unmasked inputs cost next to nothing
# more. A row without a finite log-sum-exp on one side (every logit -inf, or a NaN or +inf logit)
# has no distribution: :func:`_run_kernel` makes its loss and gradient NaN whatever the kernel's
# repairs did with it, so that they never hide a NaN.
class _Kernel:
    name = ""
    #: finite when the teacher gives zero probability to columns where the student has mass
    zero_teacher_mass_ok = True

    def __call__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        tw: int,
        want_loss: bool,
        want_grad: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError


def _zero_where_nan_(terms: torch.Tensor) -> torch.Tensor:
    """``terms`` with NaN set to 0, in place: the 0 * inf and inf - inf of a masked class, whose
    limit is 0 (0 log 0 = 0). Infinities stay: a term that is +inf makes the divergence +inf."""
    return terms.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def _floor_(log_probs: torch.Tensor) -> torch.Tensor:
    """``log_probs`` with -inf raised to the lowest finite value, in place: the probability stays
    exactly 0 and every difference and product stays finite (0 * finite = 0). For divergences
    that are finite whatever is masked (a mixture has mass wherever either side has)."""
    return log_probs.clamp_(min=torch.finfo(log_probs.dtype).min)


def _softmax_jacobian(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``d/da`` of a loss whose gradient with respect to ``p = softmax(a)`` is ``g`` (in place)."""
    dot = (p * g).sum(-1, keepdim=True)
    return g.sub_(dot).mul_(p)


class _ForwardKL(_Kernel):
    """KL(q || p) = sum q (log q - log p); d/da = p - q.

    A class the teacher masks adds 0; one the student masks while the teacher keeps it makes the
    row +inf, where the gradient p - q stays finite (its limit).
    """

    name = "forward KL"

    def __call__(self, a, b, A, B, tw, want_loss, want_grad):  # type: ignore[no-untyped-def]
        lp, lq = a.sub_(A[:, None]), b.sub_(B[:, None])
        q = torch.exp(lq)
        loss = _zero_where_nan_(torch.sub(lq, lp).mul_(q)).sum(-1) if want_loss else None
        grad = lp.exp_().sub_(q) if want_grad else None
        return loss, grad


class _ReverseKL(_Kernel):
    """KL(p || q) = sum p (log p - log q); d/da = p (log p - log q - KL).

    A class the student masks adds 0 (and gets gradient 0); one the teacher masks while the
    student keeps it makes the row +inf, where the gradient has no finite limit: it is 0.
    """

    name = "reverse KL"
    zero_teacher_mass_ok = False

    def __call__(self, a, b, A, B, tw, want_loss, want_grad):  # type: ignore[no-untyped-def]
        lp, lq = a.sub_(A[:, None]), b.sub_(B[:, None])
        p = torch.exp(lp)
        # log p - log q; -inf or NaN only where the student masks the class (p = 0): 0 there.
        ratio = lp.sub_(lq).nan_to_num_(nan=0.0, posinf=math.inf, neginf=0.0)
        loss = (p * ratio).sum(-1)
        grad = None
        if want_grad:
            grad = ratio.sub_(loss[:, None]).mul_(p).masked_fill_(loss.isposinf()[:, None], 0.0)
        return loss, grad


class _JSD(_Kernel):
    """Generalised JSD: beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p.

    d/dp = (1 - beta) (log p - log m), so d/da = (1 - beta) p (u - sum p u), u = log p - log m.
    Finite whatever either side masks.
    """

    name = "generalised JSD"

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.log_beta, self.log_rest = math.log(beta), math.log1p(-beta)

    def __call__(self, a, b, A, B, tw, want_loss, want_grad):  # type: ignore[no-untyped-def]
        beta = self.beta
        lp, lq = _floor_(a.sub_(A[:, None])), _floor_(b.sub_(B[:, None]))
        lm = torch.add(lq, self.log_beta)
        torch.logaddexp(lm, lp + self.log_rest, out=lm)
        p = torch.exp(lp)
        u = lp.sub_(lm)  # log p - log m
        loss = None
        if want_loss:
            q = torch.exp(lq)
            v = lq.sub_(lm).mul_(q)  # q (log q - log m)
            loss = v.sum(-1).mul_(beta).add_((p * u).sum(-1), alpha=1 - beta)
        grad = _softmax_jacobian(p, u).mul_(1 - beta) if want_grad else None
        return loss, grad


class _SkewKL(_Kernel):
    """Skew KL (Ko et al., 2024): KL(q || m), m = alpha q + (1 - alpha) p.

    d/dp = -(1 - alpha) q / m, so d/da = p sum v - v, v = q (1 - alpha) p / m.
    Finite whatever either side masks.
    """

    name = "skew KL"

    def __init__(self, alpha: float) -> None:
        self.log_alpha, self.log_rest = math.log(alpha), math.log1p(-alpha)

    def __call__(self, a, b, A, B, tw, want_loss, want_grad):  # type: ignore[no-untyped-def]
        lp, lq = _floor_(a.sub_(A[:, None])), _floor_(b.sub_(B[:, None]))
        lm = torch.add(lp, self.log_rest)
        torch.logaddexp(lm, lq + self.log_alpha, out=lm)
        q = torch.exp(lq)
        loss = torch.sub(lq, lm).mul_(q).sum(-1) if want_loss else None
        grad = None
        if want_grad:
            p = torch.exp(lp)
            v = lp.add_(self.log_rest).sub_(lm).exp_().mul_(q)  # q (1 - alpha) p / m
            grad = p.mul_(v.sum(-1, keepdim=True)).sub_(v)
        return loss, grad


class _SkewReverseKL(_Kernel):
    """Skew reverse KL (Ko et al., 2024): KL(p || m), m = alpha p + (1 - alpha) q.

    d/dp = log p - log m + 1 - alpha p / m; constants vanish through the softmax.
    Finite whatever either side masks.
    """

    name = "skew reverse KL"

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.log_alpha, self.log_rest = math.log(alpha), math.log1p(-alpha)

    def __call__(self, a, b, A, B, tw, want_loss, want_grad):  # type: ignore[no-untyped-def]
        lp, lq = _floor_(a.sub_(A[:, None])), _floor_(b.sub_(B[:, None]))
        lm = torch.add(lq, self.log_rest)
        torch.logaddexp(lm, lp + self.log_alpha, out=lm)
        p = torch.exp(lp)
        u = lp.sub_(lm)  # log p - log m
        loss = (p * u).sum(-1) if want_loss else None
        grad = None
        if want_grad:
            z = lm.copy_(u).add_(self.log_alpha).exp_()  # alpha p / m
            grad = _softmax_jacobian(p, u.sub_(z))
        return loss, grad


class _TVD(_Kernel):
    """Total variation distance: 0.5 sum |p - q|; d/dp = 0.5 sign(p - q)."""

    name = "total variation distance"

    def __call__(self, a, b, A, B, tw, want_loss, want_grad):  # type: ignore[no-untyped-def]
        p = a.sub_(A[:, None]).exp_()
        diff = torch.sub(p, b.sub_(B[:, None]).exp_())
        loss = diff.abs().sum(-1).mul_(0.5) if want_loss else None
        grad = _softmax_jacobian(p, diff.sign_().mul_(0.5)) if want_grad else None
        return loss, grad


class _TopKKL(_Kernel):
    """KL(q || p) over the teacher's top-k classes of each row.

    Without a tail bucket both distributions are renormalised over those k classes; with one,
    the distributions are over k + 1 outcomes: the k classes (full-softmax probabilities) and a
    bucket holding the rest of each side's mass.

    Classes the teacher masks are never among its top k: with fewer than k classes kept, masked
    ones fill the top k (tied at -inf, picked arbitrarily), so without a tail bucket they are
    left out of both sides; with one, they add 0 wherever they land. A class the student masks
    where the teacher has mass (in the top k, or in a tail with mass) makes the row +inf.
    """

    name = "top-k KL"

    def __init__(self, k: int, tail_bucket: bool) -> None:
        self.k, self.tail_bucket = k, tail_bucket

    def __call__(self, a, b, A, B, tw, want_loss, want_grad):  # type: ignore[no-untyped-def]
        top = b[:, :tw].topk(self.k, dim=-1, sorted=False).indices
        a_top, b_top = a.gather(-1, top), b.gather(-1, top)
        if not self.tail_bucket:
            a_top.masked_fill_(b_top.isneginf(), -math.inf)
            lq_top = torch.log_softmax(b_top, dim=-1)
            # Floored: when the student masks every kept class, lp_top is -inf (the row +inf),
            # not -inf - -inf.
            lp_top = a_top.sub_(_floor_(torch.logsumexp(a_top, -1))[:, None])
            q_top = lq_top.exp()
            loss = _zero_where_nan_(q_top * (lq_top - lp_top)).sum(-1) if want_loss else None
            grad = None
            if want_grad:
                grad = a.zero_().scatter_(-1, top, lp_top.exp_().sub_(q_top))
            return loss, grad
        lp_top, lq_top = a_top.sub_(A[:, None]), b_top.sub_(B[:, None])
        q_top = lq_top.exp()
        # The rest of each side's mass, as a log-sum-exp over the columns outside the top k.
        a_rest = torch.logsumexp(a.scatter(-1, top, -math.inf), dim=-1)
        b_rest = torch.logsumexp(b.scatter(-1, top, -math.inf), dim=-1)
        lp_tail, lq_tail = a_rest - A, b_rest - B
        q_tail = lq_tail.exp()
        loss = None
        if want_loss:
            tail = torch.where(q_tail > 0, q_tail * (lq_tail - lp_tail), 0.0)
            loss = _zero_where_nan_(q_top * (lq_top - lp_top)).sum(-1).add_(tail)
        grad = None
        if want_grad:
            # d/da_j = p_j - q_j inside the top k, p_j - q_tail p_j / p_tail outside (0 there
            # when the student masks the whole tail: a_rest floored; the top k is overwritten).
            scale = torch.where(q_tail > 0, q_tail, 0.0)[:, None]
            grad = torch.sub(a, A[:, None]).exp_()
            grad.sub_(a.sub_(_floor_(a_rest)[:, None]).exp_().mul_(scale))
            grad.scatter_(-1, top, lp_top.exp_().sub_(q_top))
        return loss, grad


def make_kernel(
    divergence: str,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    k: int | None = None,
    tail_bucket: bool = False,
) -> _Kernel:
    """The kernel of ``divergence`` (the endpoints of beta and alpha use the exact special case)."""
    if divergence == "forward_kl":
        return _ForwardKL()
    if divergence == "reverse_kl":
        return _ReverseKL()
    if divergence == "jsd":
        if beta == 0:  # as TRL: beta = 0 is forward KL, beta = 1 reverse KL
            return _ForwardKL()
        return _ReverseKL() if beta == 1 else _JSD(beta)
    if divergence == "skew_kl":
        return _SkewKL(alpha) if alpha > 0 else _ForwardKL()
    if divergence == "skew_reverse_kl":
        return _SkewReverseKL(alpha) if alpha > 0 else _ReverseKL()
    if divergence == "tvd":
        return _TVD()
    if divergence == "topk_kl":
        if k is None:
            raise ValueError("divergence='topk_kl' needs k (the number of teacher classes kept)")
        return _TopKKL(k, tail_bucket)
    raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")


# ====================================================================== chunked rows
class _Rows:
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


class _Spec:
    """What the autograd functions need beyond tensors (plain Python, not saved for backward)."""

    def __init__(
        self,
        kernel: _Kernel,
        temperature: float,
        width: int,
        teacher_width: int,
        chunk_rows: int,
        dtype: torch.dtype,
    ) -> None:
        self.kernel = kernel
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
        self, student: _Rows, teacher: _Rows, rows: torch.Tensor | None, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.scaled(student.take(rows, start, stop), self.width)
        b = self.scaled(teacher.take(rows, start, stop), self.teacher_width)
        return a, b


def _run_kernel(
    spec: _Spec,
    a: torch.Tensor,
    b: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    want_loss: bool,
    want_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``spec.kernel`` on one chunk; rows without a finite log-sum-exp on either side come out
    NaN, loss and gradient, whatever the kernel's handling of masked classes made of them."""
    loss, grad = spec.kernel(a, b, A, B, spec.teacher_width, want_loss, want_grad)
    undefined = torch.mul(A, 0.0).add_(torch.mul(B, 0.0))  # 0, or NaN where A or B is not finite
    if loss is not None:
        loss.add_(undefined)
    if grad is not None:
        grad.add_(undefined[:, None])
    return loss, grad


def _kept_count(rows: torch.Tensor | None, student: torch.Tensor) -> int:
    return int(rows.numel()) if rows is not None else math.prod(student.shape[:-1])


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
        spec: _Spec,
    ) -> torch.Tensor:
        count = _kept_count(rows, student)
        student_rows, teacher_rows = _Rows(student), _Rows(teacher)
        ctx.spec, ctx.eager = spec, count <= spec.chunk_rows and ctx.needs_input_grad[0]
        if ctx.eager:  # one chunk: its gradient (at most CHUNK_ELEMENTS) now, not recomputed
            a, b = spec.load(student_rows, teacher_rows, rows, 0, count)
            A, B = torch.logsumexp(a, -1), torch.logsumexp(b, -1)
            losses, g = _run_kernel(spec, a, b, A, B, True, True)
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
            loss, _ = _run_kernel(spec, a, b, A, B, True, False)
            assert loss is not None
            losses[start:stop] = loss
        ctx.save_for_backward(student, teacher, rows, stats)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: torch.Tensor) -> Any:
        spec: _Spec = ctx.spec
        weights = grad_losses / spec.temperature  # d loss / d a times d a / d s
        if ctx.eager:
            student, rows, g = ctx.saved_tensors
            g = g * weights[:, None]
            if rows is None and spec.width == student.shape[-1]:
                return g.to(student.dtype).view(student.shape), None, None, None
        else:
            student, teacher, rows, stats = ctx.saved_tensors
        count = _kept_count(rows, student)
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
        student_rows, teacher_rows = _Rows(student), _Rows(teacher)
        for start in range(0, count, spec.chunk_rows):
            stop = min(start + spec.chunk_rows, count)
            a, b = spec.load(student_rows, teacher_rows, rows, start, stop)
            A, B = stats[0, start:stop], stats[1, start:stop]
            _, g = _run_kernel(spec, a, b, A, B, False, True)
            assert g is not None
            g.mul_(weights[start:stop, None])
            if rows is None:
                flat[start:stop, : spec.width] = g
            else:
                flat[rows[start:stop], : spec.width] = g.to(grad.dtype)
        return grad, None, None, None


# ====================================================================== shared front end
def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
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


def _kept_rows(
    labels: Any,
    positions_shape: tuple[int, ...],
    ignore_index: int,
    device: torch.device,
    what: str,
) -> torch.Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"{what}: labels must be an integer tensor, got "
            f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    if labels.numel() != math.prod(positions_shape):
        raise ValueError(
            f"{what}: labels {tuple(labels.shape)} do not match the positions "
            f"{positions_shape} of the logits (one label per position)"
        )
    keep = labels.reshape(-1).to(device) != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(-1)


def _check_num_items(num_items_in_batch: Any, reduction: str, what: str) -> float | None:
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


def _reduce(
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
    """Reduce the per-kept-row divergences as the module docstring describes, times ``scale``."""
    kept = per_row.shape[0]
    if reduction == "none":
        if rows is not None:
            full = per_row.new_zeros(math.prod(positions_shape))
            per_row = full.index_copy(0, rows, per_row)
        return per_row.reshape(positions_shape) * scale
    total = per_row.sum()
    denominator = _denominator(reduction, labelled, kept, first_dim, classes, num_items)
    return total * (scale / denominator)


def _denominator(
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


def _chunk_rows(width: int, elements: int) -> int:
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
    ``tail_bucket``); the classes below document each. Arguments are checked as the classes
    check them.
    """
    kernel = make_kernel(
        check_divergence(divergence),
        beta=check_unit_interval("beta", beta),
        alpha=check_unit_interval("alpha", alpha, upper_open=True),
        k=None if k is None else check_int("k", k, minimum=1),
        tail_bucket=bool(tail_bucket),
    )
    return _divergence(
        kernel,
        student_logits,
        teacher_logits,
        what=divergence,
        temperature=check_temperature(temperature),
        reduction=check_reduction(reduction),
        labels=labels,
        ignore_index=check_ignore_index(ignore_index),
        num_items_in_batch=num_items_in_batch,
        vocab_alignment=check_vocab_alignment(vocab_alignment),
        max_vocab_padding=check_int("max_vocab_padding", max_vocab_padding, minimum=0),
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
        # A class masked on both sides adds 0, where F.kl_div makes 0 * -inf = NaN. Its
        # gradient is already 0 (d/dlog_p = -q) and nothing saved ``pointwise``: the repair
        # needs no autograd record. A row that is NaN throughout (a NaN logit, or every logit of
        # one side -inf) must stay NaN: ``undefined`` is 0, or NaN for such a row.
        _zero_where_nan_(pointwise)
        undefined = log_p.amax(-1).add_(q.amax(-1)).mul_(0.0)
    scale = temperature**2
    if reduction == "none":
        return (pointwise.sum(-1) + undefined) * scale
    if reduction == "mean":
        return (pointwise.mean() + undefined.sum()) * scale
    positions = math.prod(student.shape[:-1])
    denominator = _denominator(reduction, labelled, positions, student.shape[0], 0, num_items)
    return (pointwise.sum() + undefined.sum()) * (scale / denominator)


def _check_kernel_fits(kernel: _Kernel, width: int, teacher_width: int, what: str) -> None:
    if isinstance(kernel, _TopKKL) and kernel.k > teacher_width:
        raise ValueError(
            f"{what}: k={kernel.k} is larger than the teacher's vocabulary of {teacher_width} "
            "classes"
        )
    if teacher_width < width and not kernel.zero_teacher_mass_ok:
        raise ValueError(
            f"{what}: vocab_alignment='mask' gives the student's {width - teacher_width} extra "
            f"columns zero teacher probability, where the {kernel.name} is infinite; use "
            "vocab_alignment='truncate'"
        )


def _divergence(
    kernel: _Kernel,
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    what: str,
    temperature: float,
    reduction: str,
    labels: Any,
    ignore_index: int,
    num_items_in_batch: Any,
    vocab_alignment: str,
    max_vocab_padding: int,
    vocab_hint: str = VOCAB_HINT,
) -> torch.Tensor:
    _check_logits(student, teacher, what)
    num_items = _check_num_items(num_items_in_batch, reduction, what)
    student_vocab, teacher_vocab = student.shape[-1], teacher.shape[-1]
    width, teacher_width = student_vocab, teacher_vocab
    if student_vocab != teacher_vocab:
        width, teacher_width = align_vocabularies(
            student_vocab,
            teacher_vocab,
            vocab_alignment=vocab_alignment,
            max_vocab_padding=max_vocab_padding,
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
    _check_kernel_fits(kernel, width, teacher_width, what)
    positions_shape = tuple(student.shape[:-1])
    chunk_rows = _chunk_rows(width, CHUNK_ELEMENTS)
    rows = _kept_rows(labels, positions_shape, ignore_index, student.device, what)
    dtype = _compute_dtype(student, teacher)
    spec = _Spec(kernel, temperature, width, teacher_width, chunk_rows, dtype)
    per_row = _ChunkedDivergence.apply(student, teacher.detach(), rows, spec)
    return _reduce(
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


# ====================================================================== loss modules
class LogitDivergenceLoss(nn.Module):
    """Base of the chunked logit divergences (not registered itself).

    Subclasses set their kernel; this class holds what they share: ``temperature``,
    ``reduction``, ``ignore_index``, ``vocab_alignment`` and ``max_vocab_padding`` (see the
    module docstring), and ``forward(student_output, teacher_output, labels=None,
    num_items_in_batch=None)``. Outputs may be logits tensors, objects with ``.logits`` or tuples
    whose first item is the logits.
    """

    _vocab_hint = VOCAB_HINT

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int = IGNORE_INDEX,
        vocab_alignment: str = "error",
        max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
    ) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.ignore_index = check_ignore_index(ignore_index)
        self.vocab_alignment = check_vocab_alignment(vocab_alignment)
        self.max_vocab_padding = check_int("max_vocab_padding", max_vocab_padding, minimum=0)

    def kernel(self) -> _Kernel:
        raise NotImplementedError

    def forward(
        self,
        student_output: Any,
        teacher_output: Any,
        labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        student, teacher = student_output, teacher_output
        if type(student) is not torch.Tensor or type(teacher) is not torch.Tensor:
            as_logits = _criteria().as_logits
            student, teacher = as_logits(student, "student"), as_logits(teacher, "teacher")
        return _divergence(
            self.kernel(),
            student,
            teacher,
            what=type(self).__name__,
            temperature=self.temperature,
            reduction=self.reduction,
            labels=labels,
            ignore_index=self.ignore_index,
            num_items_in_batch=num_items_in_batch,
            vocab_alignment=self.vocab_alignment,
            max_vocab_padding=self.max_vocab_padding,
            vocab_hint=self._vocab_hint,
        )

    def extra_repr(self) -> str:
        parts = [f"temperature={self.temperature}", f"reduction={self.reduction!r}"]
        if self.vocab_alignment != "error":
            parts.append(f"vocab_alignment={self.vocab_alignment!r}")
        return ", ".join(parts)


class ForwardKLLoss(LogitDivergenceLoss):
    """Forward KL, ``KL(q || p) * T**2`` (Hinton et al., 2015, arXiv 1503.02531): mode-covering.

    Registered as ``forward_kl``. :class:`kdcore_builtins.criteria.LogitsDistillationLoss`
    (``logits``) is the same divergence with the reference API's constructor
    (``temperature``, ``reduction="mean"``).
    """

    def kernel(self) -> _Kernel:
        return _ForwardKL()


class ReverseKLLoss(LogitDivergenceLoss):
    """Reverse KL, ``KL(p || q) * T**2``: mode-seeking, as in MiniLLM (Gu et al., 2024,
    arXiv 2306.08543) and TRL's ``generalized_jsd_loss`` with ``beta=1``.

    Refuses ``vocab_alignment="mask"`` with a larger student vocabulary (infinite where the
    teacher has no mass): use ``"truncate"``.
    """

    def kernel(self) -> _Kernel:
        return _ReverseKL()


class GeneralizedJSDLoss(LogitDivergenceLoss):
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024, arXiv 2306.13649).

    As TRL's ``GKDTrainer.generalized_jsd_loss`` defines it: with ``m = beta q + (1 - beta) p``,
    ``JSD_beta = beta KL(q || m) + (1 - beta) KL(p || m)``, and the endpoints taken as TRL takes
    them: ``beta = 0`` is the forward KL ``KL(q || p)``, ``beta = 1`` the reverse KL
    ``KL(p || q)`` (the mixture formula itself vanishes at both ends). Unlike TRL, the result is
    multiplied by ``T**2`` like every loss here (at ``T = 1`` the values agree), and
    ``"batchmean"`` follows this module's rule (TRL divides by batch x sequence length: pass
    ``labels`` to get a per-token mean).
    """

    def __init__(
        self,
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int = IGNORE_INDEX,
        vocab_alignment: str = "error",
        max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index, vocab_alignment, max_vocab_padding)
        self.beta = check_unit_interval("beta", beta)

    def kernel(self) -> _Kernel:
        return make_kernel("jsd", beta=self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, {super().extra_repr()}"


class SkewKLLoss(LogitDivergenceLoss):
    """Skew KL of DistiLLM (Ko et al., 2024, arXiv 2402.03898): ``KL(q || alpha q + (1 - alpha) p)
    * T**2``, ``alpha`` in [0, 1); ``alpha = 0`` is the forward KL. Mixing some of the teacher into
    the student's side keeps the divergence and its gradient bounded (by ``-log alpha``).
    """

    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int = IGNORE_INDEX,
        vocab_alignment: str = "error",
        max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index, vocab_alignment, max_vocab_padding)
        self.alpha = check_unit_interval("alpha", alpha, upper_open=True)

    def kernel(self) -> _Kernel:
        return make_kernel("skew_kl", alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, {super().extra_repr()}"


class SkewReverseKLLoss(LogitDivergenceLoss):
    """Skew reverse KL of DistiLLM (Ko et al., 2024, arXiv 2402.03898): ``KL(p || alpha p +
    (1 - alpha) q) * T**2``, ``alpha`` in [0, 1); ``alpha = 0`` is the reverse KL.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int = IGNORE_INDEX,
        vocab_alignment: str = "error",
        max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index, vocab_alignment, max_vocab_padding)
        self.alpha = check_unit_interval("alpha", alpha, upper_open=True)

    def kernel(self) -> _Kernel:
        return make_kernel("skew_reverse_kl", alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, {super().extra_repr()}"


class TVDLoss(LogitDivergenceLoss):
    """Total variation distance ``0.5 * sum |p - q| * T**2``, as DistillKit's ``tvd`` loss and
    Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation" (ACL 2023,
    arXiv 2307.15190) use it. Bounded in [0, T**2] per position.
    """

    def kernel(self) -> _Kernel:
        return _TVD()


class TopKKLLoss(LogitDivergenceLoss):
    """Forward KL over the teacher's top-``k`` classes of each position, as Megatron-LM/ModelOpt's
    top-k logits distillation and TRL/DistillKit's compressed top-k teacher logits use it.

    Without ``tail_bucket`` both distributions are renormalised over the teacher's ``k`` largest
    classes: ``KL(softmax(t_I / T) || softmax(s_I / T))``. With it, over ``k + 1`` outcomes: the
    ``k`` classes with their full-softmax probabilities and one bucket holding the rest of each
    side's mass (so the student is also taught how much mass lies outside the top k). With
    ``k`` equal to the vocabulary both are the full forward KL. ``k`` larger than the teacher's
    vocabulary is refused at the first call, naming both numbers.
    """

    def __init__(
        self,
        k: int,
        tail_bucket: bool = False,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        ignore_index: int = IGNORE_INDEX,
        vocab_alignment: str = "error",
        max_vocab_padding: int = DEFAULT_MAX_VOCAB_PADDING,
    ) -> None:
        super().__init__(temperature, reduction, ignore_index, vocab_alignment, max_vocab_padding)
        self.k = check_int("k", k, minimum=1)
        if not isinstance(tail_bucket, bool):
            raise TypeError(f"tail_bucket must be a bool, got {tail_bucket!r}")
        self.tail_bucket = tail_bucket

    def kernel(self) -> _Kernel:
        return _TopKKL(self.k, self.tail_bucket)

    def extra_repr(self) -> str:
        return f"k={self.k}, tail_bucket={self.tail_bucket}, {super().extra_repr()}"


# ====================================================================== fused lm-head losses
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
        spec: _Spec,
        eager: bool,
    ) -> torch.Tensor:
        ctx.spec, ctx.eager = spec, eager
        need = ctx.needs_input_grad
        want_grad = eager and (need[0] or need[2] or (bs is not None and need[4]))
        count = _kept_count(rows, hs)
        losses = torch.empty(count, dtype=spec.dtype, device=hs.device)
        grads = _FusedGrads(hs, ws, bs, rows, need, count) if want_grad else None
        hs_rows, ht_rows = _Rows(hs), _Rows(ht)
        for start in range(0, count, spec.chunk_rows):
            stop = min(start + spec.chunk_rows, count)
            hs_chunk, a, b = _fused_chunk(spec, hs_rows, ht_rows, ws, wt, bs, bt, rows, start, stop)
            A, B = torch.logsumexp(a, -1), torch.logsumexp(b, -1)
            loss, g = _run_kernel(spec, a, b, A, B, True, grads is not None)
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
        spec: _Spec = ctx.spec
        if ctx.eager:
            grads = ctx.saved_tensors if ctx.has_grads else (None, None, None)
            scaled = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
            return scaled[0], None, scaled[1], None, scaled[2], None, None, None, None
        hs, ht, ws, wt, bs, bt, rows = ctx.saved_tensors
        count = _kept_count(rows, hs)
        accumulate = _FusedGrads(hs, ws, bs, rows, ctx.needs_input_grad, count)
        hs_rows, ht_rows = _Rows(hs), _Rows(ht)
        weights = grad_output / spec.temperature
        for start in range(0, count, spec.chunk_rows):
            stop = min(start + spec.chunk_rows, count)
            hs_chunk, a, b = _fused_chunk(spec, hs_rows, ht_rows, ws, wt, bs, bt, rows, start, stop)
            A, B = torch.logsumexp(a, -1), torch.logsumexp(b, -1)
            _, g = _run_kernel(spec, a, b, A, B, False, True)
            assert g is not None
            accumulate.add(hs_chunk, g.mul_(weights[start:stop, None]), start, stop)
        grad_hs, grad_ws, grad_bs = accumulate.finish()
        return grad_hs, None, grad_ws, None, grad_bs, None, None, None, None


def _fused_chunk(
    spec: _Spec,
    hs_rows: _Rows,
    ht_rows: _Rows,
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
    kernel = make_kernel(
        check_divergence(divergence),
        beta=check_unit_interval("beta", beta),
        alpha=check_unit_interval("alpha", alpha, upper_open=True),
        k=None if k is None else check_int("k", k, minimum=1),
        tail_bucket=bool(tail_bucket),
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
        temperature=check_temperature(temperature),
        reduction=check_reduction(reduction),
        labels=labels,
        ignore_index=check_ignore_index(ignore_index),
        num_items_in_batch=num_items_in_batch,
        vocab_alignment=check_vocab_alignment(vocab_alignment),
        max_vocab_padding=check_int("max_vocab_padding", max_vocab_padding, minimum=0),
        chunk_size=None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1),
    )


def _fused(
    kernel: _Kernel,
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
    num_items = _check_num_items(num_items_in_batch, reduction, what)
    width, teacher_width = align_vocabularies(
        ws.shape[0],
        wt.shape[0],
        vocab_alignment=vocab_alignment,
        max_vocab_padding=max_vocab_padding,
        what=what,
    )
    _check_kernel_fits(kernel, width, teacher_width, what)
    positions_shape = tuple(hs.shape[:-1])
    rows = _kept_rows(labels, positions_shape, ignore_index, hs.device, what)
    dtype = _compute_dtype(hs, ht, ws, wt)
    chunk = chunk_size or _chunk_rows(width, FUSED_CHUNK_ELEMENTS)
    spec = _Spec(kernel, temperature, width, teacher_width, chunk, dtype)
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
        kept = _kept_count(rows, hs)
        first_dim = hs.shape[0] if hs.dim() > 1 else 1
        denominator = _denominator(reduction, labels is not None, kept, first_dim, width, num_items)
        return out * (temperature**2 / denominator)
    return _reduce(
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
        self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.beta = check_unit_interval("beta", beta)
        self.alpha = check_unit_interval("alpha", alpha, upper_open=True)
        if (k is None) != (divergence != "topk_kl"):
            raise ValueError(
                "k is required with divergence='topk_kl'"
                if k is None
                else f"k={k!r} is only used by divergence='topk_kl' (got {divergence!r})"
            )
        self.k = None if k is None else check_int("k", k, minimum=1)
        if not isinstance(tail_bucket, bool):
            raise TypeError(f"tail_bucket must be a bool, got {tail_bucket!r}")
        self.tail_bucket = tail_bucket
        self.ignore_index = check_ignore_index(ignore_index)
        self.vocab_alignment = check_vocab_alignment(vocab_alignment)
        self.max_vocab_padding = check_int("max_vocab_padding", max_vocab_padding, minimum=0)
        self.chunk_size = (
            None if chunk_size is None else check_int("chunk_size", chunk_size, minimum=1)
        )
        # Plain references (a tuple is not registered as a submodule).
        self._lm_heads: tuple[nn.Module, nn.Module] | None = None

    def bind_layers(self, student_module: nn.Module, teacher_module: nn.Module) -> None:
        """Keep the paired lm heads; called by kdcore at convert time."""
        self._lm_heads = _check_heads(student_module, teacher_module)

    def kernel(self) -> _Kernel:
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


@kdcore.hookimpl
def kdcore_register_criteria(registry: Registry[Any]) -> None:
    registry.add("forward_kl", ForwardKLLoss)
    registry.add("reverse_kl", ReverseKLLoss)
    registry.add("jsd", GeneralizedJSDLoss)
    registry.add("skew_kl", SkewKLLoss)
    registry.add("skew_reverse_kl", SkewReverseKLLoss)
    registry.add("tvd", TVDLoss)
    registry.add("topk_kl", TopKKLLoss)
    registry.add("fused_logits", FusedLogitsLoss)
