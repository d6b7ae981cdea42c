"""A teacher cache survives a kill, and checkpoints trained from one record which cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kdcore as kd
from tests.conftest import TinyNet

ROOT = Path(__file__).resolve().parents[1]


def teacher(seed: int = 7) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(width=16, classes=10)


def data() -> list[torch.Tensor]:
    return list(torch.randn(30, 4, generator=torch.Generator().manual_seed(3)).split(3))


KILLED_RUN = """
import os, torch, kdcore as kd
from tests.conftest import TinyNet
from tests.test_teacher_cache_resume import data, teacher

def batches():
    for number, batch in enumerate(data()):
        if number == {kill_at}:
            os._exit(9)  # killed: no cleanup, no flush
        yield batch

kd.cache_teacher(teacher(), batches(), {path!r}, top_k=4, examples_per_shard=4)
"""


def test_a_killed_run_resumes_after_its_last_complete_shard(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    script = KILLED_RUN.format(kill_at=5, path=str(path))  # 15 examples seen, 3 shards of 4
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=dict(os.environ)
    )
    assert run.returncode == 9
    manifest = json.loads((path / "manifest.json").read_text())
    assert [shard["examples"] for shard in manifest["shards"]] == [4, 4, 4]

    resumed = teacher()
    seen: list[int] = []
    resumed.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    kd.cache_teacher(resumed, data(), path, top_k=4, examples_per_shard=4)
    assert sum(seen) == 30 - 12  # only the examples not in a complete shard ran again

    kd.cache_teacher(teacher(), data(), tmp_path / "whole", top_k=4, examples_per_shard=4)
    spec = {"name": "topk_kl", "k": 4, "tail_bucket": True}
    losses = []
    for folder in (path, tmp_path / "whole"):
        torch.manual_seed(0)
        model = kd.convert(
            TinyNet(classes=10),
            [
                (
                    "kd_loss",
                    {"teacher_model": {"name": "cached", "path": str(folder)}, "criterion": spec},
                )
            ],
        )
        model(torch.cat(data()))
        losses.append(model.compute_kd_loss())
    assert torch.equal(losses[0], losses[1])


def test_resuming_with_other_arguments_is_refused(tmp_path: Path) -> None:
    kd.cache_teacher(teacher(), data()[:2], tmp_path, top_k=4)
    with pytest.raises(kd.TeacherCacheError, match="top_k=4, not 5"):
        kd.cache_teacher(teacher(), data(), tmp_path, top_k=5)
    with pytest.raises(kd.TeacherCacheError, match="teacher="):
        kd.cache_teacher(teacher(seed=8), data(), tmp_path, top_k=4)


def convert_cached(folder: Path) -> torch.nn.Module:
    spec = {"name": "topk_kl", "k": 4}
    return kd.convert(
        TinyNet(classes=10),
        [
            (
                "kd_loss",
                {"teacher_model": {"name": "cached", "path": str(folder)}, "criterion": spec},
            )
        ],
    )


def test_save_and_restore_a_student_trained_from_a_cache(tmp_path: Path) -> None:
    kd.cache_teacher(teacher(), data(), tmp_path / "cache", top_k=4)
    model = convert_cached(tmp_path / "cache")
    model(data()[0])
    expected = model.compute_kd_loss()
    kd.save(model, tmp_path / "ckpt")
    restored = kd.restore(TinyNet(classes=10), tmp_path / "ckpt")
    restored(data()[0])
    assert torch.equal(restored.compute_kd_loss(), expected)


def test_restore_refuses_a_cache_written_by_another_teacher(tmp_path: Path) -> None:
    kd.cache_teacher(teacher(), data(), tmp_path / "cache", top_k=4)
    kd.save(convert_cached(tmp_path / "cache"), tmp_path / "ckpt")
    for file in (tmp_path / "cache").iterdir():
        file.unlink()
    kd.cache_teacher(teacher(seed=8), data(), tmp_path / "cache", top_k=4)
    student = TinyNet(classes=10)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(
        kd.KDCoreError, match="teacher_fingerprint is '[0-9a-f]+' there, '[0-9a-f]+' recorded"
    ):
        kd.restore(student, tmp_path / "ckpt")
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
