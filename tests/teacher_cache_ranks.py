"""Run by tests/test_teacher_cache_torchrun_write.py under ``torchrun --nproc_per_node=2``:
``kd.cache_teacher`` over the same 10 batches on each rank, into ``argv[1]``. With ``argv[2]``
= N, rank 1 is killed (no cleanup) on reaching its N-th batch. Each rank appends the number of
examples its teacher ran to ``argv[1]/../ran-rankR.txt``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import kdcore as kd
from tests.conftest import TinyNet


def teacher() -> TinyNet:
    torch.manual_seed(7)
    return TinyNet(width=16, classes=10)


def data() -> list[torch.Tensor]:
    return list(torch.randn(30, 4, generator=torch.Generator().manual_seed(3)).split(3))


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    folder = Path(sys.argv[1])
    kill_at = int(sys.argv[2]) if len(sys.argv) > 2 else None
    model = teacher()
    ran = folder.parent / f"ran-rank{rank}.txt"

    def count(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        with ran.open("a") as file:
            file.write(f"{args[0].shape[0]}\n")

    model.register_forward_hook(count)

    def batches():  # type: ignore[no-untyped-def]
        for number, batch in enumerate(data()):
            if rank == 1 and number // 2 == kill_at:  # rank 1's kill_at-th batch
                os._exit(9)
            yield batch

    kd.cache_teacher(model, batches(), folder, top_k=4, examples_per_shard=3, log=print)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
