"""The training loop behind ``kdcore distill``.

The data contract: ``data()`` (the ``[train] data`` callable) takes no arguments and returns
``(train, validation)``. Each is a ``torch.utils.data.Dataset`` whose items are ``(x, y)``
pairs, or an iterable of ``(x, y)`` batches (a ``DataLoader``); ``validation`` may be ``None``.
``y`` holds class indices for the cross-entropy student loss; ``-1`` marks an unlabelled
example, which the student loss skips and the distillation losses still use. For a
``Dataset`` the loop draws batches itself, shuffled with a generator seeded by
``seed + epoch``, so that ``--resume`` continues exactly; a loader given as it is must be
deterministic per epoch for that to hold.

The loss is ``model.compute_kd_loss(student_loss=..., return_terms=True)``'s: the balancer's
total, or without a balancer the single KD loss (``student_loss`` is then logged, not trained).

A checkpoint is ``<output>/step-<N>.safetensors`` (``kd.save`` with the optimizer; under
FSDP2 a ``step-<N>`` torch-dcp folder) plus ``step-<N>.json`` next to it: the step counter,
the CPU RNG state and the job, as plain JSON (:mod:`kdcore.training.resume`). Every step's
losses and every validation accuracy go to ``<output>/metrics.jsonl``
(:mod:`kdcore.training.metrics`), drawn into ``metrics.png`` at the end when matplotlib is
installed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from kdcore import CheckpointMismatchError, ConfigError, ConfigTypeError
from kdcore.plugin import gather_fsdp2, is_distillation_model
from kdcore.training.config import EVALUATIONS, TrainConfig
from kdcore.training.distributed import (
    Launch,
    all_reduce_sum,
    barrier,
    device_of,
    launch,
    no_gradient_sync,
    shard,
    shard_fsdp2,
    wrap,
)
from kdcore.training.metrics import (
    METRICS_NAME,
    PLOT_NAME,
    VALIDATION_KEY,
    RunRecords,
    losses_of,
    open_loggers,
    plot_metrics,
    read_history,
)
from kdcore.training.progress import Progress, summary
from kdcore.training.resume import check_job, job_record, read_state, write_state

IGNORE_LABEL = -1
STUDENT_LOSS = "student_loss"


@attrs.define
class TrainResult:
    """What :func:`train` returns (on every rank of a distributed job)."""

    model: nn.Module  # the trained model (a distillation model when there were modes)
    student: nn.Module  # the exported student (whole, also after FSDP2)
    steps: int
    losses: list[float]  # the total loss of every optimizer step of this run (global batch)
    validation_accuracy: float | None  # at the last step
    seconds: float
    checkpoint: Path | None
    student_path: Path | None
    validation: list[tuple[int, float]] = attrs.Factory(list)  # (step, accuracy) of this run
    metrics: Path | None = None  # <output>/metrics.jsonl
    plot: Path | None = None  # <output>/metrics.png, when matplotlib is installed
    rank: int = 0
    world_size: int = 1


def train(
    modes: list[tuple[str, Any]],
    config: TrainConfig,
    *,
    student: Callable[[], nn.Module] | None = None,
    data: Callable[[], Any] | None = None,
    resume: str | Path | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    log: Callable[[str], None] | None = print,
    save: bool = True,
    stream: TextIO | None = None,
    force: bool = False,
) -> TrainResult:
    """Train ``student()`` distilled with ``modes`` (plain supervised training when empty).

    ``student`` and ``data`` default to resolving ``config.student`` and ``config.data``.
    ``on_step(step, losses)`` runs after each optimizer step. Ctrl-C (``KeyboardInterrupt``)
    saves a checkpoint of the last finished step, then propagates. With ``save``, writes
    ``<output>/metrics.jsonl``, checkpoints, the exported student and the plot.

    ``resume`` continues from a checkpoint that :func:`train` saved, refusing one saved with
    other settings (see :mod:`kdcore.training.resume`) unless ``force``, and one past the
    job's last step.

    Progress goes to ``log``; when ``log`` is ``print`` and ``stream`` (default stdout) is a
    terminal, as a bar redrawn in place. Under torchrun (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``
    set) the job runs data-parallel as ``config.strategy`` says (see
    :mod:`kdcore.training.distributed`); only rank 0 logs and writes single-writer files.
    """
    with launch(config.strategy, config.device) as job, contextlib.ExitStack() as cleanup:
        return _train(
            job, cleanup, modes, config, student, data, resume, on_step, log, save, stream, force
        )


def _train(
    job: Launch,
    cleanup: contextlib.ExitStack,
    modes: list[tuple[str, Any]],
    config: TrainConfig,
    student: Callable[[], nn.Module] | None,
    data: Callable[[], Any] | None,
    resume: str | Path | None,
    on_step: Callable[[int, dict[str, float]], None] | None,
    log: Callable[[str], None] | None,
    save: bool,
    stream: TextIO | None,
    force: bool,
) -> TrainResult:
    import kdcore as kd

    def quiet(_line: str) -> None:
        pass

    say = log if log is not None and job.main else quiet
    start = time.perf_counter()
    make_student = student or job_factory(config, "student")
    make_data = data or job_factory(config, "data")
    device = device_of(config.device, job)
    output = Path(config.output)
    fsdp = job.strategy == "fsdp2"
    if fsdp and save and job.world_size > 1:
        _require_numpy_for_dcp()
    record = job_record(modes, config)
    if resume is not None:  # checked before anything is built
        resume = Path(resume)
        saved = read_state(resume)
        for change in check_job(resume, saved.job, record, force):
            say(f"resuming with a changed setting (--force): {change}")

    torch.manual_seed(config.seed)
    built = make_student()
    if not isinstance(built, nn.Module):
        raise ConfigTypeError(
            f"returned {type(built).__name__}, not a module", path="train.student"
        )
    train_data, validation = _split(make_data())
    model = kd.convert(built, modes) if modes else built
    model.to(device)
    if fsdp:  # before the optimizer: its parameters become the shards
        shard_fsdp2(model, job, device)
    optimizer = _optimizer(config, model.parameters())
    if job.distributed:
        say(f"{job.world_size} processes, {job.strategy}, global batch {config.batch_size}")

    step = 0
    if resume is not None:
        try:
            kd.restore(model, resume, optimizer=optimizer)  # shards the state for FSDP2
        except CheckpointMismatchError as exc:
            raise ConfigError(
                f"--resume {resume}: the checkpoint does not fit this job's model (saved by "
                "another job?); resume from a checkpoint this job saved"
            ) from exc
        step = saved.step
        torch.set_rng_state(torch.tensor(saved.rng, dtype=torch.uint8))
        say(f"resumed from {resume} at step {step}")
    forward = model if fsdp else wrap(model, job, device)  # DDP around the model

    batches_per_epoch = _batches_per_epoch(train_data, config.batch_size)
    if config.steps is not None:
        total = config.steps
    else:
        total = max(1, (config.epochs or 1) * batches_per_epoch // config.grad_accumulation)
    if step > total:
        length = "train.steps" if config.steps is not None else "train.epochs"
        raise ConfigError(
            f"--resume {resume}: the checkpoint is at step {step}, past the job's {total} steps; "
            f"to continue the run, raise {length} (to more than {step} steps)"
        )
    eval_every = config.eval_every
    if eval_every is None:
        eval_every = max(1, total // EVALUATIONS)
    micro = step * config.grad_accumulation
    batches = _batches(train_data, config, micro, batches_per_epoch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    resumed_at = step if resume is not None else None
    records = RunRecords(
        open_loggers(config.loggers, output, resume_at=resumed_at, resumed_from=resume)
        if save and job.main
        else [],
        history=read_history(resume, resumed_at),
    )
    cleanup.callback(records.close)  # also when the run fails
    progress = Progress(
        total=total,
        start=step,
        every=config.log_every,
        say=say,
        stream=stream,
        tty=None if log is print and job.main else False,
    )
    losses: list[float] = []
    points: list[tuple[int, float]] = []
    parts: dict[str, float] | None = None
    checkpoint: Path | None = None
    checkpoint_step = -1
    rng = torch.get_rng_state()  # as of the last finished step: what a checkpoint stores
    step_started = time.perf_counter()
    try:
        while step < total:
            forward.train()
            optimizer.zero_grad()
            sums: dict[str, float] = {}
            examples = 0
            for index in range(config.grad_accumulation):
                x, y = next(batches)
                examples += len(x)
                x, y, weight = shard((x, y), job)
                x, y = x.to(device), y.to(device)
                with no_gradient_sync(forward, last=index == config.grad_accumulation - 1):
                    with autocast:
                        total_loss, terms = _losses(forward, model, x, y)
                    (total_loss * weight / config.grad_accumulation).backward()
                # Each rank's mean, weighted by its share of the batch: summed over ranks, the
                # mean over the global batch.
                share = weight / job.world_size / config.grad_accumulation
                for key, value in [("loss", total_loss), *terms.items()]:
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) * share
            optimizer.step()
            step += 1
            rng = torch.get_rng_state()
            parts = dict(zip(sums, all_reduce_sum(list(sums.values()), job), strict=True))
            losses.append(parts["loss"])
            now = time.perf_counter()
            records.log(
                {
                    "step": step,
                    **parts,
                    "lr": optimizer.param_groups[0]["lr"],
                    "examples": examples,
                    "examples_per_second": examples / max(now - step_started, 1e-9),
                }
            )
            step_started = now
            if on_step is not None:
                on_step(step, parts)
            progress.update(step, parts, examples=examples)
            due = step == total or (eval_every and step % eval_every == 0)
            if validation is not None and due:
                points.append(_validate(model, validation, config, device, step, records))
            if save and config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoint = _checkpoint(
                    model, optimizer, output, step, rng, job, record, progress.note
                )
                checkpoint_step = step
    except KeyboardInterrupt:
        progress.close()
        # The last finished step (a half-accumulated step is dropped). FSDP2's save is
        # collective and the other ranks may be gone: only DDP and one process save here.
        if save and not fsdp:
            _checkpoint(model, optimizer, output, step, rng, job, record, say, interrupted=True)
        raise

    if save and checkpoint_step != step:
        checkpoint = _checkpoint(model, optimizer, output, step, rng, job, record, progress.note)
    if validation is not None and (not points or points[-1][0] != step):
        points.append(_validate(model, validation, config, device, step, records))
    progress.close()
    # Whole again after FSDP2 (a collective gather: every rank exports).
    if modes:
        exported = kd.export(model)
    else:
        gather_fsdp2(model.modules())
        exported = model
    student_path = plot = None
    if save and job.main:
        student_path = kd.save(exported, output / "student.safetensors")
        say(f"exported student saved to {student_path}")
    seconds = time.perf_counter() - start
    # The summary and the plot read the records the loggers got (the history before a resume
    # included), so they show the whole run.
    first_step = next((r for r in records.all if VALIDATION_KEY not in r), None)
    for line in summary(
        steps=step,
        seconds=seconds,
        examples_per_second=progress.rate(),
        first=losses_of(first_step) if first_step is not None else None,
        last=parts,
        validation=[(r["step"], r[VALIDATION_KEY]) for r in records.all if VALIDATION_KEY in r],
        resumed_at=resumed_at,
    ):
        say(line)
    records.close()
    if save and job.main:
        plot = plot_metrics(records.all, output / PLOT_NAME)
        if plot is None:
            say("(no plot: matplotlib is not installed; pip install 'kdcore[plot]')")
        else:
            say(f"plot of losses and validation accuracy saved to {plot}")
    barrier(job)
    return TrainResult(
        model,
        exported,
        step,
        losses,
        points[-1][1] if points else None,
        seconds,
        checkpoint,
        student_path,
        validation=points,
        metrics=output / METRICS_NAME if (output / METRICS_NAME).exists() and save else None,
        plot=plot,
        rank=job.rank,
        world_size=job.world_size,
    )


def job_factory(config: TrainConfig, name: str) -> Callable[[], Any]:
    """The callable that ``config.student`` or ``config.data`` (``name``) names, imported. What
    goes wrong, importing it or calling it, is a :class:`kdcore.ConfigError` at ``train.<name>``
    naming it: the job file's own code, reported in one line."""
    from kdcore.plugin import resolve

    reference, path, what = getattr(config, name), f"train.{name}", f"{name} factory"
    try:
        factory = resolve(reference, what=what)
    except ConfigError as exc:
        raise ConfigError(str(exc), path=path) from None

    def call() -> Any:
        try:
            return factory()
        except Exception as exc:
            raise ConfigError(
                f"{what} {reference!r} raised {type(exc).__name__}: {exc}", path=path
            ) from exc

    return call


