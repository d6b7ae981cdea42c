"""KDTrainer with a cached teacher: only the teacher spec changes, and training from a lossless
cache takes the steps of training with the teacher in the loop (``topk_kl``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import kdcore as kd

transformers = pytest.importorskip("transformers")

from kdcore_transformers import KDTrainer  # noqa: E402

from tests.conftest import tiny_llama_from_config  # noqa: E402
from tests.test_transformers_plugin import arguments  # noqa: E402

VOCAB, LENGTH, K = 128, 9, 16
CRITERION = {"name": "topk_kl", "k": K, "tail_bucket": True, "temperature": 2.0}


def tiny_llama(hidden: int, seed: int) -> Any:
    model = tiny_llama_from_config(vocab=VOCAB, hidden=hidden, seed=seed, layers=1)
    with torch.no_grad():  # sharper than at random, so that losses are O(1), not float32 noise
        model.lm_head.weight.mul_(30.0)
    return model


def examples(n: int = 8) -> list[dict[str, torch.Tensor]]:
    """Sequences whose first 1 to 5 labels are -100 (a prompt)."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    out = []
    for row, prompt in zip(
        ids, torch.randint(1, 6, (n,), generator=generator).tolist(), strict=True
    ):
        labels = row.clone()
        labels[:prompt] = -100
        out.append({"input_ids": row, "labels": labels})
    return out


def train(folder: Path, teacher: Any, student: Any, **overrides: Any) -> KDTrainer:
    resume = overrides.pop("resume_from_checkpoint", None)
    trainer = KDTrainer(
        model=student,
        args=arguments(folder, output_dir=str(folder), max_steps=3, seed=3, **overrides),
        kd_config={"teacher_model": teacher, "criterion": CRITERION},
        train_dataset=examples(),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_kdtrainer_from_a_lossless_cache_takes_the_online_topk_kl_steps(tmp_path: Path) -> None:
    teacher, student = tiny_llama(32, seed=1), tiny_llama(16, seed=2)
    cache = tmp_path / "cache"
    data = [{key: value[None] for key, value in e.items()} for e in examples()]
    kd.cache_teacher(teacher, data, cache, top_k=K, temperature=2.0)

    online = train(tmp_path / "online", teacher, copy.deepcopy(student)).model
    cached = {"name": "cached", "path": str(cache)}
    offline = train(tmp_path / "offline", cached, copy.deepcopy(student)).model
    trained = dict(online.named_parameters()), dict(offline.named_parameters())
    moved = 0.0
    for name, start in student.named_parameters():
        start = start.detach()
        a, b = trained[0][name].detach(), trained[1][name].detach()
        moved = max(moved, float((a - start).abs().max()))
        # float32 noise (the teacher ran on batches of another size when cached), grown by
        # three steps at learning rate 0.5: the parameters moved by up to 4, differ by 5e-6
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    assert moved > 1.0  # three steps moved the student


def test_kdtrainer_resumes_a_run_from_a_cache_to_the_uninterrupted_parameters(
    tmp_path: Path,
) -> None:
    teacher, student = tiny_llama(32, seed=1), tiny_llama(16, seed=2)
    cache = tmp_path / "cache"
    data = [{key: value[None] for key, value in e.items()} for e in examples()]
    kd.cache_teacher(teacher, data, cache, top_k=K, temperature=2.0)
    cached = {"name": "cached", "path": str(cache)}

    whole = train(
        tmp_path / "run", cached, copy.deepcopy(student), save_strategy="steps", save_steps=1
    )
    resumed = train(
        tmp_path / "run",
        cached,
        copy.deepcopy(student),
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"),
    )
    after = dict(resumed.model.named_parameters())
    for name, parameter in whole.model.named_parameters():
        assert torch.equal(parameter, after[name]), name
