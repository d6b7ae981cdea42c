"""KDTrainer's evaluation under ``torchrun``: accelerate repeats examples to even out the last
batch across the ranks, and ``eval_loss``/``eval_student_loss`` leave them out, as transformers'
own evaluation loop does (``gather_for_metrics``), so two processes report what one does.

The test runs this file as a module under ``torchrun --nproc_per_node=2`` (gloo, on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

from kdcore_transformers import KDTrainer  # noqa: E402

from tests.conftest import exit_torchrun_worker  # noqa: E402
from tests.test_transformers_plugin import arguments, examples, tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
BATCH = 4  # a rank; 8 a round
#: 13 examples: the last round holds 5, so the second rank repeats 3 of its 4 rows;
#: 9: the last round holds 1, so the second rank's last batch is all repeats
EXAMPLES = (13, 9)


def evaluate(output: Path, examples_count: int) -> dict[str, float]:
    trainer = KDTrainer(
        model=tiny_llama(),
        args=arguments(output, per_device_eval_batch_size=BATCH),
        kd_config={
            "teacher_model": tiny_llama(hidden=64, seed=1),
            "criterion": {"name": "forward_kl", "temperature": 2.0},
            "loss_balancer": {"name": "static", "kd_loss_weight": 0.7},
        },
        eval_dataset=examples(examples_count, seed=11),
    )
    return trainer.evaluate()


@pytest.mark.slow  # two processes importing transformers: ~15 s
def test_two_ranks_report_the_one_process_eval_losses_on_an_uneven_dataset(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "OUT": str(tmp_path)}
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", __name__]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two_ranks = json.loads((tmp_path / "metrics.json").read_text())
    for count in EXAMPLES:
        one_process = evaluate(tmp_path / "single", count)
        for key in ("eval_loss", "eval_student_loss"):
            assert two_ranks[str(count)][key] == pytest.approx(one_process[key], rel=1e-6), (
                count,
                key,
            )


def main() -> None:
    out = Path(os.environ["OUT"])
    metrics: dict[int, Any] = {count: evaluate(out / "ranks", count) for count in EXAMPLES}
    if int(os.environ["RANK"]) == 0:
        (out / "metrics.json").write_text(json.dumps(metrics))
    exit_torchrun_worker()


if __name__ == "__main__":
    main()
