"""On-policy sampling under FSDP2 (``fully_shard``) with ``torchrun --nproc_per_node=2`` (gloo,
CPU): a sharded model gathers its parameters in every forward, a collective, so every rank must
run the same number of forward steps even when one rank's rows all stop early.

``KDTrainer`` itself cannot be tested under FSDP here: accelerate enables FSDP for GPU-like
devices only and on CPU wraps the model in DDP instead. So this drives what ``KDTrainer`` does on
an on-policy (or teacher-generated) step, ``llm.generate_completions(..., sync_ranks=True)``
through the meta-model's forward, on a meta-model sharded with ``fully_shard``.

The test runs this file as a module under torchrun."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import kdcore as kd
from kdcore import llm

transformers = pytest.importorskip("transformers")

from tests.test_onpolicy import EOS, tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
MAX_NEW_TOKENS = 6


@pytest.mark.slow  # two processes importing transformers: ~10 s
def test_sharded_ranks_sample_together_and_as_the_unsharded_models_do(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "OUT": str(tmp_path)}
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", __name__]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["sharded"] == rank["unsharded"]
        assert rank["sharded_teacher"] == rank["unsharded_teacher"]
    assert ranks[1]["sharded_teacher"] != ranks[1]["sharded"]
    # rank 0's rows stopped after one token while rank 1 sampled on: the case that needs syncing
    assert ranks[0]["completion_lengths"] == [1, 1]
    assert max(ranks[1]["completion_lengths"]) > 1


def always_stops(model: Any) -> None:
    """Make EOS the model's certain next token."""
    model.lm_head.register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor([EOS]), 50.0)
    )


def meta_model(rank: int) -> Any:
    student, teacher = tiny_llama(), tiny_llama(seed=1, hidden=32)
    if rank == 0:
        always_stops(student)
        always_stops(teacher)
    return kd.convert(
        student, [("kd_loss", {"teacher_model": teacher, "criterion": {"name": "jsd"}})]
    )


def sample(meta: Any, rank: int, *, by_student: bool, sync_ranks: bool) -> dict[str, list[Any]]:
    prompts = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]]) + rank
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    with meta.only_student_forward(by_student), meta.only_teacher_forward(not by_student):
        batch = llm.generate_completions(
            meta,
            prompts,
            mask,
            max_new_tokens=MAX_NEW_TOKENS,
            temperature=0.1,  # tiny random models are nearly uniform: tell teacher and student apart
            eos_token_id=EOS,
            generator=torch.Generator().manual_seed(rank),
            sync_ranks=sync_ranks,
        )
    return {key: value.tolist() for key, value in batch.items()}


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # a rank left waiting in a gather fails the test instead of hanging it
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = torch.distributed.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    sharded, unsharded = meta_model(rank), meta_model(rank)
    for layer in [*sharded.model.layers, *sharded.teacher_model.model.layers]:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    result = {
        "sharded": sample(sharded, rank, by_student=True, sync_ranks=True),
        "unsharded": sample(unsharded, rank, by_student=True, sync_ranks=False),
        "sharded_teacher": sample(sharded, rank, by_student=False, sync_ranks=True),
        "unsharded_teacher": sample(unsharded, rank, by_student=False, sync_ranks=False),
    }
    labels = torch.tensor(result["sharded"]["labels"])
    result["completion_lengths"] = (labels != llm.IGNORE_INDEX).sum(-1).tolist()
    (Path(os.environ["OUT"]) / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()  # joined before exit, or gloo's threads may abort the process
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
