"""The ``[train]`` table of a ``kdcore distill`` config, and reading a whole job file.

A job file holds the mode tables that :func:`kdcore.load_config` reads, plus ``[train]``
(every key, its type, default and accepted values: docs/configs.md)::

    [train]
    student = "mypkg.models:build_student"   # () -> nn.Module
    data = "mypkg.data:build_data"           # () -> (train, validation)
    steps = 1000                             # or epochs = 3 (not both)
    output = "runs/distill"

    [kd_loss]
    teacher_model = { name = "callable", target = "mypkg.models:build_teacher" }
    ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import attrs

from kdcore import ConfigError, KDCoreError

EVALUATIONS = 10  # validation points over a run when eval_every is not given
TRAIN_TABLE = "train"


@attrs.define(kw_only=True)
class TrainConfig:
    """How ``kdcore distill`` trains: the ``[train]`` table (docs/configs.md lists it whole)."""

    #: ``"module:callable"``: a function or class that returns the student ``nn.Module``.
    student: str
    #: ``"module:callable"`` returning ``(train, validation)``: datasets of ``(x, y)`` pairs
    #: (``y`` -1 for an unlabelled example) or loaders of batches; validation may be None.
    data: str
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = 1e-3
    #: Passes over the training data; give epochs or steps, not both (neither: one epoch).
    epochs: int | None = None
    #: Optimizer steps; give epochs or steps, not both.
    steps: int | None = None
    #: The global batch: under torchrun, split between the processes.
    batch_size: int = 32
    #: A torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``); under torchrun ``"cuda"`` means
    #: each process's ``cuda:LOCAL_RANK``.
    device: str = "cpu"
    #: ``"bf16"``: forward passes under bfloat16 autocast; weights and optimizer stay float32.
    precision: Literal["fp32", "bf16"] = "fp32"
    #: Batches whose gradients add up before each optimizer step.
    grad_accumulation: int = 1
    #: The folder for checkpoints, ``metrics.jsonl``, the plot and the exported student.
    output: str = "kdcore-run"
    #: Steps between checkpoints; 0: only at the end.
    checkpoint_every: int = 0
    #: Steps between progress lines when stdout is not a terminal.
    log_every: int = 10
    #: Steps between validation evaluations (a point of the plot); 0: only at the end; None:
    #: about ten over the run.
    eval_every: int | None = None
    #: Seeds the student's initialisation and, with the epoch added, each epoch's shuffle.
    seed: int = 0
    #: How a job launched by torchrun shares the work: "ddp" (replicas) or "fsdp2" (sharded
    #: student and teacher). Ignored in a single process.
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    #: Where the records of each step and evaluation go: logger plugins, each a name or
    #: ``{name = "...", ...options}`` (``jsonl``: ``metrics.jsonl``; ``csv``; ``tensorboard``).
    loggers: list[Any] = attrs.field(factory=lambda: ["jsonl"])


def structure_train(data: Any, *, path: str = TRAIN_TABLE) -> TrainConfig:
    """Structure and check a ``[train]`` table; errors name ``train.<key>``."""
    from kdcore.plugin import structure

    loggers = data.get("loggers") if isinstance(data, dict) else None
    if loggers is not None and not isinstance(loggers, list):  # a string is not a list of names
        raise ConfigError(
            f'expected a list, e.g. ["jsonl"], got {type(loggers).__name__}',
            path=f"{path}.loggers",
        )
    config = structure(data, TrainConfig, path=path)
    check_train(config, path=path)
    return config


def check_train(config: TrainConfig, *, path: str = TRAIN_TABLE) -> None:
    """The value checks the types alone do not make."""
    if config.epochs is not None and config.steps is not None:
        raise ConfigError("give epochs or steps, not both", path=f"{path}.steps")
    for name in ("epochs", "steps", "batch_size", "grad_accumulation", "log_every"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"must be at least 1, got {value}", path=f"{path}.{name}")
    for name in ("checkpoint_every", "eval_every"):
        value = getattr(config, name)
        if value is not None and value < 0:
            raise ConfigError(
                f"must be 0 (only at the end) or more, got {value}", path=f"{path}.{name}"
            )
    if not config.learning_rate > 0:
        raise ConfigError("must be positive", path=f"{path}.learning_rate")
    for name in ("student", "data"):
        if ":" not in getattr(config, name):
            raise ConfigError("expected 'module:callable'", path=f"{path}.{name}")
    _check_loggers(config.loggers, path=f"{path}.loggers")


def _check_loggers(loggers: list[Any], *, path: str) -> None:
    """Each entry names a registered logger with options it takes (built, not opened)."""
    from kdcore.training.metrics import build_loggers

    seen: dict[str, int] = {}
    for index, spec in enumerate(loggers):
        is_reference = isinstance(spec, dict) and isinstance(spec.get("name"), str)
        if not isinstance(spec, str) and not is_reference:
            raise ConfigError(
                f'expected a logger name or {{name = "...", ...}}, got {spec!r}',
                path=f"{path}[{index}]",
            )
        name = spec if isinstance(spec, str) else spec["name"]
        if name in seen:  # both would write the same records to the same place
            raise ConfigError(
                f"logger {name!r} is already loggers[{seen[name]}]", path=f"{path}[{index}]"
            )
        seen[name] = index
    build_loggers(loggers, path=path)


def load_job(
    path: str | os.PathLike[str], *, imports: bool = True
) -> tuple[list[tuple[str, dict[str, Any]]], TrainConfig]:
    """Read a job file: its mode tables (checked as :func:`kdcore.load_config` does, with
    ``imports``) and its ``[train]`` table. Nothing is built; errors name the file and the path
    inside it."""
    from kdcore import ConfigTypeError, check
    from kdcore.plugin import read_config_file

    path = Path(path)
    data = read_config_file(path)
    if TRAIN_TABLE not in data:
        raise ConfigError(f"{path}: no [{TRAIN_TABLE}] table (student, data, ...)")
    try:
        train = structure_train(data.pop(TRAIN_TABLE))
        modes = []
        for name, table in data.items():
            if not isinstance(table, dict):
                raise ConfigTypeError(
                    f"top-level {name!r} must be a table of that mode's config, "
                    f"got {type(table).__name__}"
                )
            modes.append((name, table))
        if modes:
            check(modes, imports=imports)
    except KDCoreError as exc:
        exc.args = (f"{path}: {exc.args[0]}", *exc.args[1:])
        raise
    return modes, train
