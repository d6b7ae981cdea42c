"""The chunked logit divergences and the fused lm-head loss, against their formulas.

Every value and gradient is compared with a float64 computation of the divergence's definition
written here the straightforward way (``log_softmax``, the formula, autograd), independent of the
chunked kernels; then the edge cases the definitions imply (JSD's endpoints are the two KLs as
TRL defines them, identical inputs give 0, top-k over the whole vocabulary is the full KL), the
masks and normalisations, half precision, vocabulary alignment, bad input, the memory discipline
of the autograd functions, and the fused loss end to end through ``kd.convert``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kdcore_builtins import divergences
from kdcore_builtins.divergences import chunked as chunked_divergences
from kdcore_builtins.divergences import fused_linear_divergence, logit_divergence
from torch import nn

import kdcore as kd
from tests.conftest import DIVERGENCE_CASES

F64 = {"atol": 1e-12, "rtol": 1e-10}
F32 = {"atol": 1e-6, "rtol": 1e-5}
REDUCTIONS = ("mean", "sum", "batchmean", "none")

NAMES = DIVERGENCE_CASES


@pytest.fixture
def criteria(builtin_host: kd.PluginHost) -> Any:
    return builtin_host.registries.criteria


@pytest.fixture(params=["one chunk", "many chunks"])
def chunking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Small inputs fit in one chunk (plain formula for forward KL, else gradient computed in
    forward); "many chunks" forces 2 rows a chunk for vocabularies up to 12, so backward
    recomputes chunk by chunk."""
    if request.param == "many chunks":
        monkeypatch.setattr(chunked_divergences, "CHUNK_ELEMENTS", 24)
    return request.param  # type: ignore[no-any-return]


def build(criteria: Any, name: str, **kwargs: Any) -> nn.Module:
    registered = "topk_kl" if name == "topk_kl_tail" else name
    return criteria.get(registered)(**{**NAMES[name][1], **kwargs})  # type: ignore[no-any-return]


def logits(*shape: int, dtype: torch.dtype = torch.float64, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).mul(scale).to(dtype)


# ====================================================================== references
def reference_rows(
    s: torch.Tensor, t: torch.Tensor, divergence: str, temperature: float, **kw: Any
) -> torch.Tensor:
    """Per-position divergence * T**2, float64, from the definitions (autograd gives gradients)."""
    s, t = s.double() / temperature, t.double().detach() / temperature
    log_p, log_q = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    p, q = log_p.exp(), log_q.exp()

    def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:  # KL(a || b)
        a = log_a.exp()
        return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)

    if divergence == "forward_kl":
        rows = kl(log_q, log_p)
    elif divergence == "reverse_kl":
        rows = kl(log_p, log_q)
    elif divergence == "jsd":  # TRL's generalized_jsd_loss, endpoints included
        beta = kw["beta"]
        if beta == 0:
            rows = kl(log_q, log_p)
        elif beta == 1:
            rows = kl(log_p, log_q)
        else:
            log_m = (beta * q + (1 - beta) * p).log()
            rows = beta * kl(log_q, log_m) + (1 - beta) * kl(log_p, log_m)
    elif divergence == "skew_kl":
        rows = kl(log_q, (kw["alpha"] * q + (1 - kw["alpha"]) * p).log())
    elif divergence == "skew_reverse_kl":
        rows = kl(log_p, (kw["alpha"] * p + (1 - kw["alpha"]) * q).log())
    elif divergence == "tvd":
        rows = 0.5 * (p - q).abs().sum(-1)
    elif divergence == "topk_kl":
        rows = reference_topk(s, t, kw["k"], kw.get("tail_bucket", False))
    else:
        raise ValueError(divergence)
    return rows * temperature**2


def reference_topk(s: torch.Tensor, t: torch.Tensor, k: int, tail: bool) -> torch.Tensor:
    """Row by row: the teacher's k largest classes (by sorting), then KL over them (+ tail)."""
    flat_s, flat_t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    out = []
    for row_s, row_t in zip(flat_s, flat_t, strict=True):
        top = torch.argsort(row_t, descending=True)[:k]
        if not tail:
            log_p, log_q = torch.log_softmax(row_s[top], 0), torch.log_softmax(row_t[top], 0)
            out.append((log_q.exp() * (log_q - log_p)).sum())
            continue
        p, q = torch.softmax(row_s, 0), torch.softmax(row_t, 0)
        rest = torch.ones_like(row_s, dtype=torch.bool)
        rest[top] = False
        value = (q[top] * (q[top].log() - p[top].log())).sum()
        p_tail, q_tail = p[rest].sum(), q[rest].sum()
        if q_tail > 0:
            value = value + q_tail * (q_tail.log() - p_tail.log())
        out.append(value)
    return torch.stack(out).reshape(s.shape[:-1])


def reduce_reference(rows: torch.Tensor, reduction: str, first_dim: int, classes: int) -> Any:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / (rows.numel() * classes)
    return rows.sum() / first_dim


def value_and_grad(fn: Any, s: torch.Tensor, t: torch.Tensor) -> tuple[Any, torch.Tensor]:
    s = s.detach().clone().requires_grad_()
    value = fn(s, t)
    (value.sum() if value.dim() else value).backward()
    assert s.grad is not None
    return value.detach(), s.grad


