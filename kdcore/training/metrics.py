"""The records of a run, handed to its loggers, and their plot.

Two kinds of record, both with ``"step"``::

    {"step": 12, "loss": 0.41, "student_loss": 0.30, "LogitsLoss_0": 0.52, "lr": 0.001,
     "examples": 64, "examples_per_second": 2210.5}
    {"step": 20, "validation_accuracy": 0.875}

Losses are those of the whole (global) batch, whatever the number of processes. The loggers
``[train] loggers`` names (plugins; by default ``jsonl``, which writes ``<output>/metrics.jsonl``)
get each record; a resumed run's loggers keep what they logged up to the step it resumed at, so
each log tells one uninterrupted history. :func:`plot_metrics` draws the records with
matplotlib (the ``kdcore[plot]`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdcore.plugin import RunLogger, instantiate

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "metrics.png"
VALIDATION_KEY = "validation_accuracy"
NOT_A_LOSS = frozenset({"step", "lr", "examples", "examples_per_second", VALIDATION_KEY})


def build_loggers(specs: Sequence[Any], *, path: str = "train.loggers") -> list[RunLogger]:
    """The loggers ``specs`` names: each a registered name or ``{"name": ..., **options}``;
    errors name ``train.loggers[i]``."""
    import kdcore as kd

    registry = kd.registries().loggers
    return [
        instantiate(
            registry, {"name": spec} if isinstance(spec, str) else spec, path=f"{path}[{i}]"
        )
        for i, spec in enumerate(specs)
    ]


def open_loggers(
    specs: Sequence[Any], output: Path, *, resume_at: int | None, resumed_from: Path | None
) -> list[RunLogger]:
    """Build and open the loggers of a run writing to ``output``; ``resumed_from`` is the
    checkpoint a resumed run starts from (its folder is the earlier run's)."""
    loggers = build_loggers(specs)
    earlier = resumed_from.parent if resumed_from is not None else None
    for logger in loggers:
        logger.open(output, resume_at=resume_at, resumed_from=earlier)
    return loggers


class RunRecords:
    """The records of this run (after ``history``, those of the run it resumed), each handed
    to ``loggers`` as it comes."""

    def __init__(self, loggers: list[RunLogger], *, history: list[dict[str, Any]]) -> None:
        self.loggers = loggers
        self.all: list[dict[str, Any]] = list(history)

    def log(self, record: Mapping[str, Any]) -> None:
        self.all.append(dict(record))
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()


def read_history(resumed_from: Path | None, resume_at: int | None) -> list[dict[str, Any]]:
    """The records of the run a resume continues, up to its step, from its ``metrics.jsonl``
    (none when it kept none)."""
    if resumed_from is None or resume_at is None:
        return []
    return [r for r in read_metrics(resumed_from.parent / METRICS_NAME) if r["step"] <= resume_at]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file (none when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def losses_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The loss components of a step's record."""
    return {name: value for name, value in record.items() if name not in NOT_A_LOSS}


def plot_metrics(records: Sequence[Mapping[str, Any]], png: str | Path) -> Path | None:
    """Draw the loss components and the validation accuracy of ``records`` over steps into
    ``png``.

    Returns ``None`` (and draws nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r for r in records if VALIDATION_KEY not in r]
    validation = [r for r in records if VALIDATION_KEY in r]
    names = list(losses_of(steps[0] if steps else {}))

    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in names:
        losses.plot([r["step"] for r in steps], [r[name] for r in steps], label=name)
    losses.set_xlabel("step")
    losses.set_ylabel("loss (global batch)")
    losses.set_yscale("log" if all(r[n] > 0 for r in steps for n in names) and steps else "linear")
    if names:
        losses.legend(fontsize="small")
    accuracy.plot(
        [r["step"] for r in validation], [r[VALIDATION_KEY] for r in validation], marker="o"
    )
    accuracy.set_xlabel("step")
    accuracy.set_ylabel("validation accuracy")
    figure.tight_layout()
    path = Path(png)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
