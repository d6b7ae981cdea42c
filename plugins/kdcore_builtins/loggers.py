"""The built-in run loggers: ``jsonl`` (``metrics.jsonl``, the default), ``csv``
(``metrics.csv``) and ``tensorboard`` (event files under ``tensorboard/``; the ``tensorboard``
package, ``pip install 'kdcore[tensorboard]'``)."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kdcore
from kdcore.plugin import Registry
from kdcore.validation import check_positive_int


class JSONLinesLogger:
    """One JSON object a line in ``<output>/metrics.jsonl`` (what the plot and the summary
    read)."""

    file_name = "metrics.jsonl"

    def __init__(self) -> None:
        self.path: Path | None = None

    def open(self, output: Path, *, resume_at: int | None, resumed_from: Path | None) -> None:
        self.path = output / self.file_name
        output.mkdir(parents=True, exist_ok=True)
        kept = _history(self.path, resumed_from, resume_at, _read_jsonl)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def log(self, record: Mapping[str, float]) -> None:
        assert self.path is not None, "open() first"
        # Opened per record: a run killed at any point leaves every finished line on disk.
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(dict(record)) + "\n")

    def close(self) -> None:
        self.path = None


class CSVLogger:
    """A spreadsheet of the records in ``<output>/metrics.csv``: a column per key (a key first
    seen later, such as the first evaluation's, adds a column), empty cells where a record has
    no value."""

    file_name = "metrics.csv"

    def __init__(self) -> None:
        self.path: Path | None = None
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []

    def open(self, output: Path, *, resume_at: int | None, resumed_from: Path | None) -> None:
        self.path = output / self.file_name
        output.mkdir(parents=True, exist_ok=True)
        self.rows = _history(self.path, resumed_from, resume_at, _read_csv)
        self.columns = []
        for row in self.rows:
            self._add_columns(row)
        self._rewrite()

    def log(self, record: Mapping[str, float]) -> None:
        assert self.path is not None, "open() first"
        self.rows.append(dict(record))
        if self._add_columns(record):
            self._rewrite()  # a new column: the header changes
            return
        with open(self.path, "a", encoding="utf-8", newline="") as file:
            csv.DictWriter(file, self.columns).writerow(record)

    def close(self) -> None:
        self.path = None

    def _add_columns(self, record: Mapping[str, Any]) -> bool:
        new = [key for key in record if key not in self.columns]
        self.columns += new
        return bool(new)

    def _rewrite(self) -> None:
        assert self.path is not None
        with open(self.path, "w", encoding="utf-8", newline="") as file:
            writer = csv.DictWriter(file, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)


class TensorBoardLogger:
    """A scalar per key and step in TensorBoard event files under ``<output>/tensorboard``
    (``tensorboard --logdir <output>/tensorboard``). A resumed run purges the events after the
    step it resumed at; resumed into another folder, it starts a new log there."""

    folder_name = "tensorboard"

    def __init__(self, flush_secs: int = 30) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise kdcore.ConfigError(
                "the tensorboard logger needs the tensorboard package: "
                "pip install 'kdcore[tensorboard]'"
            )
        self.flush_secs = check_positive_int("flush_secs", flush_secs)
        self.writer: Any = None

    def open(self, output: Path, *, resume_at: int | None, resumed_from: Path | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        continuing = resume_at is not None and resumed_from == output
        self.writer = SummaryWriter(
            log_dir=str(output / self.folder_name),
            purge_step=resume_at + 1 if continuing and resume_at is not None else None,
            flush_secs=self.flush_secs,
        )

    def log(self, record: Mapping[str, float]) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _history(
    path: Path, resumed_from: Path | None, resume_at: int | None, read: Any
) -> list[dict[str, Any]]:
    """The records a resumed run keeps: those up to ``resume_at`` of this folder's log, or of
    the resumed run's folder when this one has none yet."""
    if resume_at is None:
        return []
    source = path if path.exists() or resumed_from is None else resumed_from / path.name
    return [r for r in read(source) if r["step"] <= resume_at]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as file:
        return [
            {key: _number(value) for key, value in row.items() if value != ""}
            for row in csv.DictReader(file)
        ]


def _number(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        return float(text)


@kdcore.hookimpl
def kdcore_register_loggers(registry: Registry[Any]) -> None:
    registry.add("jsonl", JSONLinesLogger)
    registry.add("csv", CSVLogger)
    registry.add("tensorboard", TensorBoardLogger)
