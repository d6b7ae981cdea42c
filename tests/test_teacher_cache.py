"""Offline distillation: ``kd.cache_teacher`` writes a teacher's sparse distribution once, the
``cached`` teacher loader serves it by example, and ``topk_kl``/``forward_kl`` train from it."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import kdcore as kd
from kdcore import llm
from tests.conftest import TinyNet, tiny_llama_from_config

CLASSES = 10


def sharp_teacher() -> TinyNet:
    """A teacher far from the student, so that losses are O(1), not float32 noise."""
    teacher = TinyNet(width=16, classes=CLASSES)
    with torch.no_grad():
        teacher.fc2.weight.mul_(4.0)
    return teacher


def classifier_data(n: int = 24, batch: int = 6) -> list[torch.Tensor]:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(3))
    return list(x.split(batch))


def cached(path: Path) -> dict[str, Any]:
    return {"name": "cached", "path": str(path)}


def loss_and_grads(
    student: torch.nn.Module, teacher: Any, criterion: dict[str, Any], batch: Any, **kwargs: Any
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = kd.convert(
        copy.deepcopy(student), [("kd_loss", {"teacher_model": teacher, "criterion": criterion})]
    )
    if isinstance(batch, dict):
        model(input_ids=batch["input_ids"])
    else:
        model(batch)
    loss = model.compute_kd_loss(**kwargs)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return loss.detach(), grads


def assert_close(online: Any, offline: Any, rtol: float = 1e-6) -> None:
    (a, ga), (b, gb) = online, offline
    torch.testing.assert_close(b, a, rtol=rtol, atol=0.0)
    assert len(ga) == len(gb) > 0
    for x, y in zip(ga, gb, strict=True):  # relative to the gradient's norm: entries near 0
        assert float((y - x).norm() / x.norm()) <= rtol  # are float32 noise in either run


@pytest.mark.parametrize("tail_bucket", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_lossless_cache_trains_a_classifier_as_online_topk_kl(
    tmp_path: Path, tail_bucket: bool, temperature: float
) -> None:
    teacher, student = sharp_teacher(), TinyNet(classes=CLASSES)
    data = classifier_data()
    kd.cache_teacher(teacher, data, tmp_path, top_k=4, temperature=temperature)
    criterion = {"name": "topk_kl", "k": 4, "tail_bucket": tail_bucket, "temperature": temperature}
    for batch in data:
        assert_close(
            loss_and_grads(student, teacher, criterion, batch),
            loss_and_grads(student, cached(tmp_path), criterion, batch),
        )


def test_a_cache_of_k_entries_serves_a_smaller_k(tmp_path: Path) -> None:
    teacher, student = sharp_teacher(), TinyNet(classes=CLASSES)
    data = classifier_data()
    kd.cache_teacher(teacher, data, tmp_path, top_k=6)
    criterion = {"name": "topk_kl", "k": 3, "tail_bucket": True}
    assert_close(
        loss_and_grads(student, teacher, criterion, data[0]),
        loss_and_grads(student, cached(tmp_path), criterion, data[0]),
    )


def test_forward_kl_on_a_cache_of_the_whole_vocabulary_is_the_forward_kl(tmp_path: Path) -> None:
    teacher, student = sharp_teacher(), TinyNet(classes=CLASSES)
    data = classifier_data()
    kd.cache_teacher(teacher, data, tmp_path, top_k=CLASSES)
    criterion = {"name": "forward_kl"}
    assert_close(
        loss_and_grads(student, teacher, criterion, data[1]),
        loss_and_grads(student, cached(tmp_path), criterion, data[1]),
    )


def test_forward_kl_on_a_truncated_cache_sums_the_kept_terms(tmp_path: Path) -> None:
    teacher, student = sharp_teacher(), TinyNet(classes=CLASSES)
    x = classifier_data()[0]
    kd.cache_teacher(teacher, [x], tmp_path, top_k=3)
    loss, _ = loss_and_grads(student, cached(tmp_path), {"name": "forward_kl"}, x)
    with torch.no_grad():
        lq, lp = teacher(x).log_softmax(-1), student(x).log_softmax(-1)
    top = lq.topk(3, -1)
    expected = (top.values.exp() * (top.values - lp.gather(-1, top.indices))).sum() / x.shape[0]
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0.0)


def test_batches_are_found_in_any_order_and_composition(tmp_path: Path) -> None:
    teacher, student = sharp_teacher(), TinyNet(classes=CLASSES)
    data = classifier_data()
    kd.cache_teacher(teacher, data, tmp_path, top_k=4, examples_per_shard=5)
    rows = list(torch.cat(data))
    random.Random(0).shuffle(rows)
    shuffled = torch.stack(rows[:7])
    criterion = {"name": "topk_kl", "k": 4, "tail_bucket": True}
    assert_close(
        loss_and_grads(student, teacher, criterion, shuffled),
        loss_and_grads(student, cached(tmp_path), criterion, shuffled),
    )


def test_an_example_missing_from_the_cache_is_an_error(tmp_path: Path) -> None:
    teacher, student = sharp_teacher(), TinyNet(classes=CLASSES)
    kd.cache_teacher(teacher, classifier_data(), tmp_path, top_k=4)
    model = kd.convert(
        student,
        [
            (
                "kd_loss",
                {"teacher_model": cached(tmp_path), "criterion": {"name": "topk_kl", "k": 4}},
            )
        ],
    )
    with pytest.raises(
        kd.TeacherCacheError, match="example 0 of the batch .* is not in the teacher cache"
    ):
        model(torch.randn(2, 4))


@pytest.mark.parametrize("criterion", [{"name": "topk_kl", "k": 8}, {"name": "reverse_kl"}])
def test_a_cache_refuses_what_it_cannot_answer(tmp_path: Path, criterion: dict[str, Any]) -> None:
    teacher, student = sharp_teacher(), TinyNet(classes=CLASSES)
    data = classifier_data()
    kd.cache_teacher(teacher, data, tmp_path, top_k=4)
    model = kd.convert(
        student, [("kd_loss", {"teacher_model": cached(tmp_path), "criterion": criterion})]
    )
    model(data[0])
    with pytest.raises(
        kd.KDCoreError, match="k=8, but the teacher cache|use 'topk_kl' or 'forward_kl'"
    ):
        model.compute_kd_loss()


def test_a_temperature_other_than_the_caches_is_refused(tmp_path: Path) -> None:
    teacher, student = sharp_teacher(), TinyNet(classes=CLASSES)
    data = classifier_data()
    kd.cache_teacher(teacher, data, tmp_path, top_k=4, temperature=2.0)
    criterion = {"name": "topk_kl", "k": 4, "temperature": 1.0}
    model = kd.convert(
        student, [("kd_loss", {"teacher_model": cached(tmp_path), "criterion": criterion})]
    )
    model(data[0])
    with pytest.raises(kd.KDCoreError, match="at temperature 2.0"):
        model.compute_kd_loss()


def test_top_p_keeps_the_smallest_prefix_reaching_p(tmp_path: Path) -> None:
    teacher, student = sharp_teacher(), TinyNet(classes=CLASSES)
    data = classifier_data()
    kd.cache_teacher(teacher, data, tmp_path, top_k=CLASSES, top_p=0.5)
    model = kd.convert(
        student,
        [
            (
                "kd_loss",
                {
                    "teacher_model": cached(tmp_path),
                    "criterion": {"name": "topk_kl", "k": CLASSES, "tail_bucket": True},
                },
            )
        ],
    )
    output = model.teacher_model(data[0])
    q = teacher(data[0]).softmax(-1)
    kept = output.logits.isfinite()
    for row in range(q.shape[0]):
        probs = q[row].sort(descending=True).values
        n = int(kept[row].sum())
        assert probs[: n - 1].sum() < 0.5 <= probs[:n].sum() + 1e-6
    model(data[0])
    loss = model.compute_kd_loss()
    loss.backward()
    assert loss.isfinite() and all(p.grad.isfinite().all() for p in student.parameters())


# ---- a tiny causal LM ----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
VOCAB, LENGTH = 128, 9


def tiny_llama(hidden: int, seed: int) -> Any:
    model = tiny_llama_from_config(vocab=VOCAB, hidden=hidden, seed=seed, layers=1)
    with torch.no_grad():  # sharper than at random, so that losses are O(1), not float32 noise
        model.lm_head.weight.mul_(30.0)
    return model


def lm_batches(n: int = 8, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    labels = ids.clone()
    for row, prompt in enumerate(torch.randint(1, 6, (n,), generator=generator).tolist()):
        labels[row, :prompt] = -100
    return [
        {"input_ids": ids_, "labels": labels_}
        for ids_, labels_ in zip(ids.split(batch), labels.split(batch), strict=True)
    ]


@pytest.mark.parametrize("tail_bucket", [True, False])
def test_lossless_cache_trains_a_causal_lm_as_online_topk_kl(
    tmp_path: Path, tail_bucket: bool
) -> None:
    teacher, student = tiny_llama(32, seed=1), tiny_llama(16, seed=2)
    data = lm_batches()
    kd.cache_teacher(teacher, data, tmp_path, top_k=16, temperature=2.0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in data)
    assert sum(s["positions"] for s in manifest["shards"]) == labelled  # -100 positions skipped
    criterion = {"name": "topk_kl", "k": 16, "tail_bucket": tail_bucket, "temperature": 2.0}
    for batch in data:
        labels = llm.shift_labels(batch["labels"])
        assert_close(
            loss_and_grads(student, teacher, criterion, batch, labels=labels),
            loss_and_grads(student, cached(tmp_path), criterion, batch, labels=labels),
        )


def test_positions_the_cache_skipped_are_refused_without_labels(tmp_path: Path) -> None:
    teacher, student = tiny_llama(32, seed=1), tiny_llama(16, seed=2)
    data = lm_batches()
    kd.cache_teacher(teacher, data, tmp_path, top_k=4)
    model = kd.convert(
        student,
        [
            (
                "kd_loss",
                {"teacher_model": cached(tmp_path), "criterion": {"name": "topk_kl", "k": 4}},
            )
        ],
    )
    model(input_ids=data[0]["input_ids"])
    with pytest.raises(kd.KDCoreError, match="positions to distil are not in the teacher cache"):
        model.compute_kd_loss()
