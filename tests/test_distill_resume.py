"""``kdcore distill --resume``, ``--force``, ``--overwrite`` and ``--quick``: a resume continues
the run its checkpoint came from or says, in one line, what to pass instead, touching no file;
an earlier run's output is not overwritten silently; the summary covers the whole run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kdcore import cli
from kdcore.training.metrics import read_metrics
from tests.test_distill import one_thread, write_job  # noqa: F401 (a fixture)


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A finished 6-step job with checkpoints at steps 3 and 6: its job file."""
    job = write_job(tmp_path, steps=6, every=3)
    assert cli.main(["distill", str(job)]) == 0
    capsys.readouterr()
    return job


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], status: int = 1) -> str:
    """The one-line error of a command that must fail, leaving the job's output as it was."""
    output = Path(argv[1]).parent / "job-out"
    before = files(output)
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    assert files(output) == before
    return err


def test_resume_with_an_edited_job_lists_each_change_and_refuses(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = run.read_text()
    run.write_text(text.replace("0.01", "0.02").replace("temperature = 2.0", "temperature = 3"))
    checkpoint = run.parent / "job-out" / "step-3.safetensors"
    err = refused(["distill", str(run), "--resume", str(checkpoint)], capsys)
    assert err.splitlines() == [
        f"kdcore distill: error: --resume {checkpoint}: the job differs from the one that saved "
        "it:",
        "  train.learning_rate: 0.01 -> 0.02",
        "  kd_loss.criterion[0].loss.temperature: 2.0 -> 3",
        "restore those settings, or pass --force to resume with the new ones (these may change "
        "without --force: train.checkpoint_every, train.epochs, train.eval_every, "
        "train.log_every, train.loggers, train.output, train.steps)",
    ]


def test_force_resumes_an_edited_job_with_its_new_settings(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run.write_text(run.read_text().replace("0.01", "0.02"))
    checkpoint = run.parent / "job-out" / "step-3.safetensors"
    assert cli.main(["distill", str(run), "--resume", str(checkpoint), "--force"]) == 0
    out = capsys.readouterr().out
    assert "resuming with a changed setting (--force): train.learning_rate: 0.01 -> 0.02" in out
    saved = json.loads((run.parent / "job-out" / "step-6.json").read_text())
    assert saved["job"]["train"]["learning_rate"] == 0.02  # what the resumed part ran with


def test_a_run_is_extended_by_raising_steps_without_force(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run.write_text(run.read_text().replace("steps = 6", "steps = 8").replace("log_every = 2", ""))
    checkpoint = run.parent / "job-out" / "step-6.safetensors"
    assert cli.main(["distill", str(run), "--resume", str(checkpoint)]) == 0
    assert "done: 8 steps" in capsys.readouterr().out
    assert (run.parent / "job-out" / "step-8.json").exists()


def test_resume_without_the_step_json_says_it_is_missing(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = run.parent / "job-out"
    (output / "step-6.json").unlink()
    checkpoint = output / "step-6.safetensors"
    err = refused(["distill", str(run), "--resume", str(checkpoint)], capsys)
    assert err == (
        f"kdcore distill: error: --resume {checkpoint}: its step-6.json (step and RNG state) is "
        "missing; pass a step-<N> checkpoint that kdcore distill saved, such as --resume "
        f"{output / 'step-3.safetensors'}\n"
    )


def test_resume_past_the_job_s_last_step_says_to_raise_steps(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run.write_text(run.read_text().replace("steps = 6", "steps = 4"))
    checkpoint = run.parent / "job-out" / "step-6.safetensors"
    err = refused(["distill", str(run), "--resume", str(checkpoint)], capsys)
    assert err == (
        f"kdcore distill: error: --resume {checkpoint}: the checkpoint is at step 6, past the "
        "job's 4 steps; to continue the run, raise train.steps (to more than 6 steps)\n"
    )


def test_resume_from_the_exported_student_names_the_last_checkpoint(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = run.parent / "job-out"
    err = refused(["distill", str(run), "--resume", str(output / "student.safetensors")], capsys)
    assert err == (
        f"kdcore distill: error: --resume {output / 'student.safetensors'}: not a checkpoint "
        "that kdcore distill saves during a run; pass a step-<N> checkpoint that kdcore distill "
        f"saved, such as --resume {output / 'step-6.safetensors'}\n"
    )


def test_resume_from_a_teacher_run_says_to_resume_this_job_s_own_checkpoint(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = tmp_path / "teacher.toml"
    text = run.read_text().split("[kd_loss]")[0]
    teacher.write_text(text.replace("job-out", "teacher-out"))
    assert cli.main(["distill", str(teacher)]) == 0
    capsys.readouterr()
    checkpoint = tmp_path / "teacher-out" / "step-6.safetensors"
    err = refused(["distill", str(run), "--resume", str(checkpoint)], capsys)
    assert err == (
        f"kdcore distill: error: --resume {checkpoint}: saved by a job with other distillation "
        "modes (none: a plain training run, such as a teacher's) than this one (kd_loss); "
        "resume from a checkpoint this job saved, or run it without --resume to start it\n"
    )


def test_a_checkpoint_saved_without_its_job_still_resumes(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sidecar = run.parent / "job-out" / "step-3.json"
    state = json.loads(sidecar.read_text())
    del state["job"]  # as kdcore wrote it before it recorded the job
    sidecar.write_text(json.dumps(state))
    checkpoint = run.parent / "job-out" / "step-3.safetensors"
    assert cli.main(["distill", str(run), "--resume", str(checkpoint)]) == 0


def test_rerunning_a_job_refuses_its_earlier_output(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = run.parent / "job-out"
    err = refused(["distill", str(run)], capsys)
    more = len(files(output)) - 3  # metrics.png too, when matplotlib is installed
    assert err == (
        f"kdcore distill: error: {run}: train.output {output} already holds metrics.jsonl, "
        f"step-3.json, step-3.safetensors and {more} more; pass --resume "
        f"{output / 'step-6.safetensors'} to continue that run, --overwrite to write over it, "
        "or give another train.output\n"
    )


def test_overwrite_reruns_a_job_into_its_output(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = files(run.parent / "job-out")
    assert cli.main(["distill", str(run), "--overwrite"]) == 0
    assert "done: 6 steps in" in capsys.readouterr().out
    assert files(run.parent / "job-out").keys() == before.keys()


def test_quick_is_for_the_demo_only(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(["distill", str(run), "--quick"], capsys, status=2)
    assert err == (
        f"kdcore distill: error: --quick shortens the demo only; for a short run of {run}, "
        "lower its [train] steps\n"
    )


def summary(lines: list[str]) -> list[str]:
    """The summary's lines after ``done:``: three losses from step 1 to 6, the accuracy."""
    done = next(i for i, line in enumerate(lines) if line.startswith("done: "))
    return lines[done + 1 : done + 5]


def test_the_summary_after_a_resume_covers_the_whole_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, steps=6, every=3)
    assert cli.main(["distill", str(job)]) == 0
    straight = capsys.readouterr().out.splitlines()
    checkpoint = tmp_path / "job-out" / "step-3.safetensors"
    assert cli.main(["distill", str(job), "--resume", str(checkpoint)]) == 0
    resumed = capsys.readouterr().out.splitlines()
    assert summary(resumed) == summary(straight)
    assert "validation accuracy" in summary(resumed)[-1]
    assert any(
        line.startswith("done: 6 steps; the 3 since resuming at step 3 in ") for line in resumed
    )


def test_force_without_resume_is_a_usage_error(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(["distill", str(run), "--force"], capsys, status=2)
    assert err == "kdcore distill: error: --force goes with --resume PATH\n"


def untimed(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != "examples_per_second"}


def test_a_run_resumed_into_another_folder_keeps_its_history_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path, steps=6, every=3)
    assert cli.main(["distill", str(job)]) == 0
    straight = capsys.readouterr().out.splitlines()
    job.write_text(job.read_text().replace("job-out", "elsewhere"))
    checkpoint = tmp_path / "job-out" / "step-3.safetensors"
    assert cli.main(["distill", str(job), "--resume", str(checkpoint)]) == 0
    resumed = capsys.readouterr().out.splitlines()
    assert summary(resumed) == summary(straight)
    first = read_metrics(tmp_path / "job-out" / "metrics.jsonl")
    again = read_metrics(tmp_path / "elsewhere" / "metrics.jsonl")
    assert [untimed(r) for r in again] == [untimed(r) for r in first]


@pytest.mark.parametrize("option", ["--overwrite", "--force"])
def test_job_options_without_a_job_are_usage_errors(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["distill", option]) == 2
    assert capsys.readouterr().err == f"kdcore distill: error: {option} needs the job's CONFIG\n"
