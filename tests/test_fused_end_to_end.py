"""LLM distillation without full-vocabulary logits: the fused lm-head losses paired with the
final hidden states and named heads, the student's fused cross-entropy (alone and in the
divergence's pass), and ``KDTrainer`` skipping both models' heads; all against the plain path
that materialises the logits.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from kdcore_builtins.divergences import (
    FusedLogitsLoss,
    fused_linear_cross_entropy,
    logit_divergence,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import kdcore as kd
from kdcore import llm

transformers = pytest.importorskip("transformers")

from kdcore_transformers import KDTrainer  # noqa: E402

from tests.conftest import tiny_llama_from_config  # noqa: E402

F64 = {"atol": 1e-12, "rtol": 1e-10}
VOCAB, LENGTH = 101, 33  # no other width is 101; a micro-batch holds more positions than one
LABELS = torch.tensor([[3, -100, 1, 0, 7], [-100, -100, 2, 5, 12], [4, 4, -100, 9, 1]])


def tiny_llama(hidden: int = 32, seed: int = 0, vocab: int = VOCAB, tied: bool = False) -> Any:
    return tiny_llama_from_config(vocab=vocab, hidden=hidden, seed=seed, tied=tied)


def examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences whose first 1 to 6 labels are -100 (a prompt), so token counts differ."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    prompt = torch.randint(1, 7, (n,), generator=generator)
    out = []
    for row, p in zip(ids, prompt.tolist(), strict=True):
        labels = row.clone()
        labels[:p] = -100
        out.append({"input_ids": row, "labels": labels})
    return out


def head_pair(
    student_vocab: int = 13, teacher_vocab: int = 13, bias: bool = True
) -> tuple[nn.Linear, nn.Linear]:
    return nn.Linear(6, student_vocab, bias=bias).double(), nn.Linear(
        10, teacher_vocab, bias=bias
    ).double()


def named_heads(**loss: Any) -> dict[str, Any]:
    return {"name": "fused_logits", "student_head": "lm_head", "teacher_head": "lm_head", **loss}


# ====================================================================== the fused cross-entropy
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("reduction", "num_items"), [("mean", None), ("mean", 40), ("sum", None)])
def test_fused_cross_entropy_equals_cross_entropy_of_materialised_logits(
    bias: bool, reduction: str, num_items: int | None
) -> None:
    hs = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(6, 13, bias=bias).double()
    fused = fused_linear_cross_entropy(
        hs, head.weight, LABELS, head.bias, reduction=reduction,
        num_items_in_batch=num_items, chunk_size=4,
    )  # fmt: skip
    inputs = [hs, *head.parameters()]
    fused_grads = torch.autograd.grad(fused, inputs)
    plain = F.cross_entropy(head(hs).flatten(0, 1), LABELS.flatten(), reduction="sum")
    plain = plain / (num_items or int((LABELS != -100).sum())) if reduction == "mean" else plain
    torch.testing.assert_close(fused, plain, **F64)
    torch.testing.assert_close(fused_grads, torch.autograd.grad(plain, inputs), **F64)


def test_fused_cross_entropy_in_bfloat16_accumulates_in_float32() -> None:
    hs = torch.randn(64, 16).to(torch.bfloat16).requires_grad_()
    ws = (torch.randn(40, 16) / 4).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 40, (64,))
    fused = fused_linear_cross_entropy(hs, ws, labels, chunk_size=8)
    fused.backward()
    assert fused.dtype == torch.float32 and ws.grad is not None and ws.grad.dtype == torch.bfloat16
    h32, w32 = hs.detach().float().requires_grad_(), ws.detach().float().requires_grad_()
    plain = F.cross_entropy((hs.detach() @ ws.detach().t()).float(), labels)
    F.cross_entropy(h32 @ w32.t(), labels).backward()
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)  # the same bf16 logits
    torch.testing.assert_close(ws.grad.float(), w32.grad, atol=2e-3, rtol=5e-2)


def test_a_label_outside_the_vocabulary_is_refused_naming_it() -> None:
    labels = LABELS.clone()
    labels[2, 4] = 13
    with pytest.raises(
        ValueError, match="label 13 is not a token of the student's vocabulary of 13"
    ):
        fused_linear_cross_entropy(torch.randn(3, 5, 6), torch.randn(13, 6), labels)


# ====================================================================== one pass: divergence + CE
@pytest.mark.parametrize(
    ("divergence", "alignment", "vocabs"),
    [
        ("forward_kl", "error", (13, 13)),
        ("reverse_kl", "truncate", (13, 16)),
        ("jsd", "mask", (16, 13)),
    ],
)
def test_one_pass_gives_the_divergence_and_the_cross_entropy_of_the_plain_path(
    divergence: str, alignment: str, vocabs: tuple[int, int]
) -> None:
    student, teacher = head_pair(*vocabs)
    hs = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(3, 5, 10, dtype=torch.float64)
    loss = FusedLogitsLoss(divergence, temperature=2.0, vocab_alignment=alignment, chunk_size=4)
    loss.bind_layers(student, teacher)
    inputs = [hs, *student.parameters()]
    for accumulated in (None, 30):  # a micro-batch's share of a gradient-accumulation step
        ce = loss.student_cross_entropy(hs, ht, LABELS, num_items_in_batch=accumulated)
        kd_loss = loss(hs, ht, LABELS, num_items_in_batch=accumulated)
        fused = torch.autograd.grad(0.3 * kd_loss + 0.7 * ce, inputs)

        logits = student(hs)
        kept = accumulated or int((LABELS != -100).sum())
        plain_kd = logit_divergence(
            logits, teacher(ht), divergence, temperature=2.0, vocab_alignment=alignment,
            labels=LABELS, num_items_in_batch=accumulated,
        )  # fmt: skip
        plain_ce = F.cross_entropy(logits.flatten(0, 1), LABELS.flatten(), reduction="sum") / kept
        plain = torch.autograd.grad(0.3 * plain_kd + 0.7 * plain_ce, inputs)
        torch.testing.assert_close((kd_loss, ce), (plain_kd, plain_ce), **F64)
        torch.testing.assert_close(fused, plain, **F64)


def test_the_divergence_is_computed_afresh_for_other_arguments() -> None:
    student, teacher = head_pair()
    hs, ht = torch.randn(3, 5, 6, dtype=torch.float64), torch.randn(3, 5, 10, dtype=torch.float64)
    loss = FusedLogitsLoss("forward_kl")
    loss.bind_layers(student, teacher)
    loss.student_cross_entropy(hs, ht, LABELS)
    other = torch.randn(3, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(
        loss(other, ht, LABELS), logit_divergence(student(other), teacher(ht), labels=LABELS), **F64
    )


# ====================================================================== named heads in kd.convert
def test_named_heads_let_a_plain_convert_user_skip_the_heads_with_logits_to_keep() -> None:
    student, teacher = tiny_llama(), tiny_llama(hidden=48, seed=1)
    reference = copy.deepcopy(student)
    batch = examples(3, seed=2)
    ids = torch.stack([e["input_ids"] for e in batch])
    labels = llm.shift_labels(torch.stack([e["labels"] for e in batch]))
    model = kd.convert(student, [("kd_loss", {
        "teacher_model": teacher,
        "criterion": {("model.norm", "model.norm"): named_heads(divergence="jsd", chunk_size=5)},
    })])  # fmt: skip
    output = model(input_ids=ids, logits_to_keep=1)  # neither model runs its head on every token
    assert output.logits.shape == (3, 1, VOCAB)
    fused = model.compute_kd_loss(labels=labels)
    fused.backward()

    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    plain = logit_divergence(reference(input_ids=ids).logits, teacher_logits, "jsd", labels=labels)
    plain.backward()
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)
    trained = dict(student.named_parameters())
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(trained[name].grad, parameter.grad, atol=1e-6, rtol=1e-4)


def test_a_misspelled_head_name_is_refused_naming_the_config_path_and_the_closest_layer() -> None:
    student = tiny_llama()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = {
        "teacher_model": tiny_llama(seed=1),
        "criterion": {("model.norm", "model.norm"): {**named_heads(), "student_head": "lm_haed"}},
    }
    with pytest.raises(kd.UnknownLayerError) as error:
        kd.convert(student, [("kd_loss", config)])
    message = str(error.value)
    assert "kd_loss.criterion[0].loss" in message and "'lm_haed'" in message
    assert "did you mean 'lm_head'?" in message
    assert type(student) is transformers.LlamaForCausalLM
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_naming_one_head_only_is_refused() -> None:
    with pytest.raises(kd.ConfigError, match="name both lm heads"):
        kd.convert(tiny_llama(), [("kd_loss", {
            "teacher_model": tiny_llama(seed=1),
            "criterion": {("model.norm", "model.norm"): {"name": "fused_logits",
                                                         "student_head": "lm_head"}},
        })])  # fmt: skip


def test_named_heads_are_recorded_and_rebound_on_restore(tmp_path: Path) -> None:
    config = {
        "teacher_model": tiny_llama(seed=1),
        "criterion": {("model.norm", "model.norm"): named_heads(temperature=2.0)},
    }
    model = kd.convert(tiny_llama(), [("kd_loss", config)])
    kd.save(model, tmp_path / "run.safetensors")
    restored = kd.restore(
        tiny_llama(seed=3), tmp_path / "run.safetensors", teacher_model=tiny_llama(seed=1)
    )
    (loss,) = restored.loss_modules
    assert (loss.student_head, loss.teacher_head) == ("lm_head", "lm_head")
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    restored(input_ids=ids, logits_to_keep=1)
    assert restored.compute_kd_loss().isfinite()


# ====================================================================== KDTrainer
class LogitsProbe(TorchDispatchMode):
    """Records every tensor an operation makes whose last dimension is the vocabulary and whose
    storage holds at least ``rows`` such rows: a [tokens, vocab] allocation (views of smaller
    tensors, such as a head's weight expanded over a batch, do not count)."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = rows
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.dim() >= 2
                and tensor.shape[-1] == VOCAB
                and tensor.untyped_storage().nbytes() >= self.rows * VOCAB * tensor.element_size()
            ):
                self.seen.append((str(func), tuple(tensor.shape)))
        return out


