"""Feature, relational and decoupled-logit criteria from the KD literature.

``fitnet``, ``hidden_cosine``, ``at``, ``pkt``, ``rkd``, ``sp``, ``dkd`` and ``dist``. Each class
cites its paper and says where it follows the authors' released code rather than the text.

Conventions shared by the feature criteria:

* A 4-D output is a channels-first feature map ``[N, C, H, W]``: its features are dim 1. Any
  other rank keeps its features in the last dim (``[..., C]``, e.g. hidden states ``[B, T, H]``).
  The learnable projections follow the same rule: a 1x1 convolution on a 4-D map, a linear map
  otherwise, with the same weights (a 1x1 conv is a linear map over channels).
* Relational criteria (``pkt``, ``rkd``, ``sp``) compare relations between the samples of a
  batch: each output is flattened to ``[N, -1]`` along its first (batch) dim, so student and
  teacher may differ in width but must agree in batch size.
* A model output may be a tensor or a tuple/list whose first item is one (e.g. a decoder layer's
  ``(hidden_states, ...)``). The teacher's output is always detached.
* ``has_learnable_parameters`` declares whether an instance may hold learnable parameters (for
  ``fitnet`` and ``hidden_cosine``: a projection, present only when the two widths differ).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kdcore
from kdcore.plugin import Registry
from kdcore.validation import (
    IGNORE_INDEX,
    as_logits,
    check_ignore_index,
    check_labels,
    check_non_negative,
    check_number,
    check_positive,
    check_positive_int,
    check_reduction,
    check_temperature,
)

FEATURE_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------- helpers
def _as_tensor(output: Any, side: str, owner: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"{owner}: expected the {side} output to be a tensor (or a tuple whose first item is "
        f"one), got {type(output).__name__}"
    )


def _shapes(student: torch.Tensor, teacher: torch.Tensor) -> str:
    return f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"


def feature_dim(features: torch.Tensor) -> int:
    """The features' dim: 1 for a 4-D ``[N, C, H, W]`` map, the last dim otherwise."""
    return 1 if features.dim() == 4 else features.dim() - 1


