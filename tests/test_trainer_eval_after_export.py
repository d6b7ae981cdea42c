"""KDTrainer after ``export_student``: the trainer holds the plain student and evaluates it as
``transformers.Trainer`` would (the student's own loss), instead of asking for the distillation
model that is gone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdcore as kd

transformers = pytest.importorskip("transformers")

from kdcore_transformers import KDTrainer  # noqa: E402

from tests.test_transformers_plugin import arguments, examples, tiny_llama  # noqa: E402


def exported_trainer(tmp_path: Path) -> tuple[KDTrainer, list[dict[str, torch.Tensor]]]:
    data = examples(5, seed=4)  # batches of 2, 2 and 1 sequences
    trainer = KDTrainer(
        model=tiny_llama(),
        args=arguments(tmp_path),
        kd_config={"teacher_model": tiny_llama(seed=1), "criterion": {"name": "forward_kl"}},
        eval_dataset=data,
    )
    trainer.export_student(str(tmp_path / "student"))
    return trainer, data


def plain_trainer_metrics(tmp_path: Path, data: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """What transformers' own Trainer reports for the exported student."""
    student = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    trainer = transformers.Trainer(model=student, args=arguments(tmp_path), eval_dataset=data)
    return trainer.evaluate()


def test_evaluate_after_export_reports_the_students_own_loss(tmp_path: Path) -> None:
    trainer, data = exported_trainer(tmp_path)
    metrics = trainer.evaluate()
    expected = plain_trainer_metrics(tmp_path, data)
    assert metrics["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    assert "eval_student_loss" not in metrics  # the loss is the student's: nothing is distilled


def test_predict_after_export_gives_the_students_logits_and_loss(tmp_path: Path) -> None:
    trainer, data = exported_trainer(tmp_path)
    result = trainer.predict(data)
    student = trainer.model.eval()
    with torch.no_grad():
        logits = student(torch.stack([e["input_ids"] for e in data])).logits
    assert torch.allclose(torch.as_tensor(result.predictions), logits, atol=1e-5)
    expected = plain_trainer_metrics(tmp_path, data)["eval_loss"]
    assert result.metrics["test_loss"] == pytest.approx(expected, rel=1e-6)


def test_training_after_export_is_still_refused(tmp_path: Path) -> None:
    trainer, data = exported_trainer(tmp_path)
    trainer.train_dataset = data
    with pytest.raises(kd.DistillationStateError, match="export_student"):
        trainer.train()