def check_against_reference(
    loss: Any, name: str, s: torch.Tensor, t: torch.Tensor, tol: dict[str, float], **call: Any
) -> None:
    divergence, kw = NAMES[name]
    temperature, reduction = loss.temperature, loss.reduction

    def ref(s_: torch.Tensor, t_: torch.Tensor) -> Any:
        rows = reference_rows(s_, t_, divergence, temperature, **kw)
        return reduce_reference(rows, reduction, s_.shape[0], s_.shape[-1])

    value, grad = value_and_grad(lambda a, b: loss(a, b, **call), s, t)
    expected, expected_grad = value_and_grad(ref, s.double(), t.double())
    torch.testing.assert_close(value.double(), expected, **tol)
    torch.testing.assert_close(grad.double(), expected_grad, **tol)


# ====================================================================== values and gradients
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("shape", [(6, 9), (2, 3, 9)], ids=["2d", "3d"])
def test_value_and_gradient_equal_the_float64_formula(
    criteria: Any,
    name: str,
    reduction: str,
    temperature: float,
    shape: tuple[int, ...],
    chunking: str,
) -> None:
    loss = build(criteria, name, temperature=temperature, reduction=reduction)
    check_against_reference(loss, name, logits(*shape), logits(*shape), F64)


@pytest.mark.parametrize("name", NAMES)
def test_float32_value_and_gradient_within_1e_5_of_the_float64_formula(
    criteria: Any, name: str
) -> None:
    loss = build(criteria, name, temperature=2.0, reduction="sum")
    s, t = logits(4, 7, 50, dtype=torch.float32), logits(4, 7, 50, dtype=torch.float32)
    check_against_reference(loss, name, s, t, F32)


@pytest.mark.parametrize("name", NAMES)
def test_many_chunks_give_the_same_result_as_one(
    criteria: Any, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loss = build(criteria, name, reduction="sum")
    s, t = logits(23, 11), logits(23, 11)
    whole = value_and_grad(loss, s, t)
    monkeypatch.setattr(
        chunked_divergences, "CHUNK_ELEMENTS", 3 * 11 - 1
    )  # 2 rows a chunk: 12 chunks
    chunked = value_and_grad(loss, s, t)
    torch.testing.assert_close(chunked, whole, **F64)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    vocab=st.integers(2, 12),
    temperature=st.floats(0.3, 4.0),
    beta=st.floats(0.0, 1.0),
    scale=st.floats(0.0, 8.0),
    seed=st.integers(0, 2**16),
)
def test_jsd_matches_the_formula_for_any_shape_beta_temperature_and_scale(
    shape: list[int], vocab: int, temperature: float, beta: float, scale: float, seed: int
) -> None:
    torch.manual_seed(seed)
    s, t = logits(*shape, vocab, scale=scale), logits(*shape, vocab, scale=scale)
    value, grad = value_and_grad(
        lambda a, b: logit_divergence(
            a, b, "jsd", beta=beta, temperature=temperature, reduction="sum"
        ),
        s,
        t,
    )
    expected, expected_grad = value_and_grad(
        lambda a, b: reference_rows(a, b, "jsd", temperature, beta=beta).sum(), s, t
    )
    torch.testing.assert_close(value, expected, **F64)
    torch.testing.assert_close(grad, expected_grad, **F64)


# ====================================================================== edge cases
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jsd_with_beta_0_is_the_forward_kl_and_with_beta_1_the_reverse_kl(
    criteria: Any, reduction: str
) -> None:
    s, t = logits(3, 4, 8), logits(3, 4, 8)
    for beta, other in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = criteria.get("jsd")(beta=beta, temperature=1.5, reduction=reduction)
        plain = criteria.get(other)(temperature=1.5, reduction=reduction)
        torch.testing.assert_close(value_and_grad(jsd, s, t), value_and_grad(plain, s, t), **F64)


def test_forward_kl_is_logits_under_the_same_reduction(criteria: Any) -> None:
    s, t = logits(3, 4, 8), logits(3, 4, 8)
    for reduction in REDUCTIONS:
        a = criteria.get("forward_kl")(temperature=2.0, reduction=reduction)
        b = criteria.get("logits")(temperature=2.0, reduction=reduction)
        torch.testing.assert_close(value_and_grad(a, s, t), value_and_grad(b, s, t), **F64)


@pytest.mark.parametrize(
    ("skew", "plain"), [("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")]
)
def test_skew_kl_with_alpha_0_is_the_unskewed_kl(criteria: Any, skew: str, plain: str) -> None:
    s, t = logits(5, 8), logits(5, 8)
    a = criteria.get(skew)(alpha=0.0, reduction="sum")
    b = criteria.get(plain)(reduction="sum")
    torch.testing.assert_close(value_and_grad(a, s, t), value_and_grad(b, s, t), **F64)


@pytest.mark.parametrize("name", NAMES)
def test_identical_inputs_give_zero_loss_and_zero_gradient(criteria: Any, name: str) -> None:
    s = logits(4, 3, 10)
    value, grad = value_and_grad(build(criteria, name, reduction="sum"), s, s.clone())
    assert abs(value.item()) < 1e-12
    assert grad.abs().max() < 1e-12


