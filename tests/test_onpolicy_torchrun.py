"""On-policy KDTrainer under ``torchrun --nproc_per_node=2`` (gloo, CPU): a run resumed from a
checkpoint ends with the parameters of the uninterrupted two-process run (each rank samples from
the seed, the step, its rank and the micro-batch, so no RNG state needs saving).

The test runs this file as a module under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdcore_transformers import KDTrainer  # noqa: E402

from tests.conftest import exit_torchrun_worker  # noqa: E402
from tests.test_onpolicy import prompt_examples, tiny_llama, training_arguments  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def run(folder: Path, max_steps: int, resume: str | None = None) -> dict[str, list[float]]:
    student = tiny_llama()
    trainer = KDTrainer(
        model=student,
        args=training_arguments(folder, max_steps=max_steps, save_strategy="steps", save_steps=2),
        kd_config={"teacher_model": tiny_llama(seed=1, hidden=32), "criterion": {"name": "jsd"}},
        train_dataset=prompt_examples(16),
        on_policy_fraction=1.0,
        max_new_tokens=4,
    )
    trainer.train(resume_from_checkpoint=resume)
    return {name: p.detach().flatten().tolist() for name, p in student.named_parameters()}


@pytest.mark.slow  # two processes importing transformers, three runs each: ~20 s
def test_two_ranks_resume_an_on_policy_run_to_the_uninterrupted_parameters(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "OUT": str(tmp_path)}
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", __name__]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "parameters.json").read_text())
    assert runs["uninterrupted"].keys() == runs["resumed"].keys()
    for name, values in runs["uninterrupted"].items():
        assert values == runs["resumed"][name], name  # bit for bit
    assert runs["uninterrupted"] != runs["first_half"]  # the second half trained


def main() -> None:
    out = Path(os.environ["OUT"])
    runs: dict[str, Any] = {
        "uninterrupted": run(out / "whole", 4),
        "first_half": run(out / "half", 2),
    }
    runs["resumed"] = run(out / "half", 4, resume=str(out / "half" / "run" / "checkpoint-2"))
    if int(os.environ["RANK"]) == 0:
        (out / "parameters.json").write_text(json.dumps(runs))
    exit_torchrun_worker()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
