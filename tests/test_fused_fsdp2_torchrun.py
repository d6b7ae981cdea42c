"""The fused lm-head losses under FSDP2 with two ranks (``torchrun --nproc_per_node=2``, gloo,
CPU): both models' heads are ``fully_shard``-ed as their own units, so the fused loss gathers each
head for the loss (the teacher's again for backward) and releases it after; the losses and the
parameters after a few SGD steps equal one process's plain path (both models' logits, the two
ranks' micro-batches averaged as FSDP averages their gradients) within 1e-5.

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
import torch.nn.functional as F
from kdcore_builtins.divergences import logit_divergence

import kdcore as kd
from kdcore import llm
from tests.conftest import tiny_llama_from_config

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
VOCAB, LENGTH, STEPS, RANKS = 101, 17, 3, 2
KD_WEIGHT, TEMPERATURE, LEARNING_RATE = 0.6, 2.0, 0.5
FUSED = {
    ("model.norm", "model.norm"): {
        "name": "fused_logits",
        "temperature": TEMPERATURE,
        "student_head": "lm_head",
        "teacher_head": "lm_head",
        "chunk_size": 8,
    }
}


def models() -> tuple[Any, Any]:
    student = tiny_llama_from_config(vocab=VOCAB, hidden=32, seed=0)
    return student, tiny_llama_from_config(vocab=VOCAB, hidden=48, seed=1)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s micro-batch of step ``step``: a prompt of -100 labels of its own length."""
    generator = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=generator)
    labels = llm.shift_labels(ids)
    labels[:, : 2 + rank + step] = -100
    return ids, labels


def fsdp2_run(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    student, teacher = models()
    model = kd.convert(student, [("kd_loss", {
        "teacher_model": teacher,
        "criterion": FUSED,
        "loss_balancer": {"name": "static", "kd_loss_weight": KD_WEIGHT},
    })])  # fmt: skip
    (loss_module,) = model.loss_modules
    heads = (model.lm_head, model.teacher_model.lm_head)
    for unit in (*model.model.layers, *model.teacher_model.model.layers, *heads):
        fully_shard(unit)
    fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], LEARNING_RATE)
    losses, released = [], True
    for step in range(STEPS):
        ids, labels = batch(step, rank)
        model(input_ids=ids, logits_to_keep=1)
        state = model.kd_state
        student_loss = loss_module.student_cross_entropy(
            state.student_outputs["model.norm"], state.teacher_outputs["model.norm"], labels
        )
        loss = model.compute_kd_loss(student_loss=student_loss, labels=labels)
        released &= hasattr(heads[1].weight, "placements")  # the teacher's, after the loss
        loss.backward()
        released &= all(hasattr(head.weight, "placements") for head in heads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    parameters = {
        name: p.full_tensor().detach().flatten().tolist()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    return {"losses": losses, "parameters": parameters, "released": released}


def plain_run() -> dict[str, Any]:
    """One process, both models' logits: each rank's micro-batch loss, their mean stepped."""
    student, teacher = models()
    optimizer = torch.optim.SGD(student.parameters(), LEARNING_RATE)
    losses: list[list[float]] = [[] for _ in range(RANKS)]
    for step in range(STEPS):
        total = torch.zeros(())
        for rank in range(RANKS):
            ids, labels = batch(step, rank)
            logits = student(input_ids=ids).logits
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids).logits
            kd_loss = logit_divergence(
                logits, teacher_logits, temperature=TEMPERATURE, labels=labels
            )
            cross_entropy = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            loss = KD_WEIGHT * kd_loss + (1 - KD_WEIGHT) * cross_entropy
            losses[rank].append(float(loss.detach()))
            total = total + loss / RANKS
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
    parameters = {name: p.detach().flatten().tolist() for name, p in student.named_parameters()}
    return {"losses": losses, "parameters": parameters}


@pytest.mark.slow  # two processes importing transformers: ~20 s
def test_two_fsdp2_ranks_with_sharded_heads_train_as_one_process_on_the_plain_path(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "OUT": str(tmp_path)}
    command = [TORCHRUN, "--standalone", f"--nproc_per_node={RANKS}", "-m", __name__]
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(RANKS)]
    plain = plain_run()
    for rank, run in enumerate(runs):
        assert run["released"], rank
        assert run["losses"] == pytest.approx(plain["losses"][rank], rel=1e-5), rank
        for name, values in plain["parameters"].items():
            torch.testing.assert_close(
                torch.tensor(run["parameters"][name]),
                torch.tensor(values),
                atol=1e-5,
                rtol=1e-5,
                msg=lambda message, name=name: f"{name}: {message}",
            )


def main() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run = fsdp2_run(rank)
    (Path(os.environ["OUT"]) / f"rank{rank}.json").write_text(json.dumps(run))
    dist.barrier()  # joined before exit, or gloo's threads may abort the process
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