@pytest.mark.parametrize("tail_bucket", [False, True])
def test_topk_over_the_whole_vocabulary_is_the_full_forward_kl(
    criteria: Any, tail_bucket: bool
) -> None:
    s, t = logits(6, 9), logits(6, 9)
    topk = criteria.get("topk_kl")(k=9, tail_bucket=tail_bucket, temperature=2.0)
    full = criteria.get("forward_kl")(temperature=2.0)
    torch.testing.assert_close(value_and_grad(topk, s, t), value_and_grad(full, s, t), **F64)


def test_topk_tail_bucket_teaches_the_mass_outside_the_top_k(criteria: Any) -> None:
    """Same renormalised top-k shape, different tail mass: only the tail bucket sees it."""
    t = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[1.0, 0.0, 5.0, 5.0, 5.0]], dtype=torch.float64)  # top-2 ratio as t's
    no_tail = criteria.get("topk_kl")(k=2, reduction="sum")(s, t)
    with_tail = criteria.get("topk_kl")(k=2, tail_bucket=True, reduction="sum")(s, t)
    assert abs(no_tail.item()) < 1e-12
    assert with_tail.item() > 1.0


def test_the_teacher_gets_no_gradient(criteria: Any) -> None:
    for name in NAMES:
        s, t = logits(3, 6).requires_grad_(), logits(3, 6).requires_grad_()
        build(criteria, name)(s, t).backward()
        assert t.grad is None and s.grad is not None


# ====================================================================== masks and normalisation
def masked_labels() -> torch.Tensor:
    return torch.tensor([[3, -100, 1, 0], [-100, -100, 2, 5]])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignored_positions_count_as_absent_under_each_reduction(
    criteria: Any, name: str, reduction: str, chunking: str
) -> None:
    """sum: over kept rows; batchmean: / kept; mean: / (kept * V); none: 0 where ignored."""
    s, t, labels = logits(2, 4, 7), logits(2, 4, 7), masked_labels()
    keep = labels != -100
    s[~keep] = float("nan")  # ignored rows are never read
    loss = build(criteria, name, temperature=1.5, reduction=reduction)
    value, grad = value_and_grad(lambda a, b: loss(a, b, labels=labels), s, t)
    divergence, kw = NAMES[name]

    def ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rows = reference_rows(a[keep], b[keep], divergence, 1.5, **kw)
        if reduction == "none":
            return torch.zeros(2, 4, dtype=rows.dtype).masked_scatter(keep, rows)
        return {"sum": 1.0, "batchmean": 5.0, "mean": 35.0}[reduction] ** -1 * rows.sum()

    expected, expected_grad = value_and_grad(ref, s, t)
    torch.testing.assert_close(value, expected, **F64)
    torch.testing.assert_close(grad[keep], expected_grad[keep], **F64)
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))


def test_every_position_ignored_gives_zero_and_backpropagates(criteria: Any) -> None:
    for reduction in REDUCTIONS:
        s = logits(2, 3, 5).requires_grad_()
        loss = criteria.get("jsd")(reduction=reduction)(
            s, logits(2, 3, 5), labels=torch.full((2, 3), -100)
        )
        assert torch.equal(loss, torch.zeros_like(loss))
        loss.sum().backward()
        assert s.grad is not None and torch.equal(s.grad, torch.zeros_like(s))


def test_a_custom_ignore_index_and_labels_without_any_ignored_position(criteria: Any) -> None:
    s, t = logits(3, 6), logits(3, 6)
    loss = criteria.get("forward_kl")(ignore_index=0, reduction="sum")
    expected = reference_rows(s[1:], t[1:], "forward_kl", 1.0).sum()
    torch.testing.assert_close(loss(s, t, labels=torch.tensor([0, 1, 2])), expected, **F64)
    torch.testing.assert_close(
        loss(s, t, labels=torch.tensor([1, 2, 3])), loss(s, t), **F64
    )  # no ignored label: every position counts


def test_batchmean_divides_by_num_items_in_batch_when_given(criteria: Any) -> None:
    s, t, labels = logits(2, 4, 7), logits(2, 4, 7), masked_labels()
    summed = criteria.get("tvd")(reduction="sum")
    loss = criteria.get("tvd")()
    torch.testing.assert_close(
        loss(s, t, labels=labels, num_items_in_batch=20), summed(s, t, labels=labels) / 20, **F64
    )
    torch.testing.assert_close(
        loss(s, t, num_items_in_batch=torch.tensor(9)), summed(s, t) / 9, **F64
    )
    assert loss(s, t, labels=torch.full((2, 4), -100), num_items_in_batch=0).item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_num_items_in_batch_is_refused_without_batchmean(criteria: Any, reduction: str) -> None:
    with pytest.raises(ValueError, match=rf"num_items_in_batch.*batchmean.*{reduction!r}"):
        criteria.get("jsd")(reduction=reduction)(logits(2, 5), logits(2, 5), num_items_in_batch=4)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "7", True])
def test_bad_num_items_in_batch_is_refused_naming_it(criteria: Any, bad: Any) -> None:
    with pytest.raises((ValueError, TypeError), match="num_items_in_batch"):
        criteria.get("jsd")()(logits(2, 5), logits(2, 5), num_items_in_batch=bad)