def first_batch(config: TrainConfig) -> tuple[Any, Any]:
    """The batch a run of ``config`` starts with (its data factory called), as ``(x, y)``."""
    return next(iter(epoch_batches(config)))


def epoch_batches(config: TrainConfig, epoch: int = 0) -> Iterator[tuple[Any, Any]]:
    """The training batches of ``epoch`` of a run of ``config`` (its data factory called), in
    the run's order (``kdcore cache-teacher`` caches the teacher's outputs on them)."""
    train_data, _ = _split(job_factory(config, "data")())
    return _epoch(train_data, config, epoch)


def _require_numpy_for_dcp() -> None:
    try:
        import numpy  # noqa: F401
    except ImportError:
        raise ConfigError(
            "'fsdp2' checkpoints through torch.distributed.checkpoint, whose multi-process save "
            'needs NumPy, which is not installed: pip install numpy (or use strategy = "ddp")',
            path="train.strategy",
        ) from None


def _validate(
    model: nn.Module,
    validation: Any,
    config: TrainConfig,
    device: torch.device,
    step: int,
    records: RunRecords,
) -> tuple[int, float]:
    accuracy = evaluate(model, validation, config, device=device)
    records.log({"step": step, VALIDATION_KEY: accuracy})
    return step, accuracy


def _losses(
    forward: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to train and its named parts (``student_loss`` and the KD losses) to log."""
    output = forward(x)  # through DDP when distributed; the loss from the model inside
    labelled = y != IGNORE_LABEL
    if bool(labelled.any()):
        student_loss = F.cross_entropy(output[labelled].float(), y[labelled])
    else:
        student_loss = output.float().sum() * 0
    if not is_distillation_model(model):
        return student_loss, {STUDENT_LOSS: student_loss}
    if model.loss_balancer is None:  # the KD loss alone, as compute_kd_loss makes it
        total, kd_terms = model.compute_kd_loss(return_terms=True)
        return total, {STUDENT_LOSS: student_loss.detach(), **kd_terms}
    return model.compute_kd_loss(student_loss=student_loss, return_terms=True)


def _checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    output: Path,
    step: int,
    rng: torch.Tensor,
    job: Launch,
    record: dict[str, Any] | None,
    say: Callable[[str], None],
    *,
    interrupted: bool = False,
) -> Path:
    """``step-<N>.safetensors`` written by rank 0 (one process, DDP), or the ``step-<N>``
    torch-dcp folder every rank writes its shards into (FSDP2); then ``step-<N>.json`` with
    the job ``record``."""
    import kdcore as kd

    if job.strategy == "fsdp2":
        path = kd.save(model, output / f"step-{step}", optimizer=optimizer, backend="torch-dcp")
    else:
        path = output / f"step-{step}.safetensors"
        if job.main:
            output.mkdir(parents=True, exist_ok=True)
            kd.save(model, path, optimizer=optimizer)
    if job.main:
        write_state(path, step, rng.tolist(), job.world_size, record)
        why = "interrupted; " if interrupted else ""
        say(f"{why}checkpoint saved to {path} (resume with --resume {path})")
    if not interrupted:  # the other ranks wait, so that nobody reads a half-written one
        barrier(job)
    return path


def _optimizer(config: TrainConfig, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in parameters if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate)
    return torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9)


def _split(result: Any) -> tuple[Any, Any]:
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise ConfigTypeError(
            "must return (train, validation): datasets or loaders, validation may be None",
            path="train.data",
        )
    return result[0], result[1]


def _is_dataset(data: Any) -> bool:
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _batches_per_epoch(data: Any, batch_size: int) -> int:
    if _is_dataset(data):
        return max(1, math.ceil(len(data) / batch_size))
    try:
        return max(1, len(data))
    except TypeError:
        raise ConfigError(
            "the train loader has no len(); give steps instead of epochs", path="train.data"
        ) from None


def _epoch(data: Any, config: TrainConfig, epoch: int) -> Iterator[tuple[Any, Any]]:
    if not _is_dataset(data):
        yield from data
        return
    from torch.utils.data import TensorDataset, default_collate

    # Batches made here, not by a DataLoader: its iterator draws a seed from the global RNG,
    # which would make a resumed run differ from an uninterrupted one.
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed + epoch))
    for indices in order.split(config.batch_size):
        if isinstance(data, TensorDataset):
            x, y = (tensor[indices] for tensor in data.tensors)
            yield x, y
            continue
        yield default_collate([data[int(i)] for i in indices])


def _batches(
    data: Any, config: TrainConfig, micro: int, batches_per_epoch: int
) -> Iterator[tuple[Any, Any]]:
    """Batches from micro-batch ``micro`` on, epoch after epoch, as an uninterrupted run."""
    epoch, skip = divmod(micro, batches_per_epoch)
    while True:
        for index, batch in enumerate(_epoch(data, config, epoch)):
            if index >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def evaluate(
    model: nn.Module, data: Any, config: TrainConfig, *, device: torch.device | None = None
) -> float:
    """Top-1 accuracy of ``model`` (the student alone) over the labelled examples of ``data``."""
    device = device or torch.device(config.device)
    model.eval()
    correct = seen = 0
    only_student = (
        model.only_student_forward() if is_distillation_model(model) else contextlib.nullcontext()
    )
    with torch.no_grad(), only_student:
        for x, y in _epoch(data, config, 0):
            x, y = x.to(device), y.to(device)
            keep = y != IGNORE_LABEL
            correct += int((model(x).argmax(-1)[keep] == y[keep]).sum())
            seen += int(keep.sum())
    return correct / max(seen, 1)
