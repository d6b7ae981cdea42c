"""A teacher cache written under ``torchrun --nproc_per_node=2`` (gloo, CPU): one shard set per
rank, merged into one manifest, serving every example as a one-process cache does; a rank
killed mid-run resumes from its own complete shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdcore as kd
from kdcore.cli import main
from kdcore.plugin import TeacherCache
from kdcore.training import load_job
from kdcore.training.loop import epoch_batches
from tests.teacher_cache_ranks import data, teacher
from tests.test_teacher_cache_torchrun import torchrun, write_job


def assert_same_answers(cache: Path, reference: Path, inputs: torch.Tensor) -> None:
    got, expected = TeacherCache(cache).lookup(inputs), TeacherCache(reference).lookup(inputs)
    assert got.covered.all()
    for name in ("indices", "logits", "logsumexp", "tail_logsumexp"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@pytest.mark.slow
def test_cache_teacher_under_torchrun_writes_a_shard_set_per_rank_and_one_manifest(
    tmp_path: Path,
) -> None:
    job = write_job(tmp_path, "online", None)
    argv = ["cache-teacher", str(job), "--top-k", "3", "--examples-per-shard", "8"]
    assert main([argv[0], argv[1], str(tmp_path / "one"), *argv[2:]]) == 0
    run = torchrun("-m", "kdcore", argv[0], argv[1], str(tmp_path / "two"), *argv[2:])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

    shards = json.loads((tmp_path / "two" / "manifest.json").read_text())["shards"]
    files = sorted(shard["file"] for shard in shards)
    assert {name.split("-")[1] for name in files} == {"rank0", "rank1"}
    assert files == sorted(path.name for path in (tmp_path / "two").glob("shard-*"))
    assert run.stdout.count("coverage: ") == 1  # rank 0 alone reports
    _, config = load_job(job)
    inputs = torch.cat([x for x, _ in epoch_batches(config)])
    assert_same_answers(tmp_path / "two", tmp_path / "one", inputs)


@pytest.mark.slow
def test_a_rank_killed_while_caching_resumes_from_its_own_shards(tmp_path: Path) -> None:
    cache, script = tmp_path / "cache", "tests.teacher_cache_ranks"  # -m: the root on sys.path
    killed = torchrun("-m", script, str(cache), "3")  # rank 1 dies at its 4th batch
    assert killed.returncode != 0
    listed = json.loads((cache / "manifest-rank1.json").read_text())["shards"]
    assert [shard["examples"] for shard in listed] == [3, 3, 3]  # its first 3 batches
    (tmp_path / "ran-rank1.txt").unlink()

    resumed = torchrun("-m", script, str(cache))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    ran = (tmp_path / "ran-rank1.txt").read_text().split()
    assert ran == ["3", "3"]  # its last 2 batches only
    kd.cache_teacher(teacher(), data(), tmp_path / "one", top_k=4, examples_per_shard=3)
    assert_same_answers(cache, tmp_path / "one", torch.cat(data()))
