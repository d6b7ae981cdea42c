"""The reverse KL estimated from the sampled token alone (Schulman's k1, k2 and k3 estimators).

On-policy distillation samples each completion token ``x`` from the student ``p`` and compares
it with the teacher ``q``. With ``r = q(x) / p(x)`` the ratio at the sampled token,

* ``k1 = -log r = log p(x) - log q(x)``
* ``k2 = (log r)^2 / 2``
* ``k3 = (r - 1) - log r``

k1 and k3 have expectation ``KL(p || q)`` over ``x ~ p``, k2 only up to third order in ``log r``
(Schulman, "Approximating KL Divergence", 2020): they need the teacher's log-probability of one
token a position, not its distribution. What their gradients estimate, and their bias, is in
``docs/losses.md``.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from kdcore import ConfigError
from kdcore.validation import IGNORE_INDEX, as_logits, check_ignore_index, check_reduction
from kdcore_builtins.divergences.masks import check_num_items, kept_rows, reduce_rows

ESTIMATORS = ("k1", "k2", "k3")


class SampledReverseKLLoss(nn.Module):
    """Reverse KL ``KL(p || q)`` estimated at each position from its sampled token only.

    Registered as ``sampled_reverse_kl``. ``forward(student_output, teacher_output, labels,
    num_items_in_batch=None)``: ``labels`` are the sampled tokens, one a position (for a causal
    LM the shifted labels of a generated batch: ``kdcore.llm.shift_labels``), ``ignore_index``
    where there is none (prompt, padding). ``estimator`` is ``"k1"`` (``log p(x) - log q(x)``)
    or ``"k3"`` (``r - 1 - log r`` with ``r = q(x) / p(x)``). Reductions and
    ``num_items_in_batch`` as the other logit divergences (:mod:`kdcore_builtins.divergences`),
    but always a mean over the labelled positions for ``"batchmean"``; no ``"mean"`` (there is
    no class dimension to average over). Vocabularies may differ in size; every sampled token
    must lie in both. What each estimates (k1 and k3 the KL, k2 its gradient) holds only for
    tokens sampled from the student at temperature 1 with no top-p cut (see ``docs/losses.md``).
    """

    def __init__(
        self,
        estimator: str = "k3",
        reduction: str = "batchmean",
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            close = difflib.get_close_matches(str(estimator), ESTIMATORS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}{hint}"
            )
        self.estimator = estimator
        self.reduction = check_reduction(reduction, ("batchmean", "sum", "none"))
        self.ignore_index = check_ignore_index(ignore_index)

    def forward(
        self,
        student_output: Any,
        teacher_output: Any,
        labels: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        what = type(self).__name__
        student, teacher = (
            as_logits(student_output, "student"),
            as_logits(teacher_output, "teacher"),
        )
        if labels is None:
            raise ValueError(
                f"{what} needs labels=: the sampled token of each position ({self.ignore_index} "
                "where there is none)"
            )
        positions = tuple(student.shape[:-1])
        if tuple(teacher.shape[:-1]) != positions:
            raise ValueError(
                f"{what}: student logits {tuple(student.shape)} and teacher logits "
                f"{tuple(teacher.shape)} differ in their positions"
            )
        num_items = check_num_items(num_items_in_batch, self.reduction, what)
        rows = kept_rows(labels, positions, self.ignore_index, student.device, what)
        tokens = labels.reshape(-1).to(student.device)
        student, teacher = (
            student.reshape(-1, student.shape[-1]),
            teacher.reshape(-1, teacher.shape[-1]),
        )
        if rows is not None:
            student, teacher, tokens = student[rows], teacher[rows], tokens[rows]
        vocab = min(student.shape[-1], teacher.shape[-1])
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(
                f"{what}: sampled tokens must lie in [0, {vocab}) (the vocabulary both sides "
                f"share) or be {self.ignore_index}; got {int(tokens.min())}..{int(tokens.max())}"
            )
        log_ratio = _token_log_prob(teacher.detach(), tokens) - _token_log_prob(student, tokens)
        if self.estimator == "k1":
            per_row = -log_ratio
        elif self.estimator == "k2":
            per_row = 0.5 * log_ratio.square()
        else:
            per_row = torch.expm1(log_ratio) - log_ratio
        return reduce_rows(
            per_row,
            reduction=self.reduction,
            rows=rows,
            labelled=True,
            positions_shape=positions,
            first_dim=positions[0] if positions else 1,
            classes=student.shape[-1],
            num_items=num_items,
            scale=1.0,
        )

    def extra_repr(self) -> str:
        return f"estimator={self.estimator!r}, reduction={self.reduction!r}"


def _token_log_prob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]`` of each row, in float32 at least."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    chosen = logits.gather(-1, tokens[:, None]).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)
