"""Every error of ``kdcore check`` and ``kdcore distill`` starts with the file it came from (layer
names and the job's factories included), and ``kdcore check`` prints one line per criterion."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdcore.cli import main
from tests.test_config_files import TOML
from tests.test_shape_errors import job_text


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A job file run from its folder, next to ``kdcore_job_data.py`` (data factories that fail)."""
    (tmp_path / "kdcore_job_data.py").write_text(
        "def missing_file():\n"
        "    raise FileNotFoundError(2, 'No such file or directory', 'data/train.csv')\n"
    )
    path = tmp_path / "job.toml"
    path.write_text(job_text((tmp_path / "out").as_posix()))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield path
    sys.modules.pop("kdcore_job_data", None)


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'student = "hidden"',
            'student = "hiden"',
            "kd_loss.criterion[1].student: the student (Net) has no layer 'hiden'; did you mean "
            "'hidden'? (close names: hidden, head)",
        ),
        (
            'teacher = "hidden"',
            'teacher = "hiden"',
            "kd_loss.criterion[1].teacher: the teacher (Net) has no layer 'hiden'; did you mean "
            "'hidden'? (close names: hidden, head)",
        ),
        (
            "tests.distributed_job:data",
            "kdcore_job_data:missing_file",
            "train.data: data factory 'kdcore_job_data:missing_file' raised FileNotFoundError: "
            "[Errno 2] No such file or directory: 'data/train.csv'",
        ),
        (
            "tests.distributed_job:data",
            "tests.distributed_job:dta",
            "train.data: data factory 'tests.distributed_job:dta': 'dta' not found; did you mean "
            "'data'?",
        ),
        (
            "tests.distributed_job:student",
            "tests.distributed_job:TinyNet",
            "train.student: student factory 'tests.distributed_job:TinyNet': 'TinyNet' not found",
        ),
    ],
)
@pytest.mark.parametrize("command", [["distill"], ["check", "--import"]])
def test_job_errors_start_with_the_job_file(
    job: Path,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    old: str,
    new: str,
    message: str,
) -> None:
    _edit(job, old, new)
    assert main([command[0], str(job), *command[1:]]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kdcore {command[0]}: error: {job}: {message}")
    assert err.count("\n") == 1
    assert not (job.parent / "out").exists()


def test_check_names_the_file_of_a_layer_the_student_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "distill.toml"
    path.write_text(TOML.replace('student = "fc2"', 'student = "fc9"'))
    assert main(["check", str(path), "--student", "tests.conftest:TinyNet"]) == 1
    assert capsys.readouterr().err.startswith(
        f"kdcore check: error: {path}: kd_loss.criterion[1].student: the student (TinyNet) has "
        "no layer 'fc9'"
    )


def test_check_prints_each_criterion_on_one_line_and_counts_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(job_text("out").replace("steps = 2", "epochs = 1"))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "  FitNetLoss_1: student 'hidden' <- teacher 'hidden': "
        "FitNetLoss(student_width=8, teacher_width=24, reduction='mean')\n" in out
    )
    assert ", 1 epoch, batch 15," in out
    path.write_text(job_text("out").replace("steps = 2", "steps = 1"))
    assert main(["check", str(path)]) == 0
    assert ", 1 step, batch 15," in capsys.readouterr().out
