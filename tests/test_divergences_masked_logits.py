"""Classes masked with -inf logits, in every divergence, chunked and fused.

A logit of -inf gives its class probability exactly 0 (a common way to forbid tokens). With the
convention 0 log 0 = 0 each divergence then has a definite value: finite, or +inf where a KL
puts weight on a class the other side forbids (forward KL: the student masks a class the teacher
keeps; reverse KL: the reverse). Finite values and their gradients must equal that limit (a
masked student class gets gradient 0), +inf must come out as +inf, and no gradient is ever NaN.

The references here are independent of the kernels: values from the definitions on the -inf
logits themselves, with ``torch.xlogy`` for 0 log 0 = 0; gradients by autograd through the
textbook formula on the same logits with every -inf replaced by -1e4 (far enough below the rest
that each masked probability is exactly 0 in float64: the limit the kernels must reach).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from kdcore_builtins.divergences import chunked as chunked_divergences
from torch import nn

import kdcore as kd
from tests.conftest import DIVERGENCE_CASES

F64 = {"atol": 1e-12, "rtol": 1e-10}
MASKED = -1.0e4  # stands for -inf in the gradient references
PATTERNS = ("teacher", "student", "same", "different")
PATHS = ("one chunk", "many chunks", "fused sum", "fused none")

NAMES = DIVERGENCE_CASES
#: divergences whose gradient has no finite limit where their value is +inf: zero there
ZERO_GRADIENT_WHEN_INFINITE = {"reverse_kl"}


@pytest.fixture
def criteria(builtin_host: kd.PluginHost) -> Any:
    return builtin_host.registries.criteria


def build(criteria: Any, name: str, **kwargs: Any) -> nn.Module:
    divergence, kw = NAMES[name]
    return criteria.get(divergence)(**kw, **kwargs)  # type: ignore[no-any-return]


def fused(criteria: Any, name: str, **kwargs: Any) -> nn.Module:
    divergence, kw = NAMES[name]
    return criteria.get("fused_logits")(divergence=divergence, **kw, **kwargs)  # type: ignore[no-any-return]


def logits(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).mul(3.0).to(dtype)


def masks(pattern: str, rows: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) boolean masks: two classes per row (one each for "different"), drawn
    per row; the last row is left unmasked, so finite rows sit next to masked ones."""
    student = torch.zeros(rows, classes, dtype=torch.bool)
    teacher = torch.zeros(rows, classes, dtype=torch.bool)
    for row in range(rows - 1):
        first, second = torch.randperm(classes)[:2].tolist()
        if pattern in ("student", "same"):
            student[row, [first, second]] = True
        if pattern in ("teacher", "same"):
            teacher[row, [first, second]] = True
        if pattern == "different":
            student[row, first], teacher[row, second] = True, True
    return student, teacher


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(mask, -math.inf)


# ====================================================================== references
def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) of probabilities, 0 log 0 = 0; +inf where a > 0 = b."""
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def kept_top(t: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Per row: the teacher's k largest classes, less those it masks."""
    return [
        order[:k][torch.isfinite(row[order[:k]])]
        for row, order in zip(
            t, torch.argsort(t, dim=-1, descending=True, stable=True), strict=True
        )
    ]


def reference_values(s: torch.Tensor, t: torch.Tensor, name: str, temperature: float) -> Any:
    """Per-row divergence * T**2 from the definitions, on the -inf logits themselves."""
    divergence, kw = NAMES[name]
    s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
    p, q = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
    if divergence == "forward_kl":
        rows = kl(q, p)
    elif divergence == "reverse_kl":
        rows = kl(p, q)
    elif divergence == "jsd":
        beta = kw["beta"]
        m = beta * q + (1 - beta) * p
        rows = beta * kl(q, m) + (1 - beta) * kl(p, m)
    elif divergence == "skew_kl":
        rows = kl(q, kw["alpha"] * q + (1 - kw["alpha"]) * p)
    elif divergence == "skew_reverse_kl":
        rows = kl(p, kw["alpha"] * p + (1 - kw["alpha"]) * q)
    elif divergence == "tvd":
        rows = 0.5 * (p - q).abs().sum(-1)
    else:
        out = []
        for row_p, row_q, top in zip(p, q, kept_top(t, kw["k"]), strict=True):
            rest = torch.ones_like(row_p, dtype=torch.bool)
            rest[top] = False
            if kw.get("tail_bucket"):
                p_k = torch.cat([row_p[top], row_p[rest].sum()[None]])
                q_k = torch.cat([row_q[top], row_q[rest].sum()[None]])
                out.append(kl(q_k, p_k))
            elif row_p[top].sum() == 0:  # the student keeps none of the teacher's classes
                out.append(torch.tensor(math.inf, dtype=torch.float64))
            else:
                out.append(kl(row_q[top] / row_q[top].sum(), row_p[top] / row_p[top].sum()))
        rows = torch.stack(out)
    return rows * temperature**2