def train(
    tmp_path: Path, criterion: dict[Any, Any], steps: int, probe: LogitsProbe | None = None,
    tied: bool = False, checkpointing: bool = False, kd_loss_weight: Any = 0.6,
) -> tuple[Any, Any]:  # fmt: skip
    student = tiny_llama(tied=tied)
    if checkpointing:
        enable = getattr(student, "activation_checkpointing_enable", None)  # transformers >= 5.2
        (enable or student.gradient_checkpointing_enable)({"use_reentrant": False})
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 0.5,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "seed": 0,
    }
    trainer = KDTrainer(
        model=student,
        args=transformers.TrainingArguments(**settings),
        kd_config={
            "teacher_model": tiny_llama(hidden=48, seed=1, tied=tied),
            "criterion": criterion,
            "loss_balancer": {"name": "static", "kd_loss_weight": kd_loss_weight},
        },
        train_dataset=examples(4 * steps, seed=5),
    )
    with probe if probe is not None else contextlib.nullcontext():
        result = trainer.train()
    return trainer, result


PLAIN = {("", ""): {"name": "forward_kl", "temperature": 2.0}}
FUSED = {("model.norm", "model.norm"): named_heads(temperature=2.0, chunk_size=4)}


@pytest.mark.parametrize(
    ("tied", "checkpointing"),
    [(False, False), (False, True), (True, False)],
    ids=["untied", "gradient-checkpointing", "tied-embeddings"],
)
def test_kdtrainer_with_the_fused_criterion_trains_as_the_plain_path(
    tmp_path: Path, tied: bool, checkpointing: bool
) -> None:
    plain, plain_result = train(tmp_path / "plain", PLAIN, steps=3, tied=tied)
    fused, fused_result = train(
        tmp_path / "fused", FUSED, steps=3, tied=tied, checkpointing=checkpointing
    )
    assert fused_result.training_loss == pytest.approx(plain_result.training_loss, rel=1e-5)
    expected = dict(plain.model.named_parameters())
    for name, parameter in fused.model.named_parameters():
        torch.testing.assert_close(parameter, expected[name], atol=1e-5, rtol=1e-5)


