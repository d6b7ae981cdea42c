"""``kdcore cache-teacher JOB OUTPUT`` caches a job's teacher on its training data; the same job
then trains from the cache with only its teacher_model changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcore.cli import main
from kdcore.training import load_job, train
from tests.test_distill import write_job as write_distill_job


def write_job(folder: Path, **kwargs: int) -> Path:
    """test_distill's job, without loggers (this command writes none)."""
    job = write_distill_job(folder, **kwargs)
    job.write_text(job.read_text().replace("[train]\n", "[train]\nloggers = []\n", 1))
    return job


def test_cache_teacher_caches_the_jobs_training_data_and_the_job_trains_from_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, steps=4, every=0)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", str(job), str(cache), "--top-k", "3"]) == 0
    assert "coverage: 72 examples, 72 positions" in capsys.readouterr().out

    cached = f'{{ name = "cached", path = "{cache.as_posix()}" }}'
    text = (
        job.read_text()
        .replace('{ name = "callable", target = "tests.conftest:make_teacher" }', cached)
        .replace('{ name = "logits", temperature = 2.0 }', '{ name = "topk_kl", k = 3 }')
    )
    job.write_text(text)
    modes, config = load_job(job)
    result = train(modes, config, log=None, save=False)
    assert result is not None


def test_cache_teacher_prints_a_line_per_shard_and_resumes_saying_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, steps=4, every=0)
    cache = tmp_path / "cache"
    argv = ["cache-teacher", str(job), str(cache), "--top-k", "3", "--examples-per-shard", "32"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    shards = [line for line in lines if line.startswith("shard ")]
    assert [line.split(":")[0] for line in shards] == ["shard 1", "shard 2", "shard 3"]
    assert shards[0].startswith("shard 1: 32 examples written, ") and " s)" in shards[0]
    assert main(argv) == 0  # everything cached: nothing written again
    again = capsys.readouterr().out.splitlines()
    assert again[0] == f"resuming {cache}: 72 examples cached already"
    assert not [line for line in again if line.startswith("shard ")]


def test_cache_teacher_names_the_job_file_in_its_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path)
    code = main(["cache-teacher", str(job), str(tmp_path / "cache"), "--compression", "zip"])
    assert code != 0
    err = capsys.readouterr().err
    assert str(job) in err and "'zip'" in err and "compressed" in err
