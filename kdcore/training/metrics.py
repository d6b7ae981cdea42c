"""``<output>/metrics.jsonl``: what each step measured, one JSON object a line, and its plot.

Two kinds of line, both with ``"step"``::

    {"step": 12, "loss": 0.41, "student_loss": 0.30, "LogitsLoss_0": 0.52, "examples": 64}
    {"step": 20, "validation_accuracy": 0.875}

Losses are those of the whole (global) batch, whatever the number of processes. A resumed run
first drops the lines after its starting step (in another folder, it starts from the lines of
the checkpoint's folder), so the file always tells one uninterrupted history.
:func:`plot_metrics` draws it with matplotlib (the ``kdcore[plot]`` extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "metrics.png"
VALIDATION_KEY = "validation_accuracy"
NOT_A_LOSS = frozenset({"step", "examples", VALIDATION_KEY})


class MetricsFile:
    """Appends records to ``path``; ``resume_at`` keeps the history up to that step only (the
    records kept are :attr:`history`), read from ``history_from`` when ``path`` does not exist
    yet (a run resumed into another folder)."""

    def __init__(
        self, path: Path, *, resume_at: int | None = None, history_from: Path | None = None
    ) -> None:
        self.path = path
        self.history: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_at is not None:
            source = path if path.exists() or history_from is None else history_from
            self.history = [r for r in read_metrics(source) if r["step"] <= resume_at]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.history), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        # Opened per record: a run killed at any point leaves every finished line on disk.
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file (none when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def losses_of(record: dict[str, Any]) -> dict[str, float]:
    """The loss components of a step's record."""
    return {name: value for name, value in record.items() if name not in NOT_A_LOSS}


def plot_metrics(metrics: str | Path, png: str | Path) -> Path | None:
    """Draw the loss components and the validation accuracy over steps into ``png``.

    Returns ``None`` (and draws nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics)
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