def _flat_batch(
    student: torch.Tensor, teacher: torch.Tensor, owner: str, minimum: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both outputs as ``[N, -1]``; they must share the batch size ``N >= minimum``."""
    if student.dim() == 0 or teacher.dim() == 0 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{owner}: student and teacher outputs must share their first (batch) dim; got "
            f"{_shapes(student, teacher)}"
        )
    if student.shape[0] < minimum:
        raise ValueError(
            f"{owner} relates the samples of a batch and needs at least {minimum}; got "
            f"{_shapes(student, teacher)}"
        )
    return student.reshape(student.shape[0], -1), teacher.reshape(teacher.shape[0], -1)


class FeatureProjection(nn.Linear):
    """A learnable map from ``in_features`` to ``out_features`` over the features' dim.

    A linear layer on ``[..., C]`` inputs; the same weights act as a 1x1 convolution on 4-D
    ``[N, C, H, W]`` maps. Initialised as ``nn.Linear`` is.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 4:
            return F.conv2d(features, self.weight[:, :, None, None], self.bias)
        return super().forward(features)


def _projection(student_width: int, teacher_width: int) -> nn.Module:
    if student_width == teacher_width:
        return nn.Identity()
    return FeatureProjection(student_width, teacher_width)


def _project(
    projection: nn.Module,
    student_width: int,
    student: torch.Tensor,
    teacher: torch.Tensor,
    owner: str,
) -> torch.Tensor:
    """``student`` projected to the teacher's width; both shapes named on any mismatch."""
    if student.dim() == 0 or student.shape[feature_dim(student)] != student_width:
        raise ValueError(
            f"{owner} was built for student_width={student_width} features (dim "
            f"{feature_dim(student) if student.dim() else 0}), got {_shapes(student, teacher)}"
        )
    projected: torch.Tensor = projection(student)
    if projected.shape != teacher.shape:
        raise ValueError(
            f"{owner}: the projected student features {tuple(projected.shape)} do not match the "
            f"teacher's; got {_shapes(student, teacher)}"
        )
    return projected


# ---------------------------------------------------------------------------------- FitNet
class FitNetLoss(nn.Module):
    """FitNets hint loss (Romero et al., 2015, arXiv 1412.6550).

    ``MSE(r(student), teacher)`` where the regressor ``r`` is a learnable projection from
    ``student_width`` to ``teacher_width`` features: a 1x1 convolution for 4-D ``[N, C, H, W]``
    maps, a linear map for ``[..., C]`` features (the same weights; see
    :class:`FeatureProjection`), and the identity when the widths are equal. The paper's
    ``1/2 ||.||^2`` is left to the balancer's weight. ``reduction``: ``"mean"`` over every
    element, ``"sum"``, or ``"none"`` (elementwise, in the teacher's shape).
    """

    has_learnable_parameters = True

    def __init__(self, student_width: int, teacher_width: int, reduction: str = "mean") -> None:
        super().__init__()
        self.student_width = check_positive_int("student_width", student_width)
        self.teacher_width = check_positive_int("teacher_width", teacher_width)
        self.reduction = check_reduction(reduction, FEATURE_REDUCTIONS)
        self.projection = _projection(student_width, teacher_width)

    def forward(self, student_output: Any, teacher_output: Any) -> torch.Tensor:
        owner = type(self).__name__
        student = _as_tensor(student_output, "student", owner)
        teacher = _as_tensor(teacher_output, "teacher", owner).detach()
        projected = _project(self.projection, self.student_width, student, teacher, owner)
        return F.mse_loss(projected, teacher, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (
            f"student_width={self.student_width}, teacher_width={self.teacher_width}, "
            f"reduction={self.reduction!r}"
        )


# ---------------------------------------------------------------------------------- cosine
class HiddenStateCosineLoss(nn.Module):
    """Hidden-state cosine loss: ``1 - cos(student, teacher)`` along the features' dim.

    As used for hidden states in DistilBERT (Sanh et al., 2019, arXiv 1910.01108) and in
    Megatron/ModelOpt and DistillKit. With ``student_width`` and ``teacher_width`` (both or
    neither) the student is first projected by a learnable :class:`FeatureProjection` (identity
    when equal). One loss per position (every index but the features' dim); ``attention_mask``
    (passed to ``compute_kd_loss``), broadcastable to the positions' shape, drops the positions
    where it is 0. ``reduction``: ``"mean"`` over the kept positions, ``"sum"``, or ``"none"``
    (per position, 0 where masked). Vectors are normalised as ``F.normalize`` does (norms below
    ``1e-12`` are clamped), so a zero vector has cosine 0.
    """

    has_learnable_parameters = True

    def __init__(
        self,
        student_width: int | None = None,
        teacher_width: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if (student_width is None) != (teacher_width is None):
            raise ValueError(
                "give both student_width and teacher_width (for a projection) or neither; got "
                f"student_width={student_width!r}, teacher_width={teacher_width!r}"
            )
        self.student_width = student_width
        self.teacher_width = teacher_width
        self.projection: nn.Module | None = None
        if student_width is not None and teacher_width is not None:
            check_positive_int("student_width", student_width)
            check_positive_int("teacher_width", teacher_width)
            self.projection = _projection(student_width, teacher_width)
        self.reduction = check_reduction(reduction, FEATURE_REDUCTIONS)

    def forward(
        self,
        student_output: Any,
        teacher_output: Any,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        owner = type(self).__name__
        student = _as_tensor(student_output, "student", owner)
        teacher = _as_tensor(teacher_output, "teacher", owner).detach()
        if self.projection is not None and self.student_width is not None:
            student = _project(self.projection, self.student_width, student, teacher, owner)
        elif student.shape != teacher.shape:
            raise ValueError(
                f"{owner}: student and teacher features differ in shape "
                f"({_shapes(student, teacher)}); give student_width and teacher_width for a "
                "learnable projection"
            )
        if student.dim() == 0:
            raise ValueError(f"{owner} needs features with a features dim, got scalars")
        dim = feature_dim(student)
        cosine = (F.normalize(student, dim=dim) * F.normalize(teacher, dim=dim)).sum(dim)
        per_position = 1 - cosine
        if attention_mask is None:
            if self.reduction == "none":
                return per_position
            return per_position.sum() if self.reduction == "sum" else per_position.mean()
        keep = self._mask(attention_mask, per_position.shape, owner)
        per_position = per_position * keep.to(per_position.dtype)
        if self.reduction == "none":
            return per_position
        if self.reduction == "sum":
            return per_position.sum()
        return per_position.sum() / keep.sum().clamp_min(1)

    @staticmethod
    def _mask(mask: Any, positions: torch.Size, owner: str) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{owner}: attention_mask must be a tensor, got {type(mask).__name__}")
        try:
            return torch.broadcast_to(mask != 0, positions)
        except RuntimeError:
            raise ValueError(
                f"{owner}: attention_mask {tuple(mask.shape)} does not fit the positions "
                f"{tuple(positions)} (the features without their features dim)"
            ) from None

    def extra_repr(self) -> str:
        return (
            f"student_width={self.student_width}, teacher_width={self.teacher_width}, "
            f"reduction={self.reduction!r}"
        )


# ---------------------------------------------------------------------------------- AT
class AttentionTransferLoss(nn.Module):
    """Activation-based attention transfer, AT (Zagoruyko & Komodakis, 2017, arXiv 1612.03928).

    Each feature map ``A`` (``[N, C, ...]``: channels in dim 1, spatial dims after) gives the
    spatial attention map ``Q = sum_c |A_c|**p``, flattened and L2-normalised per sample. The
    loss is the squared L2 distance between the student's and the teacher's normalised maps,
    averaged over samples and positions: ``mean((Q_s/|Q_s| - Q_t/|Q_t|)**2)``, as the authors'
    released code computes it (the paper writes ``beta/2 * ||Q_s/|Q_s| - Q_t/|Q_t|||_2``; its
    ``beta`` is the balancer's weight). ``p >= 1`` (the paper uses 1, 2 and 4; below 1 the
    gradient at zero activations is infinite). Channel counts may differ; batch and spatial sizes
    must match.
    """

    has_learnable_parameters = False

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = check_number("p", p)
        if not 1 <= self.p < math.inf:  # |A|**p with p < 1 has no gradient where A is 0
            raise ValueError(f"p must be finite and >= 1, got {p!r}")

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        """The normalised attention maps ``[N, positions]`` of ``[N, C, ...]`` features."""
        maps = features.abs().pow(self.p).sum(1).reshape(features.shape[0], -1)
        return F.normalize(maps, dim=1)

    def forward(self, student_output: Any, teacher_output: Any) -> torch.Tensor:
        owner = type(self).__name__
        student = _as_tensor(student_output, "student", owner)
        teacher = _as_tensor(teacher_output, "teacher", owner).detach()
        if (
            student.dim() < 3
            or student.dim() != teacher.dim()
            or student.shape[0] != teacher.shape[0]
            or student.shape[2:] != teacher.shape[2:]
        ):
            raise ValueError(
                f"{owner} expects [N, C, H, W] (or [N, C, ...]) feature maps with the same batch "
                f"and spatial sizes; got {_shapes(student, teacher)}"
            )
        return (self.attention(student) - self.attention(teacher)).pow(2).mean()

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ---------------------------------------------------------------------------------- PKT
class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer, PKT (Passalis & Tefas, 2018, arXiv 1803.10837).

    Cosine similarities between the samples of a batch become conditional probabilities with the
    kernel ``K(a, b) = (cos(a, b) + 1) / 2``: ``p_{j|i} = K(t_i, t_j) / sum_{k != i} K(t_i, t_k)``
    for the teacher, ``q_{j|i}`` likewise for the student (self-pairs excluded, as the paper
    defines them). The loss is ``KL(P || Q)`` per anchor ``i``, averaged over anchors:
    ``mean_i sum_{j != i} p_{j|i} log((p_{j|i} + eps) / (q_{j|i} + eps))`` with
    ``eps = 1e-7`` as in the authors' code (which keeps self-pairs and averages over all ``N**2``
    entries instead). Outputs are flattened to ``[N, -1]``; widths may differ. With 2 samples
    every ``p_{j|i}`` is 1 and the loss is 0: use batches of 3 or more.
    """

    has_learnable_parameters = False
    eps = 1e-7

    def conditional(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, N]`` conditional probabilities ``p_{j|i}`` (row ``i``), 0 on the diagonal."""
        normalised = F.normalize(features, dim=1)
        kernel = (normalised @ normalised.T + 1) / 2
        off_diagonal = ~torch.eye(features.shape[0], dtype=torch.bool, device=features.device)
        kernel = kernel * off_diagonal.to(kernel.dtype)
        return kernel / kernel.sum(1, keepdim=True).clamp_min(self.eps)

    def forward(self, student_output: Any, teacher_output: Any) -> torch.Tensor:
        owner = type(self).__name__
        student, teacher = _flat_batch(
            _as_tensor(student_output, "student", owner),
            _as_tensor(teacher_output, "teacher", owner).detach(),
            owner,
            minimum=2,
        )
        p, q = self.conditional(teacher), self.conditional(student)
        # The diagonal holds p = q = 0: its terms are 0 * log(eps / eps) = 0.
        return (p * torch.log((p + self.eps) / (q + self.eps))).sum(1).mean()


# ---------------------------------------------------------------------------------- RKD
class RKDLoss(nn.Module):
    """Relational knowledge distillation, RKD-D and RKD-A (Park et al., 2019, arXiv 1904.05068).

    ``distance_weight * L_D + angle_weight * L_A`` over the batch's samples (outputs flattened to
    ``[N, -1]``; widths may differ). ``L_D``: the Huber loss (delta 1, i.e. ``smooth_l1``)
    between the pairwise distance matrices, each divided by its mean distance over pairs
    ``i != j``, averaged over all ``N**2`` entries (the diagonal is 0 in both). ``L_A``: the Huber
    loss between the cosines ``<e_ji, e_ki>`` of the angles at every vertex ``i``, where
    ``e_ji = (x_j - x_i) / |x_j - x_i|``, averaged over all ``N**3`` triples (degenerate ones,
    with a zero edge, are 0 in both). This is the authors' released code. The paper's weights are
    the defaults: 25 (distance) and 50 (angle); either may be 0, not both.
    """

    has_learnable_parameters = False
    eps = 1e-12

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = check_non_negative("distance_weight", distance_weight)
        self.angle_weight = check_non_negative("angle_weight", angle_weight)
        if self.distance_weight == 0 and self.angle_weight == 0:
            raise ValueError(
                f"distance_weight={distance_weight!r} and angle_weight={angle_weight!r} are both "
                "0; at least one must be > 0"
            )

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, N]`` Euclidean distances divided by their mean over pairs ``i != j``."""
        squared_norms = features.pow(2).sum(1)
        squared = squared_norms[:, None] + squared_norms[None, :] - 2 * features @ features.T
        off_diagonal = ~torch.eye(features.shape[0], dtype=torch.bool, device=features.device)
        # sqrt has no gradient at 0: the diagonal is set to eps before and zeroed after.
        squared = squared.clamp_min(self.eps).masked_fill(~off_diagonal, self.eps)
        distances = squared.sqrt() * off_diagonal.to(squared.dtype)
        mean = distances[off_diagonal].mean()
        return distances / mean.clamp_min(self.eps)

    @staticmethod
    def angles(features: torch.Tensor) -> torch.Tensor:
        """``[N, N, N]`` cosines: ``[i, j, k] = <e_ji, e_ki>``."""
        edges = F.normalize(features[None, :, :] - features[:, None, :], dim=2)
        return edges @ edges.transpose(1, 2)

    def forward(self, student_output: Any, teacher_output: Any) -> torch.Tensor:
        owner = type(self).__name__
        student, teacher = _flat_batch(
            _as_tensor(student_output, "student", owner),
            _as_tensor(teacher_output, "teacher", owner).detach(),
            owner,
            minimum=2,
        )
        loss = student.new_zeros(())
        if self.distance_weight:
            distance = F.smooth_l1_loss(self.distances(student), self.distances(teacher))
            loss = loss + self.distance_weight * distance
        if self.angle_weight:
            angle = F.smooth_l1_loss(self.angles(student), self.angles(teacher))
            loss = loss + self.angle_weight * angle
        return loss

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"


# ---------------------------------------------------------------------------------- SP
class SimilarityPreservingLoss(nn.Module):
    """Similarity-preserving KD, SP (Tung & Mori, 2019, arXiv 1907.09682).

    With ``Q`` the batch's outputs flattened to ``[b, -1]``, ``G = Q Q^T`` is the ``[b, b]``
    similarity matrix and ``G~`` its rows L2-normalised. The loss is the paper's
    ``||G~_t - G~_s||_F**2 / b**2`` (its ``gamma`` is the balancer's weight). It is invariant
    to scaling either output and to orthogonal transformations of its feature space; widths may
    differ.
    """

    has_learnable_parameters = False

    @staticmethod
    def similarity(features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features @ features.T, dim=1)

    def forward(self, student_output: Any, teacher_output: Any) -> torch.Tensor:
        owner = type(self).__name__
        student, teacher = _flat_batch(
            _as_tensor(student_output, "student", owner),
            _as_tensor(teacher_output, "teacher", owner).detach(),
            owner,
            minimum=1,
        )
        batch = student.shape[0]
        return (self.similarity(teacher) - self.similarity(student)).pow(2).sum() / batch**2


# ---------------------------------------------------------------------------------- DKD
class DKDLoss(nn.Module):
    """Decoupled knowledge distillation, DKD (Zhao et al., 2022, arXiv 2203.08679).

    ``alpha * TCKD + beta * NCKD``, times ``temperature**2``, averaged over the positions whose
    label is not ``ignore_index``. With ``p = softmax(z / T)``: TCKD is the KL divergence between
    the teacher's and the student's binary distributions ``[p_label, 1 - p_label]``; NCKD the KL
    divergence between their distributions over the non-target classes, renormalised (the
    target class removed). ``forward(student, teacher, labels)``; logits ``[..., C]`` are
    flattened to ``[N, C]`` and labels to ``[N]``. Defaults are the paper's CIFAR-100 setting
    (``alpha=1, beta=8, T=4``; ImageNet uses ``beta=0.5, T=1``). The paper also warms the loss
    up linearly over the first 20 epochs; that is not done here: ramp its weight with the
    ``scheduled`` balancer instead.
    """

    has_learnable_parameters = False

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.alpha = check_non_negative("alpha", alpha)
        self.beta = check_non_negative("beta", beta)
        self.temperature = check_temperature(temperature)
        self.ignore_index = check_ignore_index(ignore_index)

    def forward(
        self, student_output: Any, teacher_output: Any, labels: torch.Tensor
    ) -> torch.Tensor:
        owner = type(self).__name__
        student = as_logits(student_output, "student")
        teacher = as_logits(teacher_output, "teacher").detach()
        if student.shape != teacher.shape or student.dim() == 0:
            raise ValueError(
                f"{owner}: student and teacher logits differ in shape ({_shapes(student, teacher)})"
            )
        check_labels(labels, owner)
        classes, logits_shape = student.shape[-1], tuple(student.shape)
        if classes < 2:
            raise ValueError(f"{owner} needs at least 2 classes, got logits {logits_shape}")
        student, teacher = student.reshape(-1, classes), teacher.reshape(-1, classes)
        flat_labels = labels.reshape(-1)
        if flat_labels.shape[0] != student.shape[0]:
            raise ValueError(
                f"{owner}: {flat_labels.shape[0]} labels {tuple(labels.shape)} for "
                f"{student.shape[0]} positions (logits {logits_shape})"
            )
        valid = flat_labels != self.ignore_index
        student, teacher, flat_labels = student[valid], teacher[valid], flat_labels[valid]
        if flat_labels.numel() and (flat_labels.min() < 0 or flat_labels.max() >= classes):
            raise ValueError(
                f"{owner}: labels must lie in [0, {classes}) or be {self.ignore_index}"
            )
        target = F.one_hot(flat_labels, classes).bool()
        t_scaled, s_scaled = teacher / self.temperature, student / self.temperature
        tckd = _binary_kl(t_scaled, s_scaled, target)
        rows, others = t_scaled.shape[0], classes - 1
        nckd = _kl(t_scaled[~target].reshape(rows, others), s_scaled[~target].reshape(rows, others))
        per_position = self.alpha * tckd + self.beta * nckd
        return per_position.sum() / max(rows, 1) * self.temperature**2

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(teacher) || softmax(student))``."""
    log_p = F.log_softmax(teacher_logits, dim=-1)
    log_q = F.log_softmax(student_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _binary_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Per-row KL between ``[p_target, 1 - p_target]`` of the teacher and of the student."""

    def log_binary(logits: torch.Tensor) -> torch.Tensor:
        # log p_target and log(1 - p_target), each a log-sum-exp difference: no 1 - p rounding.
        total = logits.logsumexp(-1)
        on = logits.masked_fill(~target, -math.inf).logsumexp(-1)
        off = logits.masked_fill(target, -math.inf).logsumexp(-1)
        return torch.stack([on, off], -1) - total[:, None]

    log_p, log_q = log_binary(teacher_logits), log_binary(student_logits)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# ---------------------------------------------------------------------------------- DIST
class DISTLoss(nn.Module):
    """DIST: distillation from a stronger teacher (Huang et al., 2022, arXiv 2205.10536).

    With ``Y = softmax(z / tau)`` row-wise over logits flattened to ``[N, C]``:
    inter-class relation ``1 - mean_i rho(Y_s[i, :], Y_t[i, :])`` (each sample's class
    distribution), intra-class relation ``1 - mean_j rho(Y_s[:, j], Y_t[:, j])`` (each class
    over the batch), where ``rho`` is the Pearson correlation (computed as the authors' code
    does: cosine of the centred vectors with ``1e-8`` added to the norms' product). The loss is
    ``tau**2 * (beta * inter + gamma * intra)``. Defaults ``beta = gamma = tau = 1`` are the
    paper's ImageNet setting. The intra-class relation needs a batch of 2 or more.
    """

    has_learnable_parameters = False
    eps = 1e-8

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        self.beta = check_non_negative("beta", beta)
        self.gamma = check_non_negative("gamma", gamma)
        self.tau = check_positive("tau", tau)

    def pearson(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Row-wise Pearson correlation of two ``[N, C]`` tensors."""
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + self.eps)

    def forward(self, student_output: Any, teacher_output: Any) -> torch.Tensor:
        owner = type(self).__name__
        student = as_logits(student_output, "student")
        teacher = as_logits(teacher_output, "teacher").detach()
        if student.shape != teacher.shape or student.dim() == 0:
            raise ValueError(
                f"{owner}: student and teacher logits differ in shape ({_shapes(student, teacher)})"
            )
        classes = student.shape[-1]
        y_s = F.softmax(student.reshape(-1, classes) / self.tau, dim=1)
        y_t = F.softmax(teacher.reshape(-1, classes) / self.tau, dim=1)
        if self.gamma and y_s.shape[0] < 2:
            raise ValueError(
                f"{owner}: the intra-class relation (gamma={self.gamma}) needs at least 2 "
                f"positions; got {_shapes(student, teacher)}"
            )
        inter = 1 - self.pearson(y_s, y_t).mean()
        intra = 1 - self.pearson(y_s.T, y_t.T).mean()
        return self.tau**2 * (self.beta * inter + self.gamma * intra)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}"


@kdcore.hookimpl
def kdcore_register_criteria(registry: Registry[Any]) -> None:
    registry.add("fitnet", FitNetLoss)
    registry.add("hidden_cosine", HiddenStateCosineLoss)
    registry.add("at", AttentionTransferLoss)
    registry.add("pkt", PKTLoss)
    registry.add("rkd", RKDLoss)
    registry.add("sp", SimilarityPreservingLoss)
    registry.add("dkd", DKDLoss)
    registry.add("dist", DISTLoss)