def test_batchmean_divides_by_the_first_dimension_without_labels_and_by_tokens_with(
    criteria: Any,
) -> None:
    """Without labels as F.kl_div (per sequence for [B, S, V]); with labels per kept position,
    also when no label is ignored."""
    s, t = logits(3, 4, 6), logits(3, 4, 6)
    rows = reference_rows(s, t, "forward_kl", 1.0)
    loss = criteria.get("forward_kl")()
    torch.testing.assert_close(loss(s, t), rows.sum() / 3, **F64)
    every = torch.zeros(3, 4, dtype=torch.long)
    torch.testing.assert_close(loss(s, t, labels=every), rows.sum() / 12, **F64)
    every[0, 0] = -100
    torch.testing.assert_close(loss(s, t, labels=every), (rows.sum() - rows[0, 0]) / 11, **F64)


def test_labels_with_the_wrong_count_or_dtype_are_refused_naming_both_shapes(
    criteria: Any,
) -> None:
    loss = criteria.get("reverse_kl")()
    with pytest.raises(ValueError, match=r"labels \(2, 3\).*\(2, 4\)"):
        loss(logits(2, 4, 5), logits(2, 4, 5), labels=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor, got torch.float32"):
        loss(logits(2, 4, 5), logits(2, 4, 5), labels=torch.zeros(2, 4))


# ====================================================================== dtypes and layouts
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "topk_kl_tail"])
def test_half_precision_inputs_compute_in_float32_and_return_a_gradient_in_their_dtype(
    criteria: Any, dtype: torch.dtype, name: str
) -> None:
    s, t = logits(4, 5, 40, dtype=dtype), logits(4, 5, 40, dtype=dtype)
    loss = build(criteria, name, temperature=2.0)
    value, grad = value_and_grad(loss, s, t)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    # The same rounded inputs, upcast: only the gradient's final rounding differs.
    expected, expected_grad = value_and_grad(loss, s.float(), t.float())
    torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad.float(), expected_grad.to(dtype).float(), atol=0, rtol=0)


def test_logits_sliced_or_transposed_are_read_without_flattening_copies(
    criteria: Any, chunking: str
) -> None:
    full_s, full_t = logits(3, 6, 9), logits(3, 6, 9)
    loss = criteria.get("jsd")(reduction="sum")
    sliced = (full_s[:, :-1, :], full_t[:, :-1, :])  # not viewable as [15, 9]
    contiguous = (sliced[0].contiguous(), sliced[1].contiguous())
    torch.testing.assert_close(value_and_grad(loss, *sliced), value_and_grad(loss, *contiguous))
    labels = torch.randint(0, 9, (3, 5))
    labels[0, 1] = -100
    torch.testing.assert_close(
        loss(*sliced, labels=labels), loss(*contiguous, labels=labels), **F64
    )
    s, t = logits(6, 4, 9).transpose(0, 1), logits(6, 4, 9).transpose(0, 1)
    torch.testing.assert_close(
        value_and_grad(loss, s, t), value_and_grad(loss, s.contiguous(), t.contiguous()), **F64
    )


def test_one_dimensional_logits_follow_kl_div(criteria: Any) -> None:
    s, t = logits(7), logits(7)
    rows = reference_rows(s, t, "forward_kl", 1.0)
    torch.testing.assert_close(criteria.get("forward_kl")(reduction="none")(s, t), rows, **F64)
    torch.testing.assert_close(criteria.get("logits")(reduction="batchmean")(s, t), rows / 7)


def test_model_outputs_with_logits_attributes_are_accepted(criteria: Any) -> None:
    class Output:
        def __init__(self, value: torch.Tensor) -> None:
            self.logits = value

    s, t = logits(2, 5), logits(2, 5)
    loss = criteria.get("tvd")()
    assert torch.equal(loss(Output(s), (t, None)), loss(s, t))


# ====================================================================== memory discipline
def saved_by_autograd(fn: Any) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return saved


@pytest.mark.parametrize("name", NAMES)
def test_forward_saves_only_its_inputs_and_two_floats_per_row(
    criteria: Any, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunked_divergences, "CHUNK_ELEMENTS", 500)  # 10 rows a chunk: 7 chunks
    rows, vocab = 64, 50
    s = logits(rows, vocab, dtype=torch.float32).requires_grad_()
    t = logits(rows, vocab, dtype=torch.float32)
    saved = saved_by_autograd(lambda: build(criteria, name)(s, t))
    big = [x for x in saved if x.numel() > 2 * rows]
    assert all(x.data_ptr() in (s.data_ptr(), t.data_ptr()) for x in big), [x.shape for x in big]


@pytest.mark.parametrize("name", NAMES)
def test_inputs_of_one_chunk_save_at_most_one_chunk(criteria: Any, name: str) -> None:
    s = logits(64, 50, dtype=torch.float32).requires_grad_()
    t = logits(64, 50, dtype=torch.float32)
    saved = saved_by_autograd(lambda: build(criteria, name)(s, t))
    copies = [x for x in saved if x.data_ptr() not in (s.data_ptr(), t.data_ptr())]
    assert sum(x.numel() for x in copies) <= 2 * 64 * 50  # the gradient, or log-probabilities


