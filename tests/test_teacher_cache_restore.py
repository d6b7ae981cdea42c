"""A cache is checked against what a run recorded: kd.restore with the cache of another teacher
given as teacher_model= is refused, and KDTrainer refuses generated steps (on-policy or
teacher-generated) with a cached teacher, which cannot score completions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdcore as kd
from tests.conftest import TinyNet


def cached_student(folder: Path) -> kd.DistillationModel:
    spec = {"teacher_model": {"name": "cached", "path": str(folder)}}
    return kd.convert(
        TinyNet(classes=10), [("kd_loss", {**spec, "criterion": {"name": "topk_kl", "k": 4}})]
    )


def test_restore_refuses_another_teachers_cache_as_teacher_model(tmp_path: Path) -> None:
    data = list(torch.randn(8, 4, generator=torch.Generator().manual_seed(3)).split(4))
    torch.manual_seed(1)
    ours = kd.cache_teacher(TinyNet(width=16, classes=10), data, tmp_path / "ours", top_k=4)
    theirs = kd.cache_teacher(TinyNet(width=16, classes=10), data, tmp_path / "theirs", top_k=4)
    kd.save(cached_student(ours), tmp_path / "run.safetensors")
    moved = tmp_path / "moved"
    ours.rename(moved)  # a moved cache of the same teacher is what teacher_model= is for
    restored = kd.restore(
        TinyNet(classes=10),
        tmp_path / "run.safetensors",
        teacher_model=cached_student(moved).teacher_model,
    )
    assert restored.teacher_model.cache.folder == moved
    with pytest.raises(kd.KDCoreError, match="teacher_fingerprint is .*pass that teacher's cache"):
        kd.restore(
            TinyNet(classes=10),
            tmp_path / "run.safetensors",
            teacher_model=cached_student(theirs).teacher_model,
        )


def test_kdtrainer_refuses_generated_steps_with_a_cached_teacher(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from kdcore_transformers import KDTrainer

    from tests.test_teacher_cache_trainer import CRITERION, K, examples, tiny_llama
    from tests.test_transformers_plugin import arguments

    data = [{key: value[None] for key, value in e.items()} for e in examples(2)]
    cache = kd.cache_teacher(
        tiny_llama(32, seed=1), data, tmp_path / "cache", top_k=K, temperature=2.0
    )
    for fraction in ("on_policy_fraction", "teacher_generated_fraction"):
        with pytest.raises(kd.ConfigError, match="cannot score generated completions"):
            KDTrainer(
                model=tiny_llama(16, seed=2),
                args=arguments(tmp_path, output_dir=str(tmp_path / "run"), max_steps=1),
                kd_config={
                    "teacher_model": {"name": "cached", "path": str(cache)},
                    "criterion": CRITERION,
                },
                train_dataset=examples(2),
                max_new_tokens=4,
                **{fraction: 0.5},
            )


def test_restore_from_a_moved_cache_says_how(tmp_path: Path) -> None:
    data = [torch.randn(4, 4, generator=torch.Generator().manual_seed(3))]
    cache = kd.cache_teacher(TinyNet(width=16, classes=10), data, tmp_path / "cache", top_k=4)
    kd.save(cached_student(cache), tmp_path / "run.safetensors")
    cache.rename(tmp_path / "moved")
    with pytest.raises(kd.TeacherCacheError, match=r"is gone; if it moved, pass kd.restore\("):
        kd.restore(TinyNet(classes=10), tmp_path / "run.safetensors")
