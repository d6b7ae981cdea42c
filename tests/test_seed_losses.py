"""The seed's own losses give the reference's numbers (REFERENCE.md, "Losses"), and two new-user
rough edges: how to install the transformers plugin from this repository, and how long the
README's test command takes.

``kd.MFTLoss`` and ``kd.MGDLoss`` keep the reference's names, so code ported from it must get the
same values: each is compared with an independent float64 computation of the reference's formula.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdcore as kd

REPO = Path(__file__).resolve().parent.parent
EXACT = {"atol": 1e-12, "rtol": 1e-12}


# ====================================================================== MFTLoss
def reference_mft_target(logits: list[float], label: int, threshold: float) -> list[float]:
    """One row of the reference's corrected teacher, in plain Python floats (float64)."""
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    p = [w / sum(weights) for w in weights]
    argmax = p.index(max(p))  # the first maximum, as torch's argmax
    p_label, p_argmax = p[label], p[argmax]
    if argmax != label:
        mix = (p_argmax - p_label + threshold) / (1 + p_argmax - p_label + 1e-7)
    else:
        target = 1.0 if p_label > 1 - threshold else p_label + threshold
        mix = (target - p_argmax) / (1 - p_argmax + 1e-7)
    return [v * (1 - mix) + (mix if i == label else 0.0) for i, v in enumerate(p)]


def reference_mft_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    threshold: float,
) -> torch.Tensor:
    """Per-row ``KL(q || softmax(s / T)) * T**2`` of the reference, differentiable in ``student``."""
    targets = [
        reference_mft_target((row / temperature).tolist(), label, threshold)
        for row, label in zip(teacher.double(), labels.tolist(), strict=True)
    ]
    q = torch.tensor(targets, dtype=torch.float64)
    log_p = torch.log_softmax(student.double() / temperature, dim=-1)
    terms = torch.where(q > 0, q * (q.log() - log_p), torch.zeros_like(q))
    return terms.sum(-1) * temperature**2


