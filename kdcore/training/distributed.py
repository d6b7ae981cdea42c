"""Data-parallel training for ``torchrun --nproc_per_node=N -m kdcore distill CONFIG``.

torchrun starts N copies of the command and tells each who it is through ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``); :func:`launch` reads them and
joins the process group (gloo on CPU, nccl on CUDA). ``[train] batch_size`` is the **global**
batch: every rank draws the same batch and keeps its own contiguous slice of it
(:func:`shard`), so that a run on N processes takes the same optimizer steps as one process
would, whatever N.

Exactness: each rank's losses are means over its slice. Before ``backward`` a rank scales its
loss by ``world_size * local_examples / global_examples``; DDP (and FSDP2) average gradients
over ranks, so the step is the one-process step on the whole batch, unequal slices included.
(Where the student loss skips unlabelled examples, its mean is over each slice's labelled
examples, so slices with different labelled shares weigh slightly differently.)
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import nn

from kdcore import ConfigError

#: The environment variables torchrun sets for each process.
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@attrs.frozen
class Launch:
    """Who this process is in the job. One process: rank 0 of 1, no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str | None = None  # "ddp" | "fsdp2" when distributed

    @property
    def distributed(self) -> bool:
        return self.strategy is not None

    @property
    def main(self) -> bool:
        """Whether this process logs and writes single-writer files."""
        return self.rank == 0


def launched_by_torchrun(environ: Any = os.environ) -> bool:
    return all(name in environ for name in LAUNCH_VARIABLES)


@contextlib.contextmanager
def launch(strategy: str, device: str) -> Iterator[Launch]:
    """Join the process group torchrun describes (or reuse one already joined), yield who this
    process is, and leave the group on exit if this call joined it. Without torchrun (and no
    group): a single process."""
    import torch.distributed as dist

    joined = dist.is_available() and dist.is_initialized()
    if not joined and not launched_by_torchrun():
        yield Launch()
        return
    if not dist.is_available():
        raise ConfigError(
            "torchrun launched this job but this torch has no torch.distributed",
            path="train.strategy",
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not joined:
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        created = True
    try:
        yield Launch(dist.get_rank(), dist.get_world_size(), local_rank, strategy)
    finally:
        if created:
            # FSDP2 leaves reference cycles (modules, their hooks, the device mesh) that hold a
            # process group; freed only at interpreter exit, its gloo threads die taking the GIL
            # and abort the process. Collected here, while the interpreter still runs.
            gc.collect()
            dist.destroy_process_group()
            gc.collect()


def device_of(config_device: str, job: Launch) -> torch.device:
    """``cuda`` means this process's GPU (``cuda:LOCAL_RANK``) in a distributed job."""
    device = torch.device(config_device)
    if job.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", job.local_rank)
    return device


def shard(batch: tuple[Any, Any], job: Launch) -> tuple[Any, Any, float]:
    """This rank's contiguous slice of a global batch, and the weight its mean losses get
    (``world_size * local / global``). A rank left without examples (a last batch smaller than
    the world) runs one example with weight 0, so that it still joins the gradient exchange."""
    x, y = batch
    if not job.distributed:
        return x, y, 1.0
    total = len(x)
    pieces = [torch.tensor_split(t, job.world_size)[job.rank] for t in (x, y)]
    local = len(pieces[0])
    if local == 0:
        return x[:1], y[:1], 0.0
    return pieces[0], pieces[1], job.world_size * local / total


def wrap(model: nn.Module, job: Launch, device: torch.device) -> nn.Module:
    """DDP around the whole distillation model, or FSDP2 shards of teacher and student."""
    if not job.distributed:
        return model
    if job.strategy == "fsdp2":
        return shard_fsdp2(model, job, device)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_fsdp2(model: nn.Module, job: Launch, device: torch.device) -> nn.Module:
    """``fully_shard`` the teacher (its own unit: gathered for its forward, then freed), then
    the rest: student, learnable loss modules and balancer, as the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from kdcore.plugin import is_distillation_model

    mesh = init_device_mesh(device.type, (job.world_size,))
    if is_distillation_model(model):
        fully_shard(model.teacher_model, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def no_gradient_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync`` for all but the last micro-batch of an accumulated step."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()  # type: ignore[no-any-return,operator]


def all_reduce_sum(values: list[float], job: Launch) -> list[float]:
    """Sum ``values`` over ranks (one collective for the list)."""
    if not job.distributed:
        return values
    import torch.distributed as dist

    backend_cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if backend_cuda else None
    buffer = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buffer)
    return [float(v) for v in buffer.cpu()]


def barrier(job: Launch) -> None:
    if job.distributed:
        import torch.distributed as dist

        dist.barrier()
