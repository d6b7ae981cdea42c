"""The training loop behind ``kdcore distill``.

The data contract: ``data()`` (the ``[train] data`` callable) takes no arguments and returns
``(train, validation)``. Each is a ``torch.utils.data.Dataset`` whose items are ``(x, y)``
pairs, or an iterable of ``(x, y)`` batches (a ``DataLoader``); ``validation`` may be ``None``.
``y`` holds class indices for the cross-entropy student loss; ``-1`` marks an unlabelled
example, which the student loss skips and the distillation losses still use. For a
``Dataset`` the loop draws batches itself, shuffled with a generator seeded by
``seed + epoch``, so that ``--resume`` continues exactly; a loader given as it is must be
deterministic per epoch for that to hold.

A checkpoint is ``<output>/step-<N>.safetensors`` (``kd.save`` with the optimizer) plus
``step-<N>.json`` next to it: the step counter and the CPU RNG state, as plain JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from kdcore.errors import ConfigError, ConfigTypeError
from kdcore.model import is_distillation_model
from kdcore.training.config import TrainConfig

IGNORE_LABEL = -1


@attrs.define
class TrainResult:
    """What :func:`train` returns."""

    model: nn.Module  # the trained model (a distillation model when there were modes)
    student: nn.Module  # the exported student
    steps: int
    losses: list[float]  # the total loss of every optimizer step of this run
    validation_accuracy: float | None
    seconds: float
    checkpoint: Path | None
    student_path: Path | None


def state_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


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
) -> TrainResult:
    """Train ``student()`` distilled with ``modes`` (plain supervised training when empty).

    ``student`` and ``data`` default to resolving ``config.student`` and ``config.data``.
    ``on_step(step, losses)`` runs after each optimizer step. Ctrl-C (``KeyboardInterrupt``)
    saves a checkpoint of the last finished step, then propagates.
    """
    import kdcore as kd
    from kdcore.references import resolve

    say = log or (lambda _line: None)
    start = time.perf_counter()
    make_student = student or resolve(config.student, what="student factory")
    make_data = data or resolve(config.data, what="data factory")
    device = torch.device(config.device)
    output = Path(config.output)

    torch.manual_seed(config.seed)
    built = make_student()
    if not isinstance(built, nn.Module):
        raise ConfigTypeError(
            f"returned {type(built).__name__}, not a module", path="train.student"
        )
    train_data, validation = _split(make_data())
    with warnings.catch_warnings():
        # The loop always passes student_loss, which is what this reminder asks for.
        warnings.simplefilter("ignore", kd.StudentLossWeightWarning)
        model = kd.convert(built, modes) if modes else built
    model.to(device)
    optimizer = _optimizer(config, model.parameters())

    step = 0
    if resume is not None:
        resume = Path(resume)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", kd.StudentLossWeightWarning)
            kd.restore(model, resume, optimizer=optimizer)
        saved = json.loads(state_path(resume).read_text(encoding="utf-8"))
        step = int(saved["step"])
        torch.set_rng_state(torch.tensor(saved["rng"], dtype=torch.uint8))
        say(f"resumed from {resume} at step {step}")

    batches_per_epoch = _batches_per_epoch(train_data, config.batch_size)
    if config.steps is not None:
        total = config.steps
    else:
        total = max(1, (config.epochs or 1) * batches_per_epoch // config.grad_accumulation)
    micro = step * config.grad_accumulation
    batches = _batches(train_data, config, micro, batches_per_epoch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    losses: list[float] = []
    checkpoint: Path | None = None
    rng = torch.get_rng_state()  # as of the last finished step: what a checkpoint stores
    window_start, window_examples = time.perf_counter(), 0
    try:
        while step < total:
            model.train()
            optimizer.zero_grad()
            parts: dict[str, float] = {}
            for _ in range(config.grad_accumulation):
                x, y = next(batches)
                x, y = x.to(device), y.to(device)
                with autocast:
                    terms = _loss_terms(model, x, y, distilling=bool(modes))
                total_loss = _combine(model, terms, distilling=bool(modes))
                (total_loss / config.grad_accumulation).backward()
                window_examples += len(x)
                for key, value in [("loss", total_loss), *terms.items()]:
                    parts[key] = (
                        parts.get(key, 0.0) + float(value.detach()) / config.grad_accumulation
                    )
            optimizer.step()
            step += 1
            rng = torch.get_rng_state()
            losses.append(parts["loss"])
            if on_step is not None:
                on_step(step, parts)
            if step % config.log_every == 0 or step == total:
                elapsed = time.perf_counter() - window_start
                rate = window_examples / elapsed if elapsed > 0 else float("inf")
                shown = "  ".join(f"{k} {v:.4f}" for k, v in parts.items())
                say(f"step {step}/{total}  {shown}  {rate:,.0f} examples/s")
                window_start, window_examples = time.perf_counter(), 0
            if save and config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoint = _checkpoint(model, optimizer, output, step, rng, say)
    except KeyboardInterrupt:
        if save:  # the last finished step: a half-accumulated step is dropped
            _checkpoint(model, optimizer, output, step, rng, say, interrupted=True)
        raise

    if save and (checkpoint is None or not checkpoint.name.startswith(f"step-{step}.")):
        checkpoint = _checkpoint(model, optimizer, output, step, rng, say)
    accuracy = evaluate(model, validation, config) if validation is not None else None
    exported = kd.export(model) if modes else model
    student_path = None
    if save:
        student_path = kd.save(exported, output / "student.safetensors")
        say(f"exported student saved to {student_path}")
    seconds = time.perf_counter() - start
    shown = f"{accuracy:.4f}" if accuracy is not None else "n/a"
    say(
        f"done: {step} steps, final loss {losses[-1] if losses else float('nan'):.4f}, "
        f"validation accuracy {shown}, {seconds:.1f} s"
    )
    return TrainResult(model, exported, step, losses, accuracy, seconds, checkpoint, student_path)


def _loss_terms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, distilling: bool
) -> dict[str, torch.Tensor]:
    output = model(x)
    labelled = y != IGNORE_LABEL
    if bool(labelled.any()):
        student_loss = F.cross_entropy(output[labelled].float(), y[labelled])
    else:
        student_loss = output.float().sum() * 0
    if not distilling or not is_distillation_model(model):
        return {"student_loss": student_loss}
    terms = model.compute_kd_loss(student_loss=student_loss, skip_balancer=True)
    assert isinstance(terms, dict)
    return terms


def _combine(model: nn.Module, terms: dict[str, torch.Tensor], *, distilling: bool) -> torch.Tensor:
    if not distilling or not is_distillation_model(model):
        return terms["student_loss"]
    balancer = model._kd.balancer  # the same combination compute_kd_loss would make
    if balancer is None:
        return sum(terms.values(), torch.zeros(()))
    total: torch.Tensor = balancer(terms)
    return total


def _checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    output: Path,
    step: int,
    rng: torch.Tensor,
    say: Callable[[str], None],
    *,
    interrupted: bool = False,
) -> Path:
    import kdcore as kd

    output.mkdir(parents=True, exist_ok=True)
    path = kd.save(model, output / f"step-{step}.safetensors", optimizer=optimizer)
    state = {"step": step, "rng": rng.tolist()}
    state_path(path).write_text(json.dumps(state), encoding="utf-8")
    why = "interrupted; " if interrupted else ""
    say(f"{why}checkpoint saved to {path} (resume with --resume {path})")
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


def evaluate(model: nn.Module, data: Any, config: TrainConfig) -> float:
    """Top-1 accuracy of ``model`` (the student alone) over the labelled examples of ``data``."""
    device = torch.device(config.device)
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
