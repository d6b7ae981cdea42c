"""A criterion that does not fit its layers' outputs (a FitNet width, a teacher with more
classes): named with its layer pair and config entry in Python, found by ``kdcore check`` before
a run, and one line from ``kdcore distill``, which leaves no empty output folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdcore as kd
from kdcore.cli import main
from tests.conftest import TinyNet, make_teacher
from tests.distributed_job import JOB


def job_text(output: str, teacher_width: int = 24) -> str:
    """tests/distributed_job.py's job (a FitNet pair on 'hidden', batches of 15), run for two
    steps in one process; ``teacher_width`` other than 24 does not fit the teacher."""
    text = JOB.format(optimizer="adam", steps=2, output=output, checkpoint_every=0, strategy="ddp")
    return text.replace("teacher_width = 24", f"teacher_width = {teacher_width}")


FITNET_ERROR = (
    "kd_loss.criterion[1]: FitNetLoss on ('hidden', 'hidden'): the projected student features "
    "(15, 12) do not match the teacher's; got student (15, 8), teacher (15, 24)"
)

# A 5-class teacher for the 3-class TinyNet student.
PLAIN = """
[kd_loss]
teacher_model = { name = "callable", target = "tests.conftest:TinyNet", kwargs = { classes = 5 } }
criterion = [{ student = "", teacher = "", loss = { name = "logits" } }]
"""


def _job(tmp_path: Path, teacher_width: int = 24) -> Path:
    path = tmp_path / "job.toml"
    output = (tmp_path / "out").as_posix()
    path.write_text(job_text(output, teacher_width))
    return path


def _convert(loss: object) -> kd.DistillationModel:
    model = kd.convert(
        TinyNet(),
        [
            (
                "kd_loss",
                {
                    "teacher_model": make_teacher,
                    "criterion": [{"student": "fc1", "teacher": "fc1", "loss": loss}],
                },
            )
        ],
    )
    model(torch.randn(3, 4))
    return model  # type: ignore[return-value]


def test_a_shape_mismatch_names_the_criterion_its_layer_pair_and_its_config_entry() -> None:
    model = _convert(kd.MSELoss())
    with pytest.raises(kd.CriterionError) as caught:
        model.compute_kd_loss()
    assert str(caught.value) == (
        "kd_loss.criterion[0]: MSELoss on ('fc1', 'fc1'): student output (3, 8) and teacher "
        "output (3, 16) differ in shape"
    )
    assert caught.value.path == "kd_loss.criterion[0]"
    assert isinstance(caught.value, ValueError)  # as the criterion's own error was
    assert isinstance(caught.value.__cause__, ValueError)
    assert not isinstance(caught.value.__cause__, kd.KDCoreError)


def test_a_torch_shape_error_stays_a_runtime_error_and_gains_the_shapes() -> None:
    model = _convert(lambda student, teacher: (student - teacher).pow(2).mean())
    with pytest.raises(RuntimeError, match="must match the size") as caught:
        model.compute_kd_loss()
    assert isinstance(caught.value, kd.CriterionError)
    assert str(caught.value).startswith(
        "kd_loss.criterion[0]: <lambda> on ('fc1', 'fc1'): student output (3, 8) and teacher "
        "output (3, 16): The size of tensor a (8)"
    )


def test_errors_that_are_not_a_criterion_refusing_its_inputs_pass_unchanged() -> None:
    def needs_labels(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> None:
        raise AssertionError("not called")

    model = _convert(needs_labels)
    with pytest.raises(TypeError, match="labels") as caught:
        model.compute_kd_loss()
    assert not isinstance(caught.value, kd.KDCoreError)

    def refuses(student: torch.Tensor, teacher: torch.Tensor) -> None:
        raise kd.DistillationStateError("its own message")

    model = _convert(refuses)
    with pytest.raises(kd.DistillationStateError) as state_error:
        model.compute_kd_loss()
    assert str(state_error.value) == "its own message"

    def out_of_memory(student: torch.Tensor, teacher: torch.Tensor) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    model = _convert(out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError) as memory_error:
        model.compute_kd_loss()
    assert not isinstance(memory_error.value, kd.KDCoreError)


def test_check_probes_the_jobs_first_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _job(tmp_path)
    assert main(["check", str(path), "--import"]) == 0
    assert (
        "shape probe: one step on the first batch of tests.distributed_job:data (inputs (15, 6)): "
        "every criterion takes its layers' outputs" in capsys.readouterr().out
    )
    path = _job(tmp_path, teacher_width=12)
    assert main(["check", str(path), "--import"]) == 1
    assert capsys.readouterr().err == f"kdcore check: error: {path}: {FITNET_ERROR}\n"
    assert not (tmp_path / "out").exists()


def test_check_names_the_side_that_cannot_take_the_jobs_first_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _job(tmp_path)
    path.write_text(
        path.read_text().replace("tests.distributed_job:data", "tests.test_distill:tiny_data")
    )
    assert main(["check", str(path), "--import"]) == 1
    assert capsys.readouterr().err.startswith(
        f"kdcore check: error: {path}: train.data: the teacher cannot take the first batch of "
        "tests.test_distill:tiny_data (inputs (15, 4)): RuntimeError: mat1 and mat2 shapes cannot "
        "be multiplied"
    )


def test_check_probes_a_plain_config_with_a_dummy_batch_for_the_student(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "distill.toml"
    path.write_text(PLAIN)
    assert main(["check", str(path), "--import", "--student", "tests.conftest:TinyNet"]) == 1
    assert capsys.readouterr().err == (
        f"kdcore check: error: {path}: kd_loss.criterion[0]: LogitsDistillationLoss on "
        "('<output>', '<output>'): student output (4, 3) and teacher output (4, 5) differ in "
        "shape; if the vocabularies differ only by padding (e.g. 151936 vs 152064), use the "
        "'forward_kl' criterion with vocab_alignment='truncate' or 'mask'\n"
    )


def test_check_without_import_says_the_probe_needs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "distill.toml"
    path.write_text(PLAIN)
    assert main(["check", str(path), "--student", "tests.conftest:TinyNet"]) == 0
    assert "shape probe: not run (it builds the teacher" in capsys.readouterr().out


def test_distill_reports_a_criterion_error_in_one_line_and_leaves_no_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _job(tmp_path, teacher_width=12)
    assert main(["distill", str(path)]) == 1
    assert capsys.readouterr().err == f"kdcore distill: error: {path}: {FITNET_ERROR}\n"
    assert not (tmp_path / "out").exists()


def test_distill_keeps_an_output_folder_that_was_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["distill", str(_job(tmp_path, teacher_width=12))]) == 1
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