def test_kdtrainer_with_the_fused_criterion_never_allocates_tokens_by_vocabulary(
    tmp_path: Path,
) -> None:
    positions = 2 * LENGTH  # one micro-batch
    plain_probe, fused_probe = LogitsProbe(positions), LogitsProbe(positions)
    train(tmp_path / "plain", PLAIN, steps=1, probe=plain_probe)
    train(tmp_path / "fused", FUSED, steps=1, probe=fused_probe)
    assert plain_probe.seen  # the probe sees the plain path's logits
    assert fused_probe.seen == []


def test_the_student_trained_with_the_fused_criterion_reloads_with_its_head(tmp_path: Path) -> None:
    trainer, _ = train(tmp_path, FUSED, steps=1)
    head = trainer.model.lm_head.weight.detach().clone()
    trainer.export_student(str(tmp_path / "student"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert torch.equal(reloaded.lm_head.weight, head)
    assert reloaded(input_ids=torch.randint(0, VOCAB, (1, 4))).logits.shape == (1, 4, VOCAB)


def test_a_second_backward_with_retain_graph_gives_the_same_gradients() -> None:
    student, teacher = head_pair()
    hs = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(3, 5, 10, dtype=torch.float64)
    loss = FusedLogitsLoss("jsd", chunk_size=4)
    loss.bind_layers(student, teacher)
    ce = loss.student_cross_entropy(hs, ht, LABELS)
    total = 0.4 * loss(hs, ht, LABELS) + 0.6 * ce
    first = torch.autograd.grad(total, [hs, student.weight], retain_graph=True)
    second = torch.autograd.grad(total, [hs, student.weight])
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_kdtrainer_evaluates_the_fused_criterion_as_the_plain_one(tmp_path: Path) -> None:
    metrics = []
    for name, criterion in (("plain", PLAIN), ("fused", FUSED)):
        trainer, _ = train(tmp_path / name, criterion, steps=1)
        trainer.eval_dataset = examples(3, seed=6)
        metrics.append(trainer.evaluate())
    for key in ("eval_loss", "eval_student_loss"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-5), key


def test_kdtrainer_keeps_the_heads_when_another_loss_captures_them(tmp_path: Path) -> None:
    criterion = {
        **FUSED,
        ("lm_head:input", "lm_head:input"): {"name": "fused_logits", "divergence": "tvd"},
    }
    probe = LogitsProbe(2 * LENGTH)
    _, result = train(tmp_path, criterion, steps=1, probe=probe, kd_loss_weight=[0.4, 0.2])
    assert probe.seen  # the heads ran on every position, so the second pair saw every one
    assert math.isfinite(result.training_loss)


# ====================================================================== FSDP2
@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    dist = pytest.importorskip("torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        gc.collect()  # FSDP2's reference cycles hold the group
        dist.destroy_process_group()
        gc.collect()


@pytest.mark.parametrize(
    "own_units", [False, True], ids=["heads-in-the-root", "heads-sharded-alone"]
)
def test_fsdp2_sharded_heads_are_gathered_for_the_loss_and_released_after(
    process_group: None, own_units: bool
) -> None:
    from torch.distributed.fsdp import fully_shard

    student, teacher = tiny_llama(), tiny_llama(hidden=48, seed=1)
    reference = copy.deepcopy(student)
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    labels = llm.shift_labels(ids)
    model = kd.convert(student, [("kd_loss", {"teacher_model": teacher, "criterion": FUSED})])
    units = [*model.model.layers]
    if own_units:  # resharded after their own forward: the loss must gather them
        units += [model.lm_head, model.teacher_model.lm_head]
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    model(input_ids=ids, logits_to_keep=1)
    fused = model.compute_kd_loss(labels=labels)
    if own_units:
        assert hasattr(model.teacher_model.lm_head.weight, "placements")  # released
    fused.backward()
    assert hasattr(model.lm_head.weight, "placements")  # released after backward

    with torch.no_grad():
        teacher_logits = tiny_llama(hidden=48, seed=1)(input_ids=ids).logits
    plain = logit_divergence(
        reference(input_ids=ids).logits, teacher_logits, temperature=2.0, labels=labels
    )
    plain.backward()
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)
    sharded = dict(model.named_parameters())
    for name, parameter in reference.named_parameters():
        grad = sharded[name].grad
        assert grad is not None, name
        torch.testing.assert_close(grad.full_tensor(), parameter.grad, atol=1e-6, rtol=1e-4)
