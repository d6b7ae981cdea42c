"""KDTrainer checkpoints of a run trained from a teacher cache record what the cache was written
from; resuming against a cache of another teacher is refused, naming both, before any step."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import kdcore as kd

pytest.importorskip("transformers")

from tests.test_teacher_cache_trainer import K, examples, tiny_llama, train


def cache_of(teacher: torch.nn.Module, folder: Path) -> dict[str, str]:
    data = [{key: value[None] for key, value in e.items()} for e in examples()]
    kd.cache_teacher(teacher, data, folder, top_k=K, temperature=2.0)
    return {"name": "cached", "path": str(folder)}


def test_resuming_from_another_teachers_cache_is_refused(tmp_path: Path) -> None:
    student = tiny_llama(16, seed=2)
    first = cache_of(tiny_llama(32, seed=1), tmp_path / "cache-a")
    other = cache_of(tiny_llama(32, seed=7), tmp_path / "cache-b")  # same data, another teacher
    train(tmp_path / "run", first, copy.deepcopy(student), save_strategy="steps", save_steps=1)
    checkpoint = tmp_path / "run" / "checkpoint-2"

    with pytest.raises(kd.CheckpointMismatchError) as error:
        train(
            tmp_path / "run", other, copy.deepcopy(student), resume_from_checkpoint=str(checkpoint)
        )
    message = str(error.value)
    assert "kdcore_distillation.safetensors" in message
    assert str(tmp_path / "cache-a") in message and str(tmp_path / "cache-b") in message
    assert "teacher_fingerprint" in message


def test_a_moved_cache_of_the_same_teacher_resumes(tmp_path: Path) -> None:
    student = tiny_llama(16, seed=2)
    cached = cache_of(tiny_llama(32, seed=1), tmp_path / "cache")
    whole = train(
        tmp_path / "run", cached, copy.deepcopy(student), save_strategy="steps", save_steps=1
    )
    (tmp_path / "cache").rename(tmp_path / "moved")
    moved = {"name": "cached", "path": str(tmp_path / "moved")}
    resumed = train(
        tmp_path / "run",
        moved,
        copy.deepcopy(student),
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"),
    )
    after = dict(resumed.model.named_parameters())
    for name, parameter in whole.model.named_parameters():
        assert torch.equal(parameter, after[name]), name