def test_backward_writes_one_gradient_and_keeps_no_float32_copy_of_half_inputs(
    criteria: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunked_divergences, "CHUNK_ELEMENTS", 640)
    s = logits(32, 64, dtype=torch.bfloat16).requires_grad_()
    t = logits(32, 64, dtype=torch.bfloat16)
    saved = saved_by_autograd(lambda: criteria.get("skew_kl")()(s, t))
    assert not any(x.dtype == torch.float32 and x.numel() > 64 for x in saved)


# ====================================================================== vocabulary alignment
def test_different_vocabularies_are_refused_by_default_naming_both_shapes(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"\(2, 151936\).*\(2, 152064\).*vocab_alignment"):
        criteria.get("jsd")()(torch.randn(2, 151936), torch.randn(2, 152064))


def test_logits_points_to_forward_kl_for_padded_vocabularies(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"\(4, 6\).*\(4, 7\).*'forward_kl' criterion"):
        criteria.get("logits")()(torch.randn(4, 6), torch.randn(4, 7))


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd", "topk_kl_tail"])
@pytest.mark.parametrize(("student_vocab", "teacher_vocab"), [(12, 9), (9, 12)])
def test_truncate_compares_the_shared_columns_only(
    criteria: Any, name: str, student_vocab: int, teacher_vocab: int, chunking: str
) -> None:
    s, t = logits(3, student_vocab), logits(3, teacher_vocab)
    aligned = build(criteria, name, vocab_alignment="truncate", reduction="mean")
    plain = build(criteria, name, reduction="mean")
    value, grad = value_and_grad(aligned, s, t)
    expected, expected_grad = value_and_grad(plain, s[:, :9], t[:, :9])
    torch.testing.assert_close(value, expected, **F64)
    torch.testing.assert_close(grad[:, :9], expected_grad, **F64)
    assert torch.equal(grad[:, 9:], torch.zeros_like(grad[:, 9:]))


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_mask_keeps_the_students_full_softmax_with_zero_teacher_mass_on_its_extra_columns(
    criteria: Any, name: str, chunking: str
) -> None:
    s, t = logits(2, 3, 12), logits(2, 3, 9)
    divergence, kw = NAMES[name]
    loss = build(criteria, name, vocab_alignment="mask", reduction="sum")
    value, grad = value_and_grad(loss, s, t)
    padded = torch.cat([t, torch.full((2, 3, 3), -math.inf, dtype=t.dtype)], -1)  # q = 0 there
    expected, expected_grad = value_and_grad(
        lambda a, b: reference_rows(a, b, divergence, 1.0, **kw).sum(), s, padded
    )
    torch.testing.assert_close(value, expected, **F64)
    torch.testing.assert_close(grad, expected_grad, **F64)


def test_mask_drops_teacher_columns_the_student_lacks(criteria: Any) -> None:
    s, t = logits(4, 9), logits(4, 12)
    masked = criteria.get("jsd")(vocab_alignment="mask")
    truncated = criteria.get("jsd")(vocab_alignment="truncate")
    torch.testing.assert_close(value_and_grad(masked, s, t), value_and_grad(truncated, s, t))


@pytest.mark.parametrize("name", ["reverse_kl", "jsd"])
def test_mask_refuses_reverse_divergences_a_larger_student_would_make_infinite(
    criteria: Any, name: str
) -> None:
    loss = criteria.get(name)(vocab_alignment="mask", **({"beta": 1.0} if name == "jsd" else {}))
    with pytest.raises(ValueError, match=r"3 extra columns.*infinite.*'truncate'"):
        loss(logits(2, 12), logits(2, 9))


def test_a_vocabulary_difference_beyond_the_padding_tolerance_names_both_sizes(
    criteria: Any,
) -> None:
    loss = criteria.get("forward_kl")(vocab_alignment="truncate")
    loss(torch.randn(2, 151936), torch.randn(2, 152064))  # 128 apart: padding
    with pytest.raises(ValueError, match=r"32000 and teacher vocabulary 32300 differ by 300.*256"):
        loss(torch.randn(2, 32000), torch.randn(2, 32300))
    tight = criteria.get("forward_kl")(vocab_alignment="mask", max_vocab_padding=64)
    with pytest.raises(ValueError, match="max_vocab_padding=64"):
        tight(torch.randn(2, 151936), torch.randn(2, 152064))


def test_positions_that_differ_are_refused_naming_both_shapes(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 4, 5\)"):
        criteria.get("tvd")(vocab_alignment="truncate")(logits(2, 3, 5), logits(2, 4, 5))


