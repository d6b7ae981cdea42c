"""What a run logger plugin provides: the records of a ``kdcore distill`` run, written
somewhere (a file, TensorBoard, an experiment tracker)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol


class RunLogger(Protocol):
    """A logger of training records; registered as a class built with its options.

    A record is ``{"step": int, **values}``: a training step's ``loss``, each loss component,
    ``lr``, ``examples`` and ``examples_per_second``; or an evaluation's metrics
    (``validation_accuracy``). Only the main process logs.
    """

    def open(self, output: Path, *, resume_at: int | None, resumed_from: Path | None) -> None:
        """Start logging into the run's ``output`` folder. A resumed run gives the step it
        resumed at and the folder of the run it resumes (``output`` itself, or another): keep
        what was logged up to ``resume_at`` and drop the rest, so that the log tells one
        history without duplicates."""

    def log(self, record: Mapping[str, float]) -> None:
        """Write one record; it should survive the process being killed right after."""

    def close(self) -> None:
        """Flush and release what ``open`` took."""
