"""Schulman's k2 estimator of the reverse KL, ``(log r)^2 / 2`` at the sampled token: its value
per token, and its gradient, whose mean over the student's samples is the reverse KL's."""

from __future__ import annotations

import math

import pytest
import torch

import kdcore as kd
from tests.test_onpolicy import VOCAB, sampled_inputs


def sampled_reverse_kl(**options: object) -> torch.nn.Module:
    return kd.registries().criteria.get("sampled_reverse_kl")(estimator="k2", **options)


def test_k2_is_half_the_squared_log_ratio_per_sampled_token_in_float64() -> None:
    student, teacher, labels = sampled_inputs()
    total, count = 0.0, 0
    for row, token in enumerate(labels.flatten().tolist()):
        if token == -100:
            continue
        log_p = torch.log_softmax(student.reshape(-1, VOCAB)[row], -1)[token].item()
        log_q = torch.log_softmax(teacher.reshape(-1, VOCAB)[row], -1)[token].item()
        total += 0.5 * (log_q - log_p) ** 2
        count += 1
    assert math.isclose(
        sampled_reverse_kl()(student, teacher, labels=labels).item(),
        total / count,
        rel_tol=0,
        abs_tol=1e-10,
    )
    summed = sampled_reverse_kl(reduction="sum")(student, teacher, labels=labels)
    assert math.isclose(summed.item(), total, rel_tol=1e-12)
    per_position = sampled_reverse_kl(reduction="none")(student, teacher, labels)
    assert (per_position >= 0).all() and (per_position[labels == -100] == 0).all()


def test_the_mean_k2_gradient_over_student_samples_is_the_reverse_kl_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(VOCAB, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(VOCAB, generator=generator, dtype=torch.float64)
    p, log_p, log_q = student.softmax(-1), student.log_softmax(-1), teacher.log_softmax(-1)
    (exact,) = torch.autograd.grad((p * (log_p - log_q)).sum(), student)
    draws = torch.multinomial(p.detach(), 200_000, replacement=True, generator=generator)
    many = (student.expand(1, len(draws), VOCAB), teacher.expand(1, len(draws), VOCAB))
    sampled_reverse_kl()(*many, labels=draws[None]).backward()
    assert student.grad is not None
    assert torch.allclose(student.grad, exact, atol=0.02 * exact.abs().max().item())
    # k3's mean gradient is another one (the forward KL's), so the check can tell them apart
    k3 = kd.registries().criteria.get("sampled_reverse_kl")(estimator="k3")
    (k3_gradient,) = torch.autograd.grad(k3(*many, labels=draws[None]), student)
    assert not torch.allclose(k3_gradient, exact, atol=0.02 * exact.abs().max().item())


def test_a_misspelt_estimator_lists_k2_among_the_valid_ones() -> None:
    with pytest.raises(kd.ConfigError, match=r"one of k1, k2, k3; got 'k4'"):
        kd.registries().criteria.get("sampled_reverse_kl")(estimator="k4")
