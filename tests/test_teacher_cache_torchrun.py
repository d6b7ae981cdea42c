"""A teacher cache under ``torchrun --nproc_per_node=2`` (gloo, CPU): each rank finds its own
share of every batch in the cache, and the run takes the one-process steps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdcore as kd
from kdcore.cli import main
from kdcore.training import load_job, train
from tests.distributed_job import JOB, Net

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
FITNET = """[[kd_loss.criterion]]
student = "hidden"
teacher = "hidden"
loss = { name = "fitnet", student_width = 8, teacher_width = 24 }
"""


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` from the repository root."""
    return subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def write_job(folder: Path, name: str, cache: Path | None) -> Path:
    """tests/test_distributed.py's job with its logits criterion only, no loggers, and the
    teacher from ``cache`` when given."""
    text = (
        JOB.format(
            optimizer="adam",
            steps=4,
            output=(folder / f"{name}-out").as_posix(),
            checkpoint_every=0,
            strategy="ddp",
        )
        .replace(FITNET, "")
        .replace("[0.5, 0.1]", "0.5")
        .replace("[train]\n", "[train]\nloggers = []\n", 1)
    )
    if cache is not None:
        text = text.replace(
            '{ name = "callable", target = "tests.distributed_job:teacher" }',
            f'{{ name = "cached", path = "{cache.as_posix()}" }}',
        ).replace(
            '{ name = "logits", temperature = 2.0 }',
            '{ name = "topk_kl", k = 3, tail_bucket = true, temperature = 2.0 }',
        )
    job = folder / f"{name}.toml"
    job.write_text(text)
    return job


@pytest.mark.slow
def test_two_gloo_ranks_train_from_a_cache_as_one_process(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert (
        main(
            [
                "cache-teacher",
                str(write_job(tmp_path, "online", None)),
                str(cache),
                "--top-k",
                "3",
                "--temperature",
                "2.0",
            ]
        )
        == 0
    )
    modes, config = load_job(write_job(tmp_path, "single", cache))
    train(modes, config, log=None)

    run = torchrun("-m", "kdcore", "distill", str(write_job(tmp_path, "ddp", cache)))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ddp = kd.restore(Net(), tmp_path / "ddp-out" / "student.safetensors").state_dict()
    single = kd.restore(Net(), tmp_path / "single-out" / "student.safetensors").state_dict()
    for name, tensor in ddp.items():
        torch.testing.assert_close(tensor, single[name], atol=1e-5, rtol=0)
