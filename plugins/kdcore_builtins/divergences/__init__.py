"""Logit divergences for distillation, computed in row chunks so that large vocabularies fit.

Every divergence here compares the teacher's distribution ``q = softmax(t / T)`` with the
student's ``p = softmax(s / T)`` position by position (a position is one row of the logits: one
token of a language model, one sample of a classifier) and multiplies by ``T**2`` (Hinton et al.,
2015), so that gradient magnitudes do not shrink as the temperature grows.

The package holds one concept a module: ``kernels`` (:data:`DIVERGENCES`, the one table of the
divergences, and their kernels), ``masks`` (labels, reductions, ``num_items_in_batch``,
vocabulary alignment), ``chunked`` (the custom autograd function over chunks of rows, and
:func:`logit_divergence`), ``losses`` (one loss class a divergence) and ``fused`` (the fused
lm-head losses, :func:`fused_linear_divergence` and :func:`fused_linear_cross_entropy`) and
``sampled`` (the reverse KL estimated from sampled tokens, for on-policy distillation).

Memory. The losses walk the rows in chunks of about two million logits and keep no ``[N, V]``
temporary but the gradient (see ``chunked``); half-precision logits are upcast to float32 one
chunk at a time (float64 logits are computed in float64), and the loss comes back in that
compute dtype.

Masks, reductions and normalisation (the same for every divergence here, and for
``LogitsDistillationLoss`` in :mod:`kdcore_builtins.criteria`). Logits have any leading shape
``[..., V]``; ``P`` is the number of positions. With ``labels=`` (one integer per position),
positions whose label is ``ignore_index`` are left out as if absent (no loss, zero gradient,
never read); ``K`` is the number of positions kept (``K = P`` without labels). Then:

* ``"sum"``: the sum over the kept positions;
* ``"mean"``: that sum over ``K * V`` (PyTorch's elementwise mean, classes included);
* ``"batchmean"``: that sum over ``num_items_in_batch`` when given, else over ``K`` when labels
  are given (the mean per kept token), else over ``logits.shape[0]`` (what ``F.kl_div`` does: for
  ``[B, S, V]`` logits without labels that is a mean per *sequence*);
* ``"none"``: one loss per position, in the leading shape, 0 where ignored.

With no position kept the loss is 0 (denominators are at least 1). ``num_items_in_batch`` (only
with ``"batchmean"``) is the number of kept positions over the *whole* optimiser step, all
gradient-accumulation micro-batches and all data-parallel ranks together; see
:mod:`kdcore.llm` for why and how to count it.

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

from typing import Any

import kdcore
from kdcore.plugin import Registry
from kdcore_builtins.divergences.chunked import logit_divergence
from kdcore_builtins.divergences.fused import (
    FusedLogitsLoss,
    fused_linear_cross_entropy,
    fused_linear_divergence,
)
from kdcore_builtins.divergences.kernels import DIVERGENCES, make_kernel
from kdcore_builtins.divergences.losses import (
    LOSSES,
    ForwardKLLoss,
    GeneralizedJSDLoss,
    LogitDivergenceLoss,
    ReverseKLLoss,
    SkewKLLoss,
    SkewReverseKLLoss,
    TopKKLLoss,
    TVDLoss,
)
from kdcore_builtins.divergences.masks import (
    DEFAULT_MAX_VOCAB_PADDING,
    VOCAB_ALIGNMENTS,
    align_vocabularies,
)
from kdcore_builtins.divergences.sampled import SampledReverseKLLoss

__all__ = [
    "DEFAULT_MAX_VOCAB_PADDING",
    "DIVERGENCES",
    "VOCAB_ALIGNMENTS",
    "ForwardKLLoss",
    "FusedLogitsLoss",
    "GeneralizedJSDLoss",
    "LogitDivergenceLoss",
    "ReverseKLLoss",
    "SampledReverseKLLoss",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "TVDLoss",
    "TopKKLLoss",
    "align_vocabularies",
    "fused_linear_cross_entropy",
    "fused_linear_divergence",
    "logit_divergence",
    "make_kernel",
]


@kdcore.hookimpl
def kdcore_register_criteria(registry: Registry[Any]) -> None:
    for name, loss in LOSSES.items():
        registry.add(name, loss)
    registry.add("fused_logits", FusedLogitsLoss)
    registry.add("sampled_reverse_kl", SampledReverseKLLoss)