# ====================================================================== bad construction values
LOSS_CLASSES = ["logits", "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


@pytest.mark.parametrize("name", [*LOSS_CLASSES, "topk_kl", "fused_logits"])
@pytest.mark.parametrize("temperature", [0, -1.5, float("nan"), float("inf")])
def test_a_temperature_that_is_not_finite_and_positive_is_refused(
    criteria: Any, name: str, temperature: float
) -> None:
    kwargs = {"k": 2} if name == "topk_kl" else {}
    with pytest.raises(ValueError, match=rf"temperature.*{temperature!r}"):
        criteria.get(name)(temperature=temperature, **kwargs)


@pytest.mark.parametrize("name", ["jsd", "fused_logits"])
@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_beta_outside_0_1_is_refused(criteria: Any, name: str, beta: float) -> None:
    with pytest.raises(ValueError, match=rf"beta must be in \[0, 1\], got {beta!r}"):
        criteria.get(name)(beta=beta)


@pytest.mark.parametrize("name", ["skew_kl", "skew_reverse_kl", "fused_logits"])
@pytest.mark.parametrize("alpha", [-0.1, 1.0, 2.0])
def test_alpha_outside_0_1_is_refused(criteria: Any, name: str, alpha: float) -> None:
    with pytest.raises(ValueError, match=rf"alpha must be in \[0, 1\), got {alpha!r}"):
        criteria.get(name)(alpha=alpha)


@pytest.mark.parametrize("name", ["jsd", "skew_kl"])
def test_hyper_parameters_that_are_not_numbers_are_refused(criteria: Any, name: str) -> None:
    key = "beta" if name == "jsd" else "alpha"
    with pytest.raises(TypeError, match=rf"{key} must be a number, got '0.5'"):
        criteria.get(name)(**{key: "0.5"})


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_1_is_refused_at_construction(criteria: Any, k: int) -> None:
    with pytest.raises(ValueError, match=rf"k must be >= 1, got {k}"):
        criteria.get("topk_kl")(k=k)
    with pytest.raises(TypeError, match=r"k must be an int, got 2.0"):
        criteria.get("topk_kl")(k=2.0)


def test_k_larger_than_the_teacher_vocabulary_is_refused_at_forward_naming_both(
    criteria: Any,
) -> None:
    with pytest.raises(ValueError, match=r"k=8 is larger than the teacher's vocabulary of 5"):
        criteria.get("topk_kl")(k=8)(logits(2, 5), logits(2, 5))
    with pytest.raises(ValueError, match=r"k=10 is larger than the teacher's vocabulary of 9"):
        criteria.get("topk_kl")(k=10, vocab_alignment="mask")(logits(2, 12), logits(2, 9))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"reduction": "avg"}, ValueError, "reduction.*'avg'"),
        ({"vocab_alignment": "pad"}, ValueError, "vocab_alignment must be one of.*'pad'"),
        ({"max_vocab_padding": -1}, ValueError, "max_vocab_padding must be >= 0, got -1"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int, got 1.5"),
    ],
)
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "topk_kl"])
def test_other_bad_arguments_are_refused_naming_them(
    criteria: Any, name: str, kwargs: dict[str, Any], error: type, pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        criteria.get(name)(**kwargs, **({"k": 2} if name == "topk_kl" else {}))


def test_logits_keeps_the_reference_constructor(criteria: Any) -> None:
    loss = criteria.get("logits")(temperature=2)
    assert repr(loss) == "LogitsDistillationLoss(temperature=2.0, reduction='mean')"
    assert isinstance(loss, divergences.ForwardKLLoss)


def test_the_functional_form_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="divergence must be one of.*'kld'"):
        logit_divergence(logits(2, 3), logits(2, 3), "kld")
    with pytest.raises(ValueError, match="needs k"):
        logit_divergence(logits(2, 3), logits(2, 3), "topk_kl")
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 2"):
        logit_divergence(logits(2, 3), logits(2, 3), "jsd", beta=2)


# ====================================================================== registration and records
def test_the_divergences_plugin_registers_its_names(builtin_host: kd.PluginHost) -> None:
    registry = builtin_host.registries.criteria
    names = {"forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "topk_kl"}
    for name in [*names, "fused_logits"]:
        assert registry.provider(name).plugin == "divergences"
    assert registry.provider("logits").plugin == "criteria"


def test_each_divergence_of_the_table_is_registered_as_its_loss_class(
    builtin_host: kd.PluginHost,
) -> None:
    registry = builtin_host.registries.criteria
    for name, divergence in divergences.DIVERGENCES.items():
        loss = registry.get(name)
        assert loss.divergence == name
        constructor = list(inspect.signature(loss).parameters)
        assert constructor[: len(divergence.parameters)] == list(divergence.parameters)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("jsd", {"beta": 0.25, "temperature": 2.0, "vocab_alignment": "truncate"}),
        ("topk_kl", {"k": 2, "tail_bucket": True, "ignore_index": -1}),
        ("skew_reverse_kl", {"alpha": 0.3, "reduction": "sum"}),
    ],
)
def test_a_model_using_a_divergence_is_saved_and_restored_with_its_arguments(
    criteria: Any, name: str, kwargs: dict[str, Any], tmp_path: Path
) -> None:
    from tests.conftest import TinyNet, make_teacher

    with warnings.catch_warnings():
        warnings.simplefilter("error", kd.NotRecordableWarning)
        model: Any = kd.convert(
            TinyNet(),
            [
                (
                    "kd_loss",
                    {"teacher_model": make_teacher, "criterion": criteria.get(name)(**kwargs)},
                )
            ],
        )
    path = kd.save(model, tmp_path / "run.safetensors")
    restored: Any = kd.restore(TinyNet(), path)
    (loss,) = restored.loss_modules
    assert type(loss) is criteria.get(name)
    assert repr(loss) == repr(model.loss_modules[0])
    batch = torch.randn(5, 4)
    model(batch)
    restored(batch)
    assert torch.equal(restored.compute_kd_loss(), model.compute_kd_loss())


