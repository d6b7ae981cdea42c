"""The LLM helpers: causal shift, -100 masks and token normalisation.

The normalisation rule (kdcore.llm): each micro-batch backwards its summed loss over the
step's global token count, times the data-parallel world size. Tested here: accumulating
micro-batches that way equals the full-batch per-token loss (value and gradient, within 1e-6),
while averaging per micro-batch does not; and the count is summed across real ranks (two gloo
processes).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from kdcore_builtins.divergences import logit_divergence

import kdcore as kd
from kdcore import llm

TOL = {"atol": 1e-6, "rtol": 1e-6}


def hf_labels(batch: int, length: int, vocab: int, prompt: int) -> torch.Tensor:
    """Input ids as labels, -100 on the prompt and on right padding of varying length."""
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, :prompt] = -100
    for row in range(batch):
        labels[row, length - row :] = -100
    return labels


# ====================================================================== shifting and masks
def test_causal_shift_pairs_each_logit_row_with_the_next_token() -> None:
    logits, labels = torch.randn(2, 5, 7), torch.arange(10).reshape(2, 5)
    shifted_logits, shifted_labels = llm.causal_shift(logits, labels)
    assert torch.equal(shifted_logits, logits[:, :4]) and torch.equal(shifted_labels, labels[:, 1:])
    assert shifted_logits.data_ptr() == logits.data_ptr()  # views, not copies
    assert shifted_labels.data_ptr() == labels[:, 1:].data_ptr()


def test_causal_shift_refuses_mismatched_shapes_naming_both() -> None:
    with pytest.raises(ValueError, match=r"logits \(2, 5, 7\) and labels \(2, 4\)"):
        llm.causal_shift(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor, got torch.float32"):
        llm.causal_shift(torch.randn(2, 5, 7), torch.zeros(2, 5))


def test_shift_labels_keeps_the_length_and_ignores_the_last_position() -> None:
    labels = torch.tensor([[5, 6, -100, 8], [1, 2, 3, 4]])
    assert torch.equal(
        llm.shift_labels(labels), torch.tensor([[6, -100, 8, -100], [2, 3, 4, -100]])
    )
    assert torch.equal(llm.shift_labels(labels, ignore_index=-1)[:, -1], torch.tensor([-1, -1]))
    assert torch.equal(labels, torch.tensor([[5, 6, -100, 8], [1, 2, 3, 4]]))  # not modified


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "topk_kl"])
def test_shifted_labels_on_full_logits_equal_the_causal_shift_on_sliced_logits(
    divergence: str,
) -> None:
    student, teacher = (
        torch.randn(3, 6, 9, dtype=torch.float64),
        torch.randn(3, 6, 9, dtype=torch.float64),
    )
    labels = hf_labels(3, 6, 9, prompt=2)
    kwargs: dict[str, Any] = {"k": 3} if divergence == "topk_kl" else {}
    full = logit_divergence(student, teacher, divergence, labels=llm.shift_labels(labels), **kwargs)
    s, label_rows = llm.causal_shift(student, labels)
    t, _ = llm.causal_shift(teacher, labels)
    sliced = logit_divergence(s, t, divergence, labels=label_rows, **kwargs)
    torch.testing.assert_close(full, sliced, atol=1e-12, rtol=1e-12)


def test_count_tokens_with_and_without_the_shift() -> None:
    labels = torch.tensor([[-100, 4, 5, -100], [1, -100, 2, 3]])
    assert llm.count_tokens(labels) == 5
    assert llm.count_tokens(labels, shift=True) == 4  # drops the first column: 4 and 1
    assert llm.count_tokens(labels, ignore_index=4) == 7


def test_num_items_in_batch_sums_over_micro_batches_without_distributed() -> None:
    micro = [torch.tensor([[1, -100, 2]]), torch.tensor([[-100, -100, 3], [4, 5, 6]])]
    assert llm.num_items_in_batch(micro) == 6
    assert llm.num_items_in_batch(micro, shift=True) == 4
    assert llm.num_items_in_batch(micro[1]) == 4
    with pytest.raises(ValueError, match="no micro-batch labels"):
        llm.num_items_in_batch([])
    assert llm.data_parallel_world_size() == 1


def test_token_normalized_scales_by_world_size_and_refuses_bad_counts() -> None:
    total = torch.tensor(12.0)
    assert llm.token_normalized(total, 4).item() == 3.0
    assert llm.token_normalized(total, torch.tensor(4), world_size=2).item() == 6.0
    assert llm.token_normalized(torch.tensor(0.0), 0).item() == 0.0
    with pytest.raises(ValueError, match="num_items_in_batch must be >= 0, got -1"):
        llm.token_normalized(total, -1)
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        llm.token_normalized(total, 4, world_size=0)


# ====================================================================== gradient accumulation
SIZES = [1, 4, 2]  # micro-batches of 1, 4 and 2 sequences


def step_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits for 7 sequences of 10 tokens, labels whose micro-batches hold very different
    token counts (the first keeps a single token)."""
    torch.manual_seed(0)
    labels = hf_labels(7, 10, 13, prompt=3)
    labels[0, 3:9] = -100
    return torch.randn(7, 10, 13), torch.randn(7, 10, 13), labels


