"""Loggers are plugins: ``[train] loggers`` picks them, each gets every record of the run (each
loss component, the learning rate, throughput, evaluations), and a resumed run continues each
log without duplicates."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any

import pytest

import kdcore as kd
from kdcore import cli
from kdcore.training import load_job, train
from kdcore.training.metrics import read_metrics
from tests.test_distill import one_thread, write_job  # noqa: F401 (a fixture)

LOSSES = {"loss", "student_loss", "LogitsDistillationLoss_0"}
STEP_KEYS = {"step", *LOSSES, "lr", "examples", "examples_per_second"}


def job_with_loggers(folder: Path, loggers: str, *, steps: int = 6, every: int = 3) -> Path:
    job = write_job(folder, steps=steps, every=every)
    text = job.read_text().replace("seed = 3\n", f"seed = 3\neval_every = 3\nloggers = {loggers}\n")
    job.write_text(text)
    return job


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard's own reader finds in ``folder``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def test_jsonl_is_the_default_and_every_step_record_carries_lr_and_throughput(
    tmp_path: Path,
) -> None:
    modes, config = load_job(write_job(tmp_path))
    assert config.loggers == ["jsonl"]
    train(modes, config, log=None)
    records = read_metrics(tmp_path / "job-out" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert all(set(r) == STEP_KEYS for r in steps)
    assert all(r["lr"] == 0.01 and r["examples_per_second"] > 0 for r in steps)
    assert not (tmp_path / "job-out" / "metrics.csv").exists()


def test_tensorboard_event_files_hold_every_scalar(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    job = job_with_loggers(tmp_path, '["jsonl", "tensorboard"]')
    assert cli.main(["distill", str(job)]) == 0
    records = read_metrics(tmp_path / "job-out" / "metrics.jsonl")
    found = scalars(tmp_path / "job-out" / "tensorboard")
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, []).append((record["step"], value))
    assert set(found) == set(expected) >= LOSSES | {"lr", "validation_accuracy"}
    for tag, points in expected.items():
        assert [step for step, _ in found[tag]] == [step for step, _ in points]
        assert [value for _, value in found[tag]] == pytest.approx([v for _, v in points])


def test_csv_has_a_column_per_key_and_evaluations_add_theirs(tmp_path: Path) -> None:
    job = job_with_loggers(tmp_path, '["csv"]')
    modes, config = load_job(job)
    result = train(modes, config, log=None)
    with open(tmp_path / "job-out" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert set(rows[0]) == STEP_KEYS | {"validation_accuracy"}
    steps = [r for r in rows if r["loss"]]
    assert [float(r["loss"]) for r in steps] == pytest.approx(result.losses)
    evaluations = [(int(r["step"]), float(r["validation_accuracy"])) for r in rows if not r["loss"]]
    assert evaluations == result.validation  # floats written by repr: exact
    assert not (tmp_path / "job-out" / "metrics.jsonl").exists()


def test_a_resumed_run_continues_every_log_without_duplicates(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    job = job_with_loggers(tmp_path, '["jsonl", "csv", "tensorboard"]')
    modes, config = load_job(job)
    straight = train(modes, config, log=None)
    output = tmp_path / "job-out"
    train(modes, config, resume=output / "step-3.safetensors", log=None)

    steps = [r["step"] for r in read_metrics(output / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    with open(output / "metrics.csv", newline="") as file:
        rows = [r for r in csv.DictReader(file) if r["loss"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(r["loss"]) for r in rows] == pytest.approx(straight.losses)
    found = scalars(output / "tensorboard")
    assert [step for step, _ in found["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in found["loss"]] == pytest.approx(straight.losses)
    assert [step for step, _ in found["validation_accuracy"]] == [3, 6]


class ListLogger:
    """A third-party logger: keeps the records it gets."""

    runs: list[ListLogger] = []

    def __init__(self, project: str) -> None:
        self.project = project
        self.records: list[dict[str, Any]] = []
        self.opened: tuple[Path, int | None] | None = None
        self.closed = False
        ListLogger.runs.append(self)

    def open(self, output: Path, *, resume_at: int | None, resumed_from: Path | None) -> None:
        self.opened = (output, resume_at)

    def log(self, record: Any) -> None:
        self.records.append(dict(record))

    def close(self) -> None:
        self.closed = True


class ListLoggerPlugin:
    @kd.hookimpl
    def kdcore_register_loggers(self, registry: Any) -> None:
        registry.add("list", ListLogger)


@pytest.fixture
def with_list_logger() -> Any:
    ListLogger.runs.clear()
    with kd.use_host(kd.PluginHost(plugins=[("list-logger", ListLoggerPlugin())], blocked=())):
        yield


def test_a_third_party_logger_gets_every_record_with_its_options(
    tmp_path: Path, with_list_logger: Any
) -> None:
    job = job_with_loggers(tmp_path, '[{ name = "list", project = "kd" }]')
    modes, config = load_job(job)
    result = train(modes, config, log=None)
    (logger,) = [run for run in ListLogger.runs if run.opened is not None]
    assert logger.project == "kd" and logger.closed
    assert logger.opened == (tmp_path / "job-out", None)
    steps = [r for r in logger.records if "loss" in r]
    assert [r["loss"] for r in steps] == result.losses
    assert all(set(r) == STEP_KEYS for r in steps)
    assert [(r["step"], r["validation_accuracy"]) for r in logger.records if "loss" not in r] == (
        result.validation
    )


@pytest.mark.parametrize(
    ("loggers", "message"),
    [
        (
            '["jsonl", "tensorbord"]',
            r"train\.loggers\[1\]\.name: .*'tensorbord'.*did you mean 'tensorboard'",
        ),
        (
            '[{ name = "csv", every = 2 }]',
            r"train\.loggers\[0\]\.every: unknown key \(logger 'csv' takes: no arguments\)",
        ),
        ("[3]", r"train\.loggers\[0\]: expected a logger name"),
        ('"jsonl"', r"train\.loggers: expected a list, e\.g\. \[\"jsonl\"\], got str"),
        (
            '["jsonl", "csv", "jsonl"]',
            r"train\.loggers\[2\]: logger 'jsonl' is already loggers\[0\]",
        ),
        (
            '[{ name = "tensorboard", flush_secs = -1 }]',
            r"train\.loggers\[0\]: .*flush_secs must be",
        ),
    ],
)
def test_a_bad_logger_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], loggers: str, message: str
) -> None:
    import re

    job = job_with_loggers(tmp_path, loggers)
    assert cli.main(["distill", str(job)]) == 1
    error = capsys.readouterr().err
    assert re.search(message, error), error
    assert error.count("\n") == 1 and not (tmp_path / "job-out").exists()


def test_tensorboard_without_its_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "tensorboard" else real(name, *args),
    )
    job = job_with_loggers(tmp_path, '["tensorboard"]')
    assert cli.main(["distill", str(job)]) == 1
    assert "pip install 'kdcore[tensorboard]'" in capsys.readouterr().err


def test_loggers_may_change_on_a_resume_and_a_new_one_starts_after_the_checkpoint(
    tmp_path: Path,
) -> None:
    job = job_with_loggers(tmp_path, '["jsonl"]')
    assert cli.main(["distill", str(job)]) == 0
    job.write_text(job.read_text().replace('loggers = ["jsonl"]', 'loggers = ["jsonl", "csv"]'))
    checkpoint = tmp_path / "job-out" / "step-3.safetensors"
    assert cli.main(["distill", str(job), "--resume", str(checkpoint)]) == 0
    with open(tmp_path / "job-out" / "metrics.csv", newline="") as file:
        assert [int(r["step"]) for r in csv.DictReader(file) if r["loss"]] == [4, 5, 6]
