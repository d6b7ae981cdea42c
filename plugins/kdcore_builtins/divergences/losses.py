"""The loss classes of the chunked logit divergences, one per entry of :data:`DIVERGENCES`."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from kdcore.plugin import SparseTeacherOutput
from kdcore.validation import IGNORE_INDEX, as_logits
from kdcore_builtins.divergences.chunked import chunked_divergence
from kdcore_builtins.divergences.kernels import (
    DIVERGENCES,
    Kernel,
    check_alpha,
    check_beta,
    check_k,
    check_tail_bucket,
    make_kernel,
)
from kdcore_builtins.divergences.masks import (
    DEFAULT_MAX_VOCAB_PADDING,
    VOCAB_HINT,
    SharedArguments,
)


class LogitDivergenceLoss(nn.Module, SharedArguments):
    """Base of the chunked logit divergences (not registered itself).

    Subclasses name their ``divergence`` (a key of :data:`DIVERGENCES`) and keep its parameters
    as attributes of the same names; this class builds the kernel and holds what they share:
    ``temperature``, ``reduction``, ``ignore_index``, ``vocab_alignment`` and
    ``max_vocab_padding`` (see :mod:`kdcore_builtins.divergences`), and
    ``forward(student_output, teacher_output, labels=None, num_items_in_batch=None)``. Outputs
    may be logits tensors, objects with ``.logits`` or tuples whose first item is the logits.
    """

    divergence: ClassVar[str]
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
        self.set_shared_arguments(
            temperature, reduction, ignore_index, vocab_alignment, max_vocab_padding
        )

    def kernel(self) -> Kernel:
        parameters = DIVERGENCES[self.divergence].parameters
        return make_kernel(self.divergence, **{name: getattr(self, name) for name in parameters})

    def forward(
        self,
        student_output: Any,
        teacher_output: Any,
        labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        student, teacher = student_output, teacher_output
        if isinstance(teacher, SparseTeacherOutput):  # a cached teacher (kd.cache_teacher)
            from kdcore_builtins.divergences.sparse import sparse_divergence

            return sparse_divergence(
                self, as_logits(student, "student"), teacher, labels, num_items_in_batch
            )
        if type(student) is not torch.Tensor or type(teacher) is not torch.Tensor:
            student, teacher = as_logits(student, "student"), as_logits(teacher, "teacher")
        return chunked_divergence(
            self.kernel(),
            student,
            teacher,
            self,
            what=type(self).__name__,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            vocab_hint=self._vocab_hint,
        )

    def extra_repr(self) -> str:
        parts = [
            f"{name}={getattr(self, name)}" for name in DIVERGENCES[self.divergence].parameters
        ]
        parts += [f"temperature={self.temperature}", f"reduction={self.reduction!r}"]
        if self.vocab_alignment != "error":
            parts.append(f"vocab_alignment={self.vocab_alignment!r}")
        return ", ".join(parts)


class ForwardKLLoss(LogitDivergenceLoss):
    """Forward KL, ``KL(q || p) * T**2`` (Hinton et al., 2015, arXiv 1503.02531): mode-covering.

    Registered as ``forward_kl``. :class:`kdcore_builtins.criteria.LogitsDistillationLoss`
    (``logits``) is the same divergence with the reference API's constructor
    (``temperature``, ``reduction="mean"``).
    """

    divergence = "forward_kl"


class ReverseKLLoss(LogitDivergenceLoss):
    """Reverse KL, ``KL(p || q) * T**2``: mode-seeking, as in MiniLLM (Gu et al., 2024,
    arXiv 2306.08543) and TRL's ``generalized_jsd_loss`` with ``beta=1``.

    Refuses ``vocab_alignment="mask"`` with a larger student vocabulary (infinite where the
    teacher has no mass): use ``"truncate"``.
    """

    divergence = "reverse_kl"


class GeneralizedJSDLoss(LogitDivergenceLoss):
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024, arXiv 2306.13649).

    As TRL's ``GKDTrainer.generalized_jsd_loss`` defines it: with ``m = beta q + (1 - beta) p``,
    ``JSD_beta = beta KL(q || m) + (1 - beta) KL(p || m)``, and the endpoints taken as TRL takes
    them: ``beta = 0`` is the forward KL ``KL(q || p)``, ``beta = 1`` the reverse KL
    ``KL(p || q)`` (the mixture formula itself vanishes at both ends). Unlike TRL, the result is
    multiplied by ``T**2`` like every loss here (at ``T = 1`` the values agree). ``"batchmean"``
    follows the rule of :mod:`kdcore_builtins.divergences`, which is TRL's: without ``labels``
    the sum is divided by the first dimension (the batch for ``[B, S, V]`` logits, not B x S),
    with them by the number of labelled positions (pass ``labels`` for a per-token mean).
    """

    divergence = "jsd"

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
        self.beta = check_beta(beta)


class _SkewLoss(LogitDivergenceLoss):
    """The skew divergences' constructor: the mixing weight ``alpha``, in [0, 1), first."""

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
        self.alpha = check_alpha(alpha)


class SkewKLLoss(_SkewLoss):
    """Skew KL of DistiLLM (Ko et al., 2024, arXiv 2402.03898): ``KL(q || alpha q + (1 - alpha) p)
    * T**2``, ``alpha`` in [0, 1); ``alpha = 0`` is the forward KL. Mixing some of the teacher into
    the student's side keeps the divergence and its gradient bounded (by ``-log alpha``).
    """

    divergence = "skew_kl"


class SkewReverseKLLoss(_SkewLoss):
    """Skew reverse KL of DistiLLM (Ko et al., 2024, arXiv 2402.03898): ``KL(p || alpha p +
    (1 - alpha) q) * T**2``, ``alpha`` in [0, 1); ``alpha = 0`` is the reverse KL.
    """

    divergence = "skew_reverse_kl"


class TVDLoss(LogitDivergenceLoss):
    """Total variation distance ``0.5 * sum |p - q| * T**2``, as DistillKit's ``tvd`` loss and
    Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation" (ACL 2023,
    arXiv 2307.15190) use it. Bounded in [0, T**2] per position.
    """

    divergence = "tvd"


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

    divergence = "topk_kl"

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
        self.k = check_k(k)
        self.tail_bucket = check_tail_bucket(tail_bucket)


#: The registered loss classes, by the divergence each computes.
LOSSES: dict[str, type[LogitDivergenceLoss]] = {
    loss.divergence: loss
    for loss in (
        ForwardKLLoss,
        ReverseKLLoss,
        GeneralizedJSDLoss,
        SkewKLLoss,
        SkewReverseKLLoss,
        TVDLoss,
        TopKKLLoss,
    )
}