# ====================================================================== fused lm-head loss
def heads(
    hidden: int = 6, teacher_hidden: int = 10, vocab: int = 13, teacher_vocab: int | None = None,
    bias: bool = True,
) -> tuple[nn.Linear, nn.Linear]:  # fmt: skip
    student = nn.Linear(hidden, vocab, bias=bias).double()
    teacher = nn.Linear(teacher_hidden, teacher_vocab or vocab, bias=bias).double()
    return student, teacher


def fused_and_materialised(
    loss: Any,
    name: str,
    hs: torch.Tensor,
    ht: torch.Tensor,
    student: nn.Linear,
    teacher: nn.Linear,
    **call: Any,
) -> None:
    """The fused loss and its gradients (hidden states, weight, bias) against materialised
    logits and the plain (unfused) loss of the same configuration."""
    plain = build(kd.registries().criteria, name, **{
        key: getattr(loss, key) for key in ("temperature", "reduction", "vocab_alignment")
    })  # fmt: skip
    results = []
    for fused in (True, False):
        student.zero_grad()
        h = hs.detach().clone().requires_grad_()
        if fused:
            value = loss(h, ht, lm_heads=(student, teacher), **call)
        else:
            value = plain(student(h), teacher(ht).detach(), **call)
        (value.sum() if value.dim() else value).backward()
        parameters = [student.weight.grad] + (
            [student.bias.grad] if student.bias is not None else []
        )
        results.append((value.detach(), h.grad, *[p.clone() for p in parameters]))  # type: ignore[union-attr]
    torch.testing.assert_close(results[0], results[1], **F64)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_loss_equals_materialised_logits_and_the_plain_loss(
    criteria: Any, name: str, reduction: str
) -> None:
    divergence, kw = NAMES[name]
    loss = criteria.get("fused_logits")(
        divergence=divergence, temperature=1.5, reduction=reduction, chunk_size=4, **kw
    )
    hs, ht = torch.randn(3, 5, 6, dtype=torch.float64), torch.randn(3, 5, 10, dtype=torch.float64)
    fused_and_materialised(loss, name, hs, ht, *heads())


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_fused_loss_with_labels_without_bias_and_with_padded_vocabularies(
    criteria: Any, reduction: str
) -> None:
    hs, ht = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 10, dtype=torch.float64)
    labels = masked_labels()
    for alignment, vocabs in (("truncate", (13, 16)), ("mask", (16, 13)), ("error", (13, 13))):
        loss = criteria.get("fused_logits")(
            divergence="jsd",
            beta=0.3,
            reduction=reduction,
            vocab_alignment=alignment,
            chunk_size=3,
        )
        student, teacher = heads(vocab=vocabs[0], teacher_vocab=vocabs[1], bias=False)
        fused_and_materialised(loss, "jsd", hs, ht, student, teacher, labels=labels)


def test_the_functional_fused_form_equals_materialised_logits() -> None:
    hs = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(7, 10, dtype=torch.float64)
    ws = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(13, 10, dtype=torch.float64)
    fused = fused_linear_divergence(hs, ht, ws, wt, None, None, "skew_kl", alpha=0.3, chunk_size=2)
    grads = torch.autograd.grad(fused, (hs, ws))
    plain = logit_divergence(hs @ ws.t(), ht @ wt.t(), "skew_kl", alpha=0.3)
    torch.testing.assert_close(fused, plain, **F64)
    torch.testing.assert_close(grads, torch.autograd.grad(plain, (hs, ws)), **F64)


def test_fused_loss_in_bfloat16_accumulates_the_weight_gradient_in_float32() -> None:
    torch.manual_seed(0)
    hs = torch.randn(64, 16, dtype=torch.bfloat16, requires_grad=True)
    ht = torch.randn(64, 24, dtype=torch.bfloat16)
    ws = (torch.randn(40, 16) / 4).to(torch.bfloat16).requires_grad_()
    wt = (torch.randn(40, 24) / 5).to(torch.bfloat16)
    fused = fused_linear_divergence(hs, ht, ws, wt, temperature=2.0, chunk_size=8)
    fused.backward()
    assert fused.dtype == torch.float32
    assert hs.grad is not None and hs.grad.dtype == torch.bfloat16
    assert ws.grad is not None and ws.grad.dtype == torch.bfloat16
    h32, w32 = hs.detach().float().requires_grad_(), ws.detach().float().requires_grad_()
    plain = logit_divergence(h32 @ w32.t(), ht.float() @ wt.float().t(), temperature=2.0)
    plain.backward()
    torch.testing.assert_close(fused, plain, atol=1e-2, rtol=2e-2)  # bf16 logits
    torch.testing.assert_close(ws.grad.float(), w32.grad, atol=2e-3, rtol=5e-2)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chunked"])