def textbook_rows(
    s: torch.Tensor, t: torch.Tensor, name: str, temperature: float, tops: list[torch.Tensor]
) -> torch.Tensor:
    """Per-row divergence * T**2 of finite logits, the straightforward way (for autograd)."""
    divergence, kw = NAMES[name]
    lp, lq = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    p, q = lp.exp(), lq.exp()

    def kl_log(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        return (la.exp() * (la - lb)).sum(-1)

    if divergence == "forward_kl":
        rows = kl_log(lq, lp)
    elif divergence == "reverse_kl":
        rows = kl_log(lp, lq)
    elif divergence == "jsd":
        beta = kw["beta"]
        lm = torch.logaddexp(lq + math.log(beta), lp + math.log(1 - beta))
        rows = beta * kl_log(lq, lm) + (1 - beta) * kl_log(lp, lm)
    elif divergence == "skew_kl":
        alpha = kw["alpha"]
        rows = kl_log(lq, torch.logaddexp(lq + math.log(alpha), lp + math.log(1 - alpha)))
    elif divergence == "skew_reverse_kl":
        alpha = kw["alpha"]
        rows = kl_log(lp, torch.logaddexp(lp + math.log(alpha), lq + math.log(1 - alpha)))
    elif divergence == "tvd":
        rows = 0.5 * (p - q).abs().sum(-1)
    else:
        out = []
        for row_lp, row_lq, top in zip(lp, lq, tops, strict=True):
            if not kw.get("tail_bucket"):
                out.append(kl_log(row_lq[top].log_softmax(0), row_lp[top].log_softmax(0)))
                continue
            rest = torch.ones_like(row_lp, dtype=torch.bool)
            rest[top] = False
            lp_k = torch.cat([row_lp[top], row_lp[rest].logsumexp(0)[None]])
            lq_k = torch.cat([row_lq[top], row_lq[rest].logsumexp(0)[None]])
            out.append(kl_log(lq_k, lp_k))
        rows = torch.stack(out)
    return rows * temperature**2


def reference_gradient_rows(
    s: torch.Tensor, t: torch.Tensor, name: str, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, d sum / d s): the limit, by autograd with -inf replaced by -1e4."""
    values = reference_values(s, t, name, temperature)
    tops = kept_top(t.double(), NAMES[name][1].get("k", 1))
    leaf = s.double().masked_fill(torch.isneginf(s), MASKED).requires_grad_()
    finite_t = t.double().masked_fill(torch.isneginf(t), MASKED)
    textbook_rows(leaf, finite_t, name, temperature, tops).sum().backward()
    assert leaf.grad is not None
    grad = leaf.grad
    if name in ZERO_GRADIENT_WHEN_INFINITE:
        grad = grad.masked_fill(torch.isposinf(values)[:, None], 0.0)
    return values, grad


def expected_infinite_rows(
    name: str, student_mask: torch.Tensor, teacher_mask: torch.Tensor
) -> torch.Tensor:
    """Which rows the definitions make +inf (forward KL: a class the student masks and the
    teacher keeps; reverse KL: the reverse; the mixtures and TVD never; not for top-k)."""
    if name == "reverse_kl":
        return (teacher_mask & ~student_mask).any(-1)
    if name == "forward_kl":
        return (student_mask & ~teacher_mask).any(-1)
    return torch.zeros(student_mask.shape[0], dtype=torch.bool)


# ====================================================================== the matrix
def run_chunked(
    criteria: Any,
    name: str,
    s: torch.Tensor,
    t: torch.Tensor,
    temperature: float,
    **call: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    loss = build(criteria, name, temperature=temperature, reduction="none")
    leaf = s.detach().clone().requires_grad_()
    value = loss(leaf, t, **call)
    value.sum().backward()
    assert leaf.grad is not None
    return value.detach(), leaf.grad


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", NAMES)
def test_masked_classes_give_the_limit_value_and_gradient(
    criteria: Any,
    name: str,
    pattern: str,
    temperature: float,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if path == "many chunks":
        monkeypatch.setattr(chunked_divergences, "CHUNK_ELEMENTS", 20)  # 2 rows a chunk: 4 chunks
    if path.startswith("fused"):
        check_fused(criteria, name, pattern, temperature, reduction=path.split()[1])
        return
    student_mask, teacher_mask = masks(pattern, 7, 9)
    s, t = masked(logits(7, 9), student_mask), masked(logits(7, 9), teacher_mask)
    value, grad = run_chunked(criteria, name, s, t, temperature)
    expected, expected_grad = reference_gradient_rows(s, t, name, temperature)
    torch.testing.assert_close(value, expected, **F64)
    if not name.startswith("topk"):  # top-k: only classes in the top k or a tail with mass
        infinite = expected_infinite_rows(name, student_mask, teacher_mask)
        assert torch.equal(torch.isposinf(value), infinite)
    assert torch.isfinite(grad).all(), grad
    torch.testing.assert_close(grad, expected_grad, **F64)
    finite = torch.isfinite(expected)
    assert torch.equal(
        grad[finite][student_mask[finite]],
        torch.zeros(int(student_mask[finite].sum()), dtype=grad.dtype),
    )


def check_fused(criteria: Any, name: str, pattern: str, temperature: float, reduction: str) -> None:
    """Masks through the lm heads' biases: -inf in the bias masks a column in every row."""
    hs, ht = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    student, teacher = nn.Linear(5, 9).double(), nn.Linear(8, 9).double()
    columns = {"student": ([1, 4], []), "teacher": ([], [1, 4]), "same": ([1, 4], [1, 4]),
               "different": ([1], [4])}[pattern]  # fmt: skip
    with torch.no_grad():
        student.bias[columns[0]] = -math.inf
        teacher.bias[columns[1]] = -math.inf
    loss = fused(criteria, name, temperature=temperature, reduction=reduction, chunk_size=2)
    h = hs.clone().requires_grad_()
    value = loss(h, ht, lm_heads=(student, teacher))
    value.sum().backward()
    grads = (h.grad, student.weight.grad, student.bias.grad)

    s, t = student(hs).detach(), teacher(ht).detach()
    expected = reference_values(s, t, name, temperature)
    tops = kept_top(t, NAMES[name][1].get("k", 1))
    ref_h = hs.clone().requires_grad_()
    ref_w = student.weight.detach().clone().requires_grad_()
    ref_b = student.bias.detach().masked_fill(torch.isneginf(student.bias), MASKED)
    ref_b.requires_grad_()
    t_finite = t.masked_fill(torch.isneginf(t), MASKED)
    rows = textbook_rows(ref_h @ ref_w.t() + ref_b, t_finite, name, temperature, tops)
    if name in ZERO_GRADIENT_WHEN_INFINITE:
        rows = rows * torch.isfinite(expected)  # an infinite row passes no gradient
    rows.sum().backward()
    torch.testing.assert_close(value, expected if reduction == "none" else expected.sum(), **F64)
    for got, want in zip(grads, (ref_h.grad, ref_w.grad, ref_b.grad), strict=True):
        assert got is not None and torch.isfinite(got).all(), got
        torch.testing.assert_close(got, want, **F64)
    if bool(torch.isfinite(expected).all()) and columns[0]:
        assert torch.equal(
            student.bias.grad[columns[0]], torch.zeros(len(columns[0]), dtype=torch.float64)
        )  # type: ignore[index]


# ====================================================================== top-k with few classes
@pytest.mark.parametrize("path", ["one chunk", "many chunks", "fused"])
@pytest.mark.parametrize("name", ["topk_kl", "topk_kl_tail"])
def test_topk_keeps_only_classes_the_teacher_gives_mass_whatever_the_ties(
    criteria: Any, name: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teacher keeps 2 of 9 classes and k is 4: its "top 4" is those 2 (masked classes tie
    at -inf and are never among them), so the value is the KL over those 2 classes (plus an
    empty tail), whichever masked columns come first."""
    if path == "many chunks":
        monkeypatch.setattr(chunked_divergences, "CHUNK_ELEMENTS", 20)
    s, t = logits(5, 9), logits(5, 9)
    teacher_mask = torch.ones(5, 9, dtype=torch.bool)
    teacher_mask[:, [2, 6]] = False
    t = masked(t, teacher_mask)
    s[0, 0] = -math.inf  # a class the teacher masks too
    if path == "fused":
        eye = torch.eye(9, dtype=torch.float64)
        student, teacher = nn.Linear(9, 9, bias=False).double(), nn.Linear(9, 9).double()
        with torch.no_grad():
            student.weight.copy_(eye)
            teacher.weight.zero_()
        values = []
        for order in (torch.arange(9), torch.arange(9).flip(0)):  # the same, columns permuted
            with torch.no_grad():
                teacher.bias.copy_(t[0, order])
            loss = fused(criteria, name, reduction="none", chunk_size=2)
            h = s[1:, order].clone().requires_grad_()
            values.append(loss(h, s[1:, order], lm_heads=(student, teacher)))
            values[-1].sum().backward()
            assert h.grad is not None and torch.isfinite(h.grad).all()
        expected = reference_values(s[1:], t[:1].expand(4, 9), name, 1.0)
        for value in values:
            torch.testing.assert_close(value.detach(), expected, **F64)
        return
    loss = build(criteria, name, reduction="none")
    expected, expected_grad = reference_gradient_rows(s, t, name, 1.0)
    forward_kl = reference_values(s[:, [2, 6]], t[:, [2, 6]], "forward_kl", 1.0)
    if name == "topk_kl":
        torch.testing.assert_close(expected, forward_kl, **F64)
    for order in (torch.arange(9), torch.arange(9).flip(0)):
        value, grad = run_chunked(criteria, name, s[:, order], t[:, order], 1.0)
        torch.testing.assert_close(value, expected, **F64)
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, expected_grad[:, order], **F64)
    assert loss is not None


@pytest.mark.parametrize("path", ["one chunk", "many chunks"])
def test_topk_without_tail_is_infinite_where_the_student_masks_every_kept_class(
    criteria: Any, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "many chunks":
        monkeypatch.setattr(chunked_divergences, "CHUNK_ELEMENTS", 20)
    s, t = logits(3, 9), logits(3, 9)
    top = t.topk(4, dim=-1).indices
    s[0].scatter_(0, top[0], -math.inf)
    value, grad = run_chunked(criteria, "topk_kl", s, t, 2.0)
    assert torch.isposinf(value[0]) and torch.isfinite(value[1:]).all()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(value[1:], reference_values(s[1:], t[1:], "topk_kl", 2.0), **F64)


# ====================================================================== rows with no distribution
@pytest.mark.parametrize("path", ["one chunk", "many chunks"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("name", NAMES)
def test_a_row_masked_entirely_on_one_side_is_nan_unless_ignored(
    criteria: Any, name: str, side: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every logit of one side -inf: no distribution, so that row is NaN (value and gradient)
    and the others are unaffected; labelled ignore_index, the row is never read."""
    if path == "many chunks":
        monkeypatch.setattr(chunked_divergences, "CHUNK_ELEMENTS", 20)
    student_mask, teacher_mask = masks("same", 6, 9)
    s, t = masked(logits(6, 9), student_mask), masked(logits(6, 9), teacher_mask)
    (s if side == "student" else t)[2] = -math.inf
    labels = torch.tensor([1, 0, -100, 4, 2, 7])
    keep = labels != -100
    expected, expected_grad = reference_gradient_rows(s[keep], t[keep], name, 2.0)
    value, grad = run_chunked(criteria, name, s, t, 2.0, labels=labels)
    torch.testing.assert_close(value[keep], expected, **F64)
    torch.testing.assert_close(grad[keep], expected_grad, **F64)
    assert value[2] == 0 and torch.equal(grad[2], torch.zeros(9, dtype=torch.float64))
    value, grad = run_chunked(criteria, name, s, t, 2.0)
    assert torch.isnan(value[2]) and torch.isnan(grad[2]).any()
    torch.testing.assert_close(value[keep], expected, **F64)
    torch.testing.assert_close(grad[keep], expected_grad, **F64)


@pytest.mark.parametrize("name", NAMES)
def test_fused_masked_heads_with_ignored_positions(criteria: Any, name: str) -> None:
    """Masked columns (bias -inf on both heads) and positions labelled ignore_index, whose
    hidden states are NaN: never read."""
    hs, ht = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    labels = torch.tensor([1, -100, 0, 4, -100, 7])
    keep = labels != -100
    hs[~keep], ht[~keep] = math.nan, math.nan
    student, teacher = nn.Linear(5, 9).double(), nn.Linear(8, 9).double()
    with torch.no_grad():
        student.bias[[0, 3]], teacher.bias[[0, 3]] = -math.inf, -math.inf
    loss = fused(criteria, name, temperature=2.0, reduction="batchmean", chunk_size=2)
    h = hs.clone().requires_grad_()
    value = loss(h, ht, labels=labels, lm_heads=(student, teacher))
    value.backward()
    expected = reference_values(student(hs[keep]), teacher(ht[keep]), name, 2.0).sum() / 4
    torch.testing.assert_close(value.detach(), expected.detach(), **F64)
    assert h.grad is not None and torch.isfinite(h.grad).all()
    assert torch.equal(h.grad[~keep], torch.zeros(2, 5, dtype=torch.float64))
    assert student.bias.grad is not None and torch.isfinite(student.weight.grad).all()  # type: ignore[arg-type]
    assert torch.equal(student.bias.grad[[0, 3]], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("path", ["one chunk", "many chunks"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("name", NAMES)
def test_a_nan_logit_is_never_hidden_by_the_masking_rules(
    criteria: Any, name: str, side: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0 log 0 = 0 must not swallow a NaN from a diverged model: that row stays NaN."""
    if path == "many chunks":
        monkeypatch.setattr(chunked_divergences, "CHUNK_ELEMENTS", 20)
    student_mask, teacher_mask = masks("same", 6, 9)
    s, t = masked(logits(6, 9), student_mask), masked(logits(6, 9), teacher_mask)
    (s if side == "student" else t)[3, 5] = math.nan
    value, grad = run_chunked(criteria, name, s, t, 1.0)
    assert torch.isnan(value[3]) and torch.isnan(grad[3]).any()
    assert not torch.isnan(value[[0, 1, 2, 4, 5]]).any()


# ====================================================================== dtypes and finite masks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_masked_inputs_give_finite_results_near_the_float64_limit(
    criteria: Any, name: str, pattern: str, dtype: torch.dtype
) -> None:
    student_mask, teacher_mask = masks(pattern, 7, 40)
    s = masked(logits(7, 40, dtype=dtype), student_mask)
    t = masked(logits(7, 40, dtype=dtype), teacher_mask)
    value, grad = run_chunked(criteria, name, s, t, 2.0)
    expected, expected_grad = reference_gradient_rows(s, t, name, 2.0)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    assert not torch.isnan(value).any() and torch.isfinite(grad).all()
    torch.testing.assert_close(value.double(), expected, atol=1e-5, rtol=1e-5)
    tolerance = (
        {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    )
    torch.testing.assert_close(grad.double(), expected_grad, **tolerance)


@pytest.mark.parametrize("name", NAMES)
def test_the_lowest_finite_logit_masks_like_minus_inf_where_the_value_is_finite(
    criteria: Any, name: str
) -> None:
    """Transformers masks with torch.finfo(dtype).min: the same value and gradient as -inf."""
    student_mask, teacher_mask = masks("same", 7, 40)
    s, t = logits(7, 40, dtype=torch.float32), logits(7, 40, dtype=torch.float32)
    lowest = torch.finfo(torch.float32).min
    with_inf = run_chunked(criteria, name, masked(s, student_mask), masked(t, teacher_mask), 1.0)
    with_min = run_chunked(
        criteria,
        name,
        s.masked_fill(student_mask, lowest),
        t.masked_fill(teacher_mask, lowest),
        1.0,
    )
    torch.testing.assert_close(with_min, with_inf, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("divergence", "kw", "like"),
    [
        ("jsd", {"beta": 0.0}, "forward_kl"),
        ("jsd", {"beta": 1.0}, "reverse_kl"),
        ("skew_kl", {"alpha": 0.0}, "forward_kl"),
        ("skew_reverse_kl", {"alpha": 0.0}, "reverse_kl"),
    ],
)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_endpoints_of_beta_and_alpha_mask_as_the_kl_they_are(
    criteria: Any, divergence: str, kw: dict[str, Any], like: str, pattern: str
) -> None:
    student_mask, teacher_mask = masks(pattern, 7, 9)
    s, t = masked(logits(7, 9), student_mask), masked(logits(7, 9), teacher_mask)
    loss = criteria.get(divergence)(**kw, reduction="none")
    leaf = s.clone().requires_grad_()
    value = loss(leaf, t)
    value.sum().backward()
    expected, expected_grad = reference_gradient_rows(s, t, like, 1.0)
    torch.testing.assert_close(value.detach(), expected, **F64)
    torch.testing.assert_close(leaf.grad, expected_grad, **F64)
