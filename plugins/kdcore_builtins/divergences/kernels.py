"""The kernels of the seven logit divergences, and :data:`DIVERGENCES`, the one table of them.

A kernel turns one chunk of scaled logits (student ``a``, teacher ``b``, [c, W] in the compute
dtype, both free to overwrite) and their row log-sum-exps (A, B) into the divergence of each row
and/or its gradient with respect to ``a``. ``tw`` is the number of real teacher columns; columns
past it are padding with zero teacher probability (vocab_alignment="mask").

Masked classes. A logit of -inf gives its class probability 0, and log-probabilities of -inf
make 0 * inf and inf - inf (NaN) where the definitions, with 0 log 0 = 0, have a limit: each
kernel computes that limit (see "Masked classes" in :mod:`kdcore_builtins.divergences`). The
repairs are in-place passes over a chunk (no [c, W] allocation), so unmasked inputs cost next to
nothing more. A row without a finite log-sum-exp on one side (every logit -inf, or a NaN or +inf
logit) has no distribution: the chunk runner makes its loss and gradient NaN whatever the
kernel's repairs did with it, so that they never hide a NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kdcore.validation import check_int, check_unit_interval


class Kernel:
    """One divergence on one chunk of rows (see the module docstring)."""

    name = ""
    #: finite when the teacher gives zero probability to columns where the student has mass
    zero_teacher_mass_ok = True

    def check_fits(self, width: int, teacher_width: int, what: str) -> None:
        """Refuse widths this kernel has no finite value for (``what`` names the loss)."""
        if teacher_width < width and not self.zero_teacher_mass_ok:
            raise ValueError(
                f"{what}: vocab_alignment='mask' gives the student's {width - teacher_width} "
                f"extra columns zero teacher probability, where the {self.name} is infinite; use "
                "vocab_alignment='truncate'"
            )

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


def zero_where_nan_(terms: torch.Tensor) -> torch.Tensor:
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


class _ForwardKL(Kernel):
    """KL(q || p) = sum q (log q - log p); d/da = p - q.

    A class the teacher masks adds 0; one the student masks while the teacher keeps it makes the
    row +inf, where the gradient p - q stays finite (its limit).
    """

    name = "forward KL"

    def __call__(self, a, b, A, B, tw, want_loss, want_grad):  # type: ignore[no-untyped-def]
        lp, lq = a.sub_(A[:, None]), b.sub_(B[:, None])
        q = torch.exp(lq)
        loss = zero_where_nan_(torch.sub(lq, lp).mul_(q)).sum(-1) if want_loss else None
        grad = lp.exp_().sub_(q) if want_grad else None
        return loss, grad


class _ReverseKL(Kernel):
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


class _JSD(Kernel):
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


class _SkewKL(Kernel):
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


class _SkewReverseKL(Kernel):
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


class _TVD(Kernel):
    """Total variation distance: 0.5 sum |p - q|; d/dp = 0.5 sign(p - q)."""

    name = "total variation distance"

    def __call__(self, a, b, A, B, tw, want_loss, want_grad):  # type: ignore[no-untyped-def]
        p = a.sub_(A[:, None]).exp_()
        diff = torch.sub(p, b.sub_(B[:, None]).exp_())
        loss = diff.abs().sum(-1).mul_(0.5) if want_loss else None
        grad = _softmax_jacobian(p, diff.sign_().mul_(0.5)) if want_grad else None
        return loss, grad


class _TopKKL(Kernel):
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

    def check_fits(self, width: int, teacher_width: int, what: str) -> None:
        if self.k > teacher_width:
            raise ValueError(
                f"{what}: k={self.k} is larger than the teacher's vocabulary of {teacher_width} "
                "classes"
            )
        super().check_fits(width, teacher_width, what)

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
            loss = zero_where_nan_(q_top * (lq_top - lp_top)).sum(-1) if want_loss else None
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
            loss = zero_where_nan_(q_top * (lq_top - lp_top)).sum(-1).add_(tail)
        grad = None
        if want_grad:
            # d/da_j = p_j - q_j inside the top k, p_j - q_tail p_j / p_tail outside (0 there
            # when the student masks the whole tail: a_rest floored; the top k is overwritten).
            scale = torch.where(q_tail > 0, q_tail, 0.0)[:, None]
            grad = torch.sub(a, A[:, None]).exp_()
            grad.sub_(a.sub_(_floor_(a_rest)[:, None]).exp_().mul_(scale))
            grad.scatter_(-1, top, lp_top.exp_().sub_(q_top))
        return loss, grad


@dataclass(frozen=True)
class Divergence:
    """One logit divergence: its kernel, built from the parameters it takes."""

    #: called with the parameters below as keywords
    kernel: Callable[..., Kernel]
    #: names among ``beta``, ``alpha``, ``k``, ``tail_bucket``, in constructor order
    parameters: tuple[str, ...] = ()


# The endpoints of beta and alpha use the exact special case (as TRL: JSD with beta = 0 is the
# forward KL, with beta = 1 the reverse KL; the mixture formulas vanish there).
#: name -> divergence; the registered criteria, the loss classes and the checks derive from it.
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": Divergence(_ForwardKL),
    "reverse_kl": Divergence(_ReverseKL),
    "jsd": Divergence(
        lambda beta: _ForwardKL() if beta == 0 else _ReverseKL() if beta == 1 else _JSD(beta),
        ("beta",),
    ),
    "skew_kl": Divergence(lambda alpha: _SkewKL(alpha) if alpha > 0 else _ForwardKL(), ("alpha",)),
    "skew_reverse_kl": Divergence(
        lambda alpha: _SkewReverseKL(alpha) if alpha > 0 else _ReverseKL(), ("alpha",)
    ),
    "tvd": Divergence(_TVD),
    "topk_kl": Divergence(_TopKKL, ("k", "tail_bucket")),
}


def check_beta(beta: Any) -> float:
    return check_unit_interval("beta", beta)


def check_alpha(alpha: Any) -> float:
    return check_unit_interval("alpha", alpha, upper_open=True)


def check_k(k: Any) -> int:
    return check_int("k", k, minimum=1)


def check_tail_bucket(tail_bucket: Any) -> bool:
    if not isinstance(tail_bucket, bool):
        raise TypeError(f"tail_bucket must be a bool, got {tail_bucket!r}")
    return tail_bucket


def check_divergence(divergence: Any) -> str:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    return str(divergence)


def make_kernel(
    divergence: str,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    k: int | None = None,
    tail_bucket: bool = False,
) -> Kernel:
    """The kernel of ``divergence`` with those of the parameters it takes (unchecked)."""
    if divergence == "topk_kl" and k is None:
        raise ValueError("divergence='topk_kl' needs k (the number of teacher classes kept)")
    given = {"beta": beta, "alpha": alpha, "k": k, "tail_bucket": tail_bucket}
    kind = DIVERGENCES[check_divergence(divergence)]
    return kind.kernel(**{name: given[name] for name in kind.parameters})


def checked_kernel(divergence: Any, *, beta: Any, alpha: Any, k: Any, tail_bucket: Any) -> Kernel:
    """:func:`make_kernel` after checking every argument, as the functional forms take them."""
    return make_kernel(
        check_divergence(divergence),
        beta=check_beta(beta),
        alpha=check_alpha(alpha),
        k=None if k is None else check_k(k),
        tail_bucket=bool(tail_bucket),
    )