def rows_of_every_kind(threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random float64 logits and labels: rows whose teacher argmax is not the label, rows whose
    argmax is the label with ``p_label <= 1 - threshold``, and confident ones past it."""
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(60, 9, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(60, 9, generator=generator, dtype=torch.float64)
    teacher[20:] *= 6  # sharper rows: many with p_argmax > 1 - threshold
    labels = torch.randint(0, 9, (60,), generator=generator)
    labels[20:40] = teacher[20:40].argmax(-1)
    labels[40:] = teacher[40:].argmax(-1)
    teacher[40:50] /= 8  # correct argmax, but flat
    return student, teacher, labels


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_mft_equals_the_reference_formula_on_every_kind_of_row(
    threshold: float, temperature: float
) -> None:
    student, teacher, labels = rows_of_every_kind(threshold)
    p = torch.softmax(teacher / temperature, dim=-1)
    label_leads = p.argmax(-1) == labels
    p_label = p.gather(-1, labels[:, None]).squeeze(-1)
    assert (~label_leads).any() and (label_leads & (p_label <= 1 - threshold)).any()
    if threshold:
        assert (label_leads & (p_label > 1 - threshold)).any()
    loss = kd.MFTLoss(temperature=temperature, threshold=threshold, reduction="none")
    torch.testing.assert_close(
        loss(student, teacher, labels),
        reference_mft_rows(student, teacher, labels, temperature, threshold),
        **EXACT,
    )


def test_mft_raises_a_leading_label_by_threshold_and_makes_a_confident_row_one_hot() -> None:
    """Up to the reference's 1e-7: against a uniform student the loss is sum q log(3 q)."""
    teacher = torch.tensor([[2.0, 1.0, 0.0], [9.0, 0.0, 0.0]], dtype=torch.float64)
    student = torch.zeros(2, 3, dtype=torch.float64)
    loss = kd.MFTLoss(threshold=0.2, reduction="none")(student, teacher, torch.tensor([0, 0]))
    p = torch.softmax(teacher[0], dim=-1)  # p_label = 0.67: raised to 0.87, the rest scaled down
    q = torch.cat([p[:1] + 0.2, p[1:] * (1 - 0.2 / (1 - p[0]))])
    torch.testing.assert_close(loss[0], (q * (3 * q).log()).sum(), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss[1].item(), math.log(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_mft_leaves_out_ignored_rows_and_averages_over_the_kept_ones(reduction: str) -> None:
    student, teacher, labels = rows_of_every_kind(0.2)
    labels = labels.clone()
    labels[::3] = -100
    kept = labels != -100
    rows = reference_mft_rows(student[kept], teacher[kept], labels[kept], 1.0, 0.2)
    expected = {
        "batchmean": rows.sum() / kept.sum(),
        "sum": rows.sum(),
        "mean": rows.sum() / (kept.sum() * 9),
    }[reduction]
    loss = kd.MFTLoss(reduction=reduction)(student, teacher, labels)
    torch.testing.assert_close(loss, expected, **EXACT)


def test_mft_none_gives_per_position_losses_in_the_leading_shape_zero_where_ignored() -> None:
    student, teacher, labels = rows_of_every_kind(0.2)
    labels = labels.clone()
    labels[[0, 21, 45]] = -100
    loss = kd.MFTLoss(reduction="none")(
        student.reshape(3, 20, 9), teacher.reshape(3, 20, 9), labels.reshape(3, 20)
    )
    kept = labels != -100
    expected = torch.zeros(60, dtype=torch.float64)
    expected[kept] = reference_mft_rows(student[kept], teacher[kept], labels[kept], 1.0, 0.2)
    torch.testing.assert_close(loss, expected.reshape(3, 20), **EXACT)


def test_mft_gradient_is_the_reference_formulas_and_reaches_the_student_only() -> None:
    student, teacher, labels = rows_of_every_kind(0.2)
    labels = labels.clone()
    labels[5] = -100
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kd.MFTLoss()(student, teacher, labels).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.equal(student.grad[5], torch.zeros(9).double())
    mine = student.grad.clone()
    student.grad = None
    kept = labels != -100
    plain = student.detach().clone().requires_grad_(True)
    reference_mft_rows(
        plain[kept], teacher.detach()[kept], labels[kept], 1.0, 0.2
    ).mean().backward()
    torch.testing.assert_close(mine, plain.grad, **EXACT)


def test_mft_equals_modelopt_where_it_is_installed() -> None:
    losses = pytest.importorskip("modelopt.torch.distill.losses")
    student, teacher, labels = rows_of_every_kind(0.2)
    # modelopt has taken ``threshold`` in the constructor and, later, in ``forward``.
    if "threshold" in inspect.signature(losses.MFTLoss.forward).parameters:
        theirs = losses.MFTLoss(temperature=2.0)(student, teacher, labels, threshold=0.2)
    else:
        theirs = losses.MFTLoss(temperature=2.0, threshold=0.2)(student, teacher, labels)
    mine = kd.MFTLoss(temperature=2.0, threshold=0.2)(student, teacher, labels)
    torch.testing.assert_close(mine, theirs, **EXACT)


# ====================================================================== MGDLoss
def reference_mgd(
    mgd: torch.nn.Module,
    student: torch.Tensor,
    teacher: torch.Tensor,
    alpha_mgd: float,
    lambda_mgd: float,
) -> torch.Tensor:
    """The reference's computation with ``mgd``'s weights, written with functional convolutions."""
    params = dict(mgd.named_parameters())
    aligned = student
    if "align.weight" in params:
        aligned = F.conv2d(student, params["align.weight"], params["align.bias"])
    n, _, h, w = aligned.shape
    u = torch.rand(n, 1, h, w)
    mask = torch.where(u > 1 - lambda_mgd, 0, 1)
    hidden = F.conv2d(
        aligned * mask, params["generation.0.weight"], params["generation.0.bias"], padding=1
    )
    generated = F.conv2d(
        hidden.relu(), params["generation.2.weight"], params["generation.2.bias"], padding=1
    )
    return alpha_mgd * ((generated - teacher) ** 2).sum() / generated.numel()


@pytest.mark.parametrize(("student_channels", "teacher_channels"), [(4, 6), (5, 5)])
@pytest.mark.parametrize("lambda_mgd", [0.0, 0.65, 1.0])
def test_mgd_equals_the_reference_under_one_seed_loss_and_gradients(
    student_channels: int, teacher_channels: int, lambda_mgd: float
) -> None:
    mgd = kd.MGDLoss(student_channels, teacher_channels, alpha_mgd=2e-5, lambda_mgd=lambda_mgd)
    mgd.double()
    student = torch.randn(3, student_channels, 7, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, teacher_channels, 7, 5, dtype=torch.float64)
    torch.manual_seed(11)
    mine = mgd(student, teacher)
    mine.backward()
    my_grads = [student.grad.clone(), *(p.grad.clone() for p in mgd.parameters())]
    student.grad = None
    mgd.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    theirs = reference_mgd(mgd, student, teacher, 2e-5, lambda_mgd)
    theirs.backward()
    their_grads = [student.grad, *(p.grad for p in mgd.parameters())]
    torch.testing.assert_close(mine, theirs, **EXACT)
    for my_grad, their_grad in zip(my_grads, their_grads, strict=True):
        torch.testing.assert_close(my_grad, their_grad, **EXACT)


def test_mgd_authors_alpha_maps_to_alpha_times_c_h_w() -> None:
    """The MGD authors' code divides the summed error by N: their alpha is ours / (C*H*W)."""
    authors_alpha, (n, c, h, w) = 2e-5, (2, 6, 4, 3)
    mgd = kd.MGDLoss(6, 6, alpha_mgd=authors_alpha * c * h * w, lambda_mgd=0.0).double()
    student, teacher = torch.randn(n, c, h, w).double(), torch.randn(n, c, h, w).double()
    authors = authors_alpha * ((mgd.generation(student) - teacher) ** 2).sum() / n
    torch.testing.assert_close(mgd(student, teacher), authors, **EXACT)


# ====================================================================== rough edges 17 and 18
def test_a_missing_transformers_plugin_says_how_to_install_it_from_this_repository() -> None:
    spec = {"name": "transformers", "path": "owner/model"}
    with (
        kd.use_host(kd.PluginHost(blocked=["transformers"])),
        pytest.raises(kd.UnknownPluginError) as caught,
    ):
        kd.check([("kd_loss", {"teacher_model": spec, "criterion": {"name": "logits"}})])
    message = str(caught.value)
    assert "pip install kdcore-transformers" in message
    checkout = re.search(r"from a checkout .*: pip install -e ([\w./-]+)", message)
    assert checkout is not None, message
    assert (REPO / checkout.group(1) / "pyproject.toml").is_file()


def test_the_readme_quick_start_says_how_long_the_tests_take_and_how_to_run_the_fast_tier() -> None:
    quick_start = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ")[0]
    assert re.search(r"about\s+\d+\s+minutes", quick_start), "the full test run's duration"
    assert 'python -m pytest -q -m "not slow"' in quick_start
    assert re.search(r"about\s+\d+\s+s\b", quick_start), "the fast tier's duration"
