"""The ``[train]`` table of a ``kdcore distill`` config, and reading a whole job file.

A job file holds the mode tables that :func:`kdcore.load_config` reads, plus ``[train]``::

    [train]
    student = "mypkg.models:build_student"   # () -> nn.Module
    data = "mypkg.data:build_data"           # () -> (train, validation); see kdcore.training
    optimizer = "adamw"                      # adam | adamw | sgd
    learning_rate = 1e-3
    steps = 1000                             # or epochs = 3 (not both)
    batch_size = 64
    device = "cpu"
    precision = "fp32"                       # fp32 | bf16 (autocast)
    grad_accumulation = 1
    output = "runs/distill"
    checkpoint_every = 200                   # steps; 0: only at the end
    log_every = 50                           # progress lines when stdout is not a terminal
    eval_every = 100                         # validation accuracy every N steps; 0: at the end
    seed = 0
    strategy = "ddp"                         # under torchrun: ddp | fsdp2

    [kd_loss]
    teacher_model = { name = "callable", target = "mypkg.models:build_teacher" }
    ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs

from kdcore import ConfigError, KDCoreError

OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("ddp", "fsdp2")
EVALUATIONS = 10  # validation points over a run when eval_every is not given
TRAIN_TABLE = "train"


@attrs.define(kw_only=True)
class TrainConfig:
    """How ``kdcore distill`` trains: the ``[train]`` table."""

    student: str
    data: str
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 32
    device: str = "cpu"
    precision: str = "fp32"
    grad_accumulation: int = 1
    output: str = "kdcore-run"
    checkpoint_every: int = 0
    log_every: int = 10
    #: Steps between validation evaluations (a point of the plot); 0: only at the end; None:
    #: about ten over the run.
    eval_every: int | None = None
    seed: int = 0
    #: How a job launched by torchrun shares the work: "ddp" (replicas) or "fsdp2" (sharded
    #: student and teacher). Ignored in a single process.
    strategy: str = "ddp"


def structure_train(data: Any, *, path: str = TRAIN_TABLE) -> TrainConfig:
    """Structure and check a ``[train]`` table; errors name ``train.<key>``."""
    from kdcore.plugin import structure

    config = structure(data, TrainConfig, path=path)
    check_train(config, path=path)
    return config


def check_train(config: TrainConfig, *, path: str = TRAIN_TABLE) -> None:
    """The value checks the types alone do not make."""
    if config.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"expected one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}",
            path=f"{path}.optimizer",
        )
    if config.precision not in PRECISIONS:
        raise ConfigError(
            f"expected one of {', '.join(PRECISIONS)}, got {config.precision!r}",
            path=f"{path}.precision",
        )
    if config.strategy not in STRATEGIES:
        raise ConfigError(
            f"expected one of {', '.join(STRATEGIES)}, got {config.strategy!r}",
            path=f"{path}.strategy",
        )
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