def test_backward_twice_with_retain_graph_doubles_the_gradient(fused: bool, reduction: str) -> None:
    hs = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(9, 5, dtype=torch.float64)
    ws = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(11, 5, dtype=torch.float64)
    if fused:
        loss = fused_linear_divergence(hs, ht, ws, wt, reduction=reduction, chunk_size=4)
    else:
        loss = logit_divergence(hs @ ws.t(), ht @ wt.t(), reduction=reduction)
    loss.sum().backward(retain_graph=True)
    once = hs.grad.clone()
    loss.sum().backward()
    torch.testing.assert_close(hs.grad, 2 * once, **F64)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.sum().backward()


def test_fused_forward_saves_no_logits_sized_tensor(criteria: Any) -> None:
    student, teacher = heads(hidden=8, teacher_hidden=8, vocab=300)
    hs = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(50, 8, dtype=torch.float64)
    for reduction in ("batchmean", "none"):
        loss = criteria.get("fused_logits")(reduction=reduction, chunk_size=10)
        saved = saved_by_autograd(lambda: loss(hs, ht, lm_heads=(student, teacher)))  # noqa: B023
        assert all(x.numel() < 50 * 300 for x in saved), [x.shape for x in saved]


class TinyLM(nn.Module):
    """Embedding, one hidden layer and an lm head: logits [B, S, V]."""

    def __init__(self, width: int, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Linear(width, width)
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def test_fused_loss_through_convert_binds_the_heads_and_trains_the_student(criteria: Any) -> None:
    torch.manual_seed(0)
    teacher, student = TinyLM(width=12), TinyLM(width=6)
    reference_student = TinyLM(width=6)
    reference_student.load_state_dict(student.state_dict())
    loss = criteria.get("fused_logits")(divergence="jsd", beta=0.4, temperature=2.0, chunk_size=5)
    model: Any = kd.convert(
        student,
        [
            (
                "kd_loss",
                {"teacher_model": teacher, "criterion": {("lm_head:input", "lm_head:input"): loss}},
            )
        ],
    )
    assert loss.bound_heads == (model.lm_head, teacher.lm_head)
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    student_names = [n for n, _ in model.named_parameters() if not n.startswith("_teacher_model.")]
    assert student_names == [n for n, _ in reference_student.named_parameters()]
    ids = torch.randint(0, 11, (3, 7))
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :2] = -100
    model.train()
    model(ids)
    value = model.compute_kd_loss(labels=labels)
    value.backward()
    expected = logit_divergence(
        reference_student(ids), teacher(ids).detach(), "jsd", beta=0.4, temperature=2.0,
        labels=labels,
    )  # fmt: skip
    expected.backward()
    torch.testing.assert_close(value, expected)
    for (name, p), q in zip(model.named_parameters(), reference_student.parameters(), strict=False):
        assert not name.startswith("_")
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_fused_loss_is_saved_and_rebound_on_restore(criteria: Any, tmp_path: Path) -> None:
    from tests.conftest import TinyNet, make_teacher

    with warnings.catch_warnings():
        warnings.simplefilter("error", kd.NotRecordableWarning)
        model: Any = kd.convert(
            TinyNet(),
            [
                (
                    "kd_loss",
                    {
                        "teacher_model": make_teacher,
                        "criterion": {
                            ("fc2:input", "fc2:input"): criteria.get("fused_logits")(
                                divergence="topk_kl", k=2, tail_bucket=True
                            )
                        },
                    },
                )
            ],
        )
    path = kd.save(model, tmp_path / "run.safetensors")
    restored: Any = kd.restore(TinyNet(), path)
    (loss,) = restored.loss_modules
    assert loss.bound_heads == (restored.fc2, restored.teacher_model.fc2)
    assert loss.k == 2
    batch = torch.randn(5, 4)
    model(batch)
    restored(batch)
    assert torch.equal(restored.compute_kd_loss(), model.compute_kd_loss())


def test_fused_loss_errors_name_what_is_wrong(criteria: Any) -> None:
    loss = criteria.get("fused_logits")()
    with pytest.raises(RuntimeError, match="no lm heads.*'lm_head:input'"):
        loss(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(TypeError, match="student layer must be the lm head.*got ReLU"):
        loss.bind_layers(nn.ReLU(), nn.Linear(3, 4))
    student, teacher = heads()
    with pytest.raises(ValueError, match=r"student hidden states \(2, 5\).*\(13, 6\)"):
        loss(torch.randn(2, 5), torch.randn(2, 10), lm_heads=(student, teacher))
    with pytest.raises(ValueError, match=r"\(2, 6\) and teacher hidden states \(3, 10\)"):
        loss(torch.randn(2, 6), torch.randn(3, 10), lm_heads=(student, teacher))
    student, teacher = heads(vocab=13, teacher_vocab=15)
    with pytest.raises(ValueError, match="vocabulary 13 and teacher vocabulary 15 differ"):
        loss(torch.randn(2, 6), torch.randn(2, 10), lm_heads=(student, teacher))
    with pytest.raises(ValueError, match="k is required with divergence='topk_kl'"):
        criteria.get("fused_logits")(divergence="topk_kl")
    with pytest.raises(ValueError, match="k=3 is only used by divergence='topk_kl'"):
        criteria.get("fused_logits")(k=3)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        criteria.get("fused_logits")(chunk_size=0)