def accumulate(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, loss_of: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the micro-batches of SIZES, backwarding ``loss_of(s, t, labels)`` for each; return the
    summed loss and the gradient assembled over the whole batch."""
    total, grads = torch.zeros(()), []
    for s, t, mb_labels in zip(
        student.split(SIZES), teacher.split(SIZES), labels.split(SIZES), strict=True
    ):
        s = s.detach().clone().requires_grad_()
        loss = loss_of(s, t, mb_labels)
        loss.backward()
        total += loss.detach()
        grads.append(s.grad)
    return total, torch.cat(grads)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_accumulated_micro_batches_equal_the_full_batch_per_token_loss(divergence: str) -> None:
    student, teacher, labels = step_inputs()
    full_input = student.clone().requires_grad_()
    full = logit_divergence(full_input, teacher, divergence, labels=llm.shift_labels(labels))
    full.backward()

    n = llm.num_items_in_batch(labels.split(SIZES), shift=True)
    assert n == llm.count_tokens(labels, shift=True)
    total, grad = accumulate(
        student,
        teacher,
        labels,
        lambda s, t, mb: logit_divergence(
            s, t, divergence, labels=llm.shift_labels(mb), num_items_in_batch=n
        ),
    )
    torch.testing.assert_close(total, full.detach(), **TOL)
    torch.testing.assert_close(grad, full_input.grad, **TOL)

    # The same with the summed loss and token_normalized (e.g. for the student's cross-entropy).
    total, grad = accumulate(
        student,
        teacher,
        labels,
        lambda s, t, mb: llm.token_normalized(
            logit_divergence(s, t, divergence, labels=llm.shift_labels(mb), reduction="sum"), n
        ),
    )
    torch.testing.assert_close(total, full.detach(), **TOL)
    torch.testing.assert_close(grad, full_input.grad, **TOL)


def test_averaging_per_micro_batch_is_not_the_full_batch_loss() -> None:
    """The pitfall the rule avoids: mean per micro-batch, then over micro-batches, weighs the
    first micro-batch's single token like the others' dozens."""
    student, teacher, labels = step_inputs()
    full = logit_divergence(student, teacher, labels=llm.shift_labels(labels))
    naive, _ = accumulate(
        student,
        teacher,
        labels,
        lambda s, t, mb: logit_divergence(s, t, labels=llm.shift_labels(mb)) / len(SIZES),
    )
    assert abs(naive.item() - full.item()) > 0.05 * full.item()


def test_student_cross_entropy_normalised_the_same_way_accumulates_exactly() -> None:
    student, _, labels = step_inputs()
    shifted = llm.shift_labels(labels)
    full = F.cross_entropy(student.reshape(-1, 13), shifted.reshape(-1))  # mean over kept tokens
    n = llm.num_items_in_batch(labels.split(SIZES), shift=True)
    total, _ = accumulate(
        student,
        student,
        labels,
        lambda s, t, mb: llm.token_normalized(
            F.cross_entropy(s.reshape(-1, 13), llm.shift_labels(mb).reshape(-1), reduction="sum"),
            n,
        ),
    )
    torch.testing.assert_close(total, full, **TOL)


def test_compute_kd_loss_routes_labels_and_num_items_in_batch_to_the_divergence() -> None:
    class TinyLM(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(13, width)
            self.lm_head = torch.nn.Linear(width, 13)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm_head(torch.tanh(self.embed(ids)))

    torch.manual_seed(0)
    teacher, student = TinyLM(16), TinyLM(8)
    model: Any = kd.convert(
        student, [("kd_loss", {"teacher_model": teacher, "criterion": {"name": "jsd"}})]
    )
    ids = torch.randint(0, 13, (7, 10))
    labels = hf_labels(7, 10, 13, prompt=3)
    model.train()
    model(ids)
    full = model.compute_kd_loss(labels=llm.shift_labels(labels))
    n = llm.num_items_in_batch(labels.split(SIZES), shift=True)
    total = torch.zeros(())
    for mb_ids, mb_labels in zip(ids.split(SIZES), labels.split(SIZES), strict=True):
        model(mb_ids)
        total += model.compute_kd_loss(
            labels=llm.shift_labels(mb_labels), num_items_in_batch=n
        ).detach()
    torch.testing.assert_close(total, full.detach(), **TOL)


# ====================================================================== data parallel
def ddp_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states, a shared lm-head weight (the parameter DDP averages), teacher logits and
    labels for the 7 sequences of ``step_inputs``."""
    _, teacher, labels = step_inputs()
    torch.manual_seed(1)
    return torch.randn(7, 10, 6), torch.randn(13, 6), teacher, labels


def ddp_loss(
    hidden: torch.Tensor, weight: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, n: int,
    world_size: int,
) -> torch.Tensor:  # fmt: skip
    summed = logit_divergence(
        hidden @ weight.t(), teacher, labels=llm.shift_labels(labels), reduction="sum"
    )
    return llm.token_normalized(summed, n, world_size=world_size)


def _rank_main(rank: int, init_file: str, results: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        hidden, weight, teacher, labels = ddp_inputs()
        mine = slice(0, 3) if rank == 0 else slice(3, 7)  # ranks with unequal token counts
        micro_batches = [1, 2] if rank == 0 else [2, 2]
        n = llm.num_items_in_batch(labels[mine].split(micro_batches), shift=True)
        weight.requires_grad_()
        total = torch.zeros(())
        for h, t, mb in zip(
            hidden[mine].split(micro_batches),
            teacher[mine].split(micro_batches),
            labels[mine].split(micro_batches),
            strict=True,
        ):
            loss = ddp_loss(h, weight, t, mb, n, llm.data_parallel_world_size())
            loss.backward()  # accumulates into weight.grad
            total += loss.detach()
        assert weight.grad is not None
        grad = weight.grad.clone()
        dist.all_reduce(grad)  # what DDP does to a parameter's gradient: sum over ranks ...
        grad /= dist.get_world_size()  # ... and average
        results[rank] = (n, total / dist.get_world_size(), grad)
    finally:
        dist.destroy_process_group()


def test_counts_are_summed_over_ranks_and_ddp_averaging_is_undone() -> None:
    """Two gloo processes with two micro-batches each and unequal token counts: the all-reduced
    count is the global one, and each micro-batch's sum * world_size / N makes DDP's averaged
    parameter gradient the full-batch per-token one."""
    hidden, weight, teacher, labels = ddp_inputs()
    weight.requires_grad_()
    full = logit_divergence(hidden @ weight.t(), teacher, labels=llm.shift_labels(labels))
    full.backward()

    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(os.path.join(tmp, "init"), results), nprocs=2, join=True)
        (n0, loss0, grad0), (n1, loss1, grad1) = results[0], results[1]
    assert n0 == n1 == llm.count_tokens(labels, shift=True)
    torch.testing.assert_close(loss0 + loss1, full.detach(), **TOL)
    torch.testing.assert_close(grad0, weight.grad, **TOL)
    torch.testing.assert_close(grad1, weight.grad, **TOL)
