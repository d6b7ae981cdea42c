"""``torchrun --nproc_per_node=2 -m kdcore distill CONFIG``: two gloo processes on CPU take the
same steps as one process on the same global batch, and what they save restores in one process.
Also: DDP- and FSDP2-wrapped models through ``kd.convert``/``kd.export`` in a one-process group."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import kdcore as kd
from kdcore.training import load_job, train
from kdcore.training.distributed import Launch, shard
from kdcore.training.loop import _require_numpy_for_dcp
from tests.conftest import TinyNet, make_teacher
from tests.distributed_job import JOB, Net

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
STEPS = 6


def write_job(folder: Path, name: str, strategy: str = "ddp") -> Path:
    job = folder / f"{name}.toml"
    output = (folder / f"{name}-out").as_posix()
    job.write_text(
        JOB.format(
            optimizer="adam", steps=STEPS, output=output, checkpoint_every=3, strategy=strategy
        )
    )
    return job


def torchrun(job: Path, *options: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "kdcore", "distill"]
    return subprocess.run(
        [*command, str(job), *options],
        cwd=ROOT,  # 'tests.distributed_job:...' resolves from here
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def step_losses(metrics: Path) -> list[dict[str, float]]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    # Throughput is measured, not computed: it differs between any two runs.
    return [
        {key: value for key, value in r.items() if key != "examples_per_second"}
        for r in records
        if "loss" in r
    ]


def max_difference(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    assert [sorted(r) for r in a] == [sorted(r) for r in b] and len(a) == STEPS
    return max(abs(x[key] - y[key]) for x, y in zip(a, b, strict=True) for key in x)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("single")
    modes, config = load_job(write_job(folder, "single"))
    train(modes, config, log=None)
    return folder / "single-out"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("ddp")
    result = torchrun(write_job(folder, "ddp"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder / "ddp-out", result.stdout


def test_two_ddp_processes_take_the_one_process_steps(
    one_process: Path, ddp_run: tuple[Path, str]
) -> None:
    output, _ = ddp_run
    ddp, single = step_losses(output / "metrics.jsonl"), step_losses(one_process / "metrics.jsonl")
    assert max_difference(ddp, single) < 1e-5
    assert [r["examples"] for r in ddp] == [30] * STEPS  # global: 2 micro-batches of 15


def test_only_rank_0_logs(ddp_run: tuple[Path, str]) -> None:
    _, stdout = ddp_run
    assert "2 processes, ddp, global batch 15" in stdout
    assert stdout.count("step 2/6  loss") == 1 and stdout.count("done: 6 steps") == 1


def test_a_ddp_checkpoint_restores_in_one_process(
    one_process: Path, ddp_run: tuple[Path, str]
) -> None:
    output, _ = ddp_run
    assert sorted(p.name for p in output.glob("step-*")) == [
        "step-3.json",
        "step-3.safetensors",
        "step-6.json",
        "step-6.safetensors",
    ]
    assert json.loads((output / "step-6.json").read_text())["world_size"] == 2
    restored = kd.export(kd.restore(Net(), output / "step-6.safetensors"))
    alone = kd.export(kd.restore(Net(), one_process / "step-6.safetensors"))
    student = kd.restore(Net(), output / "student.safetensors")
    for name, tensor in restored.state_dict().items():
        torch.testing.assert_close(tensor, alone.state_dict()[name], atol=1e-5, rtol=0)
        assert torch.equal(tensor, student.state_dict()[name])


def test_a_ddp_checkpoint_resumes_in_one_process(
    tmp_path: Path, one_process: Path, ddp_run: tuple[Path, str]
) -> None:
    output, _ = ddp_run
    modes, config = load_job(write_job(tmp_path, "resumed"))
    result = train(modes, config, resume=output / "step-3.safetensors", log=None)
    single = step_losses(one_process / "metrics.jsonl")
    assert result.steps == STEPS and len(result.losses) == 3
    assert max(abs(a - b["loss"]) for a, b in zip(result.losses, single[3:], strict=True)) < 1e-5


@pytest.mark.slow  # two torchrun launches (~10 s); test_sharded_backends covers FSDP2 shards fast
def test_fsdp2_shards_and_checkpoints_through_torch_dcp(tmp_path: Path, one_process: Path) -> None:
    # torch's multi-process DCP save gathers plans with gather_object, which needs NumPy.
    pytest.importorskip("numpy")
    result = torchrun(write_job(tmp_path, "fsdp", strategy="fsdp2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = tmp_path / "fsdp-out"
    assert "2 processes, fsdp2" in result.stdout
    fsdp, single = step_losses(output / "metrics.jsonl"), step_losses(one_process / "metrics.jsonl")
    assert max_difference(fsdp, single) < 1e-5
    assert (output / "step-6" / "kdcore-dcp.json").is_file()  # a torch-dcp folder
    restored = kd.export(kd.restore(Net(), output / "step-6"))  # both ranks' shards, whole
    student = kd.restore(Net(), output / "student.safetensors")
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, student.state_dict()[name])

    # Resumed under FSDP2 from step 3: the optimizer state is sharded again, the steps the same.
    (output / "metrics.jsonl").unlink()
    resumed = torchrun(tmp_path / "fsdp.toml", "--resume", str(output / "step-3"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    again = step_losses(output / "metrics.jsonl")
    assert [r["step"] for r in again] == [4, 5, 6]
    assert max(abs(a[k] - b[k]) for a, b in zip(again, single[3:], strict=True) for k in a) < 1e-5


def test_fsdp2_without_numpy_is_refused_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(kd.ConfigError, match=r"train\.strategy: 'fsdp2' .* needs NumPy"):
        _require_numpy_for_dcp()


def test_an_unknown_strategy_names_its_path(tmp_path: Path) -> None:
    job = write_job(tmp_path, "bad", strategy="zero3")
    with pytest.raises(
        kd.ConfigError, match=r"train\.strategy: expected one of ddp, fsdp2, got 'zero3'"
    ):
        load_job(job)


@pytest.mark.parametrize(
    ("size", "rank", "rows", "weight"),
    [(15, 0, [0, 1, 2, 3, 4, 5, 6, 7], 2 * 8 / 15), (15, 1, [8, 9, 10, 11, 12, 13, 14], 2 * 7 / 15),
     (1, 1, [0], 0.0)],
)  # fmt: skip
def test_each_rank_takes_its_slice_of_the_global_batch(
    size: int, rank: int, rows: list[int], weight: float
) -> None:
    x = torch.arange(size)
    mine, labels, got = shard((x, x * 10), Launch(rank, 2, rank, "ddp"))
    assert mine.tolist() == rows and labels.tolist() == [r * 10 for r in rows]
    assert got == pytest.approx(weight)


# ---------------------------------------------------------------- wrapped models, one process
@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        gc.collect()  # FSDP2's reference cycles hold the group (see kdcore.training.distributed)
        dist.destroy_process_group()
        gc.collect()


def kd_config() -> list[tuple[str, Any]]:
    return [
        ("kd_loss", {"teacher_model": make_teacher(), "criterion": kd.LogitsDistillationLoss()})
    ]


def test_convert_and_export_see_through_ddp(process_group: None) -> None:
    from torch.nn.parallel import DistributedDataParallel

    student = TinyNet()
    model = kd.convert(DistributedDataParallel(student), kd_config())  # converts the inner one
    assert model is student and hasattr(model, "_kd")
    wrapped = DistributedDataParallel(model)
    wrapped(torch.randn(4, 4))
    assert model.compute_kd_loss().dim() == 0
    exported = kd.export(wrapped)
    assert exported is student and type(exported) is TinyNet and not hasattr(exported, "_kd")


def test_export_of_an_fsdp2_model_gives_a_whole_plain_student(process_group: None) -> None:
    from torch.distributed.fsdp import fully_shard

    student = TinyNet()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    model = kd.convert(student, kd_config())
    fully_shard(model)
    assert hasattr(model.fc1.weight, "placements")  # sharded: DTensors
    exported = kd.export(model)
    assert type(exported) is TinyNet and not hasattr(exported, "_kd")
    assert all(isinstance(p, nn.Parameter) and not hasattr(p, "placements")
               for p in exported.parameters())  # fmt: skip
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, before[name])
    exported(torch.randn(2, 4))  # a plain forward, no collective
