"""The fused lm-head losses keep nothing the size of the vocabulary from forward to backward
(so their activation memory is flat in the vocabulary), whatever weights the losses get after."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from kdcore_builtins.divergences import FusedLogitsLoss, logit_divergence
from torch import nn

VOCAB = 101  # no other width is 101
LABELS = torch.tensor([[3, -100, 1, 0, 7], [-100, -100, 2, 5, 12], [4, 4, -100, 9, 1]])


def heads() -> tuple[nn.Linear, nn.Linear]:
    return nn.Linear(6, VOCAB).double(), nn.Linear(10, VOCAB).double()


def hidden_states() -> tuple[torch.Tensor, torch.Tensor]:
    hs = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    return hs, torch.randn(3, 5, 10, dtype=torch.float64)


def test_the_one_pass_keeps_nothing_vocabulary_sized_for_backward_but_the_heads() -> None:
    student, teacher = heads()
    hs, ht = hidden_states()
    loss = FusedLogitsLoss("jsd", chunk_size=4)
    loss.bind_layers(student, teacher)
    saved: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> Any:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        cross_entropy = loss.student_cross_entropy(hs, ht, LABELS)
        total = 0.3 * loss(hs, ht, LABELS) + 0.7 * cross_entropy
    weights = {p.untyped_storage().data_ptr() for h in (student, teacher) for p in h.parameters()}
    kept = [
        tuple(t.shape)
        for t in saved
        if VOCAB in t.shape and t.untyped_storage().data_ptr() not in weights
    ]
    assert kept == []  # the heads' own weights are referenced, not copied
    total.backward()
    assert student.weight.grad is not None


def test_the_cross_entropy_of_the_one_pass_alone_has_the_plain_gradients() -> None:
    """The divergence from the same pass is never used: only the cross-entropy's gradient."""
    student, teacher = heads()
    hs, ht = hidden_states()
    loss = FusedLogitsLoss("forward_kl", chunk_size=4)
    loss.bind_layers(student, teacher)
    loss.student_cross_entropy(hs, ht, LABELS).backward()
    fused = (hs.grad, student.weight.grad, student.bias.grad)
    for tensor in (hs, student.weight, student.bias):
        tensor.grad = None
    F.cross_entropy(student(hs).flatten(0, 1), LABELS.flatten(), ignore_index=-100).backward()
    plain = (hs.grad, student.weight.grad, student.bias.grad)
    torch.testing.assert_close(fused, plain, atol=1e-12, rtol=1e-10)


def test_the_divergence_alone_per_position_has_the_plain_gradients() -> None:
    student, teacher = heads()
    hs, ht = hidden_states()
    loss = FusedLogitsLoss("reverse_kl", reduction="none", chunk_size=4)
    loss.bind_layers(student, teacher)
    position_weights = torch.rand(3, 5, dtype=torch.float64)
    (loss(hs, ht, LABELS) * position_weights).sum().backward()
    fused = (hs.grad, student.weight.grad, student.bias.grad)
    for tensor in (hs, student.weight, student.bias):
        tensor.grad = None
    plain = logit_divergence(
        student(hs), teacher(ht).detach(), "reverse_kl", reduction="none", labels=LABELS
    )
    (plain * position_weights).sum().backward()
    torch.testing.assert_close(fused, (hs.grad, student.weight.grad, student.bias.grad))
