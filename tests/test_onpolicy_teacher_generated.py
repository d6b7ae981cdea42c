"""Sequence-level KD in ``KDTrainer`` (TRL's ``seq_kd``): ``teacher_generated_fraction`` of the
steps train the student on the teacher's completions of the prompts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import kdcore as kd
from kdcore import llm
from tests.test_onpolicy import (
    KDTrainer,
    leading_ignored,
    on_policy_trainer,
    prompt_examples,
    tiny_llama,
    tiny_llama_from_config,
    training_arguments,
)


def batches_seen(tmp_path: Path, student: Any, teacher: Any, **options: Any) -> list[Any]:
    trainer = on_policy_trainer(tmp_path, student, teacher, max_new_tokens=5, **options)
    trainer.train()
    return trainer.seen


def same_batch(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


TEACHER_SEED, TEACHER_HIDDEN = 1, 32


@pytest.fixture(scope="module")
def teacher_generated_step(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One step with ``teacher_generated_fraction=1``: its batch and loss, and the models."""
    teacher, student = tiny_llama(seed=TEACHER_SEED, hidden=TEACHER_HIDDEN), tiny_llama()
    teacher_before, student_before = copy.deepcopy(teacher), copy.deepcopy(student)
    ((batch, loss),) = batches_seen(
        tmp_path_factory.mktemp("run"), student, teacher, teacher_generated_fraction=1.0
    )
    return {
        "batch": batch,
        "loss": loss,
        "teacher": teacher,
        "teacher_before": teacher_before,
        "student": student,
        "student_before": student_before,
    }


def test_a_teacher_generated_step_trains_on_what_the_teacher_samples_with_the_students_seed(
    tmp_path: Path,
) -> None:
    # Tiny random models are nearly uniform, so a low temperature tells their samples apart
    teacher = tiny_llama(seed=TEACHER_SEED, hidden=TEACHER_HIDDEN)
    options = {"generation_temperature": 0.1}
    ((by_teacher, _),) = batches_seen(
        tmp_path / "a", tiny_llama(), teacher, teacher_generated_fraction=1.0, **options
    )
    # a student with the teacher's weights samples, on-policy, the very same batch...
    twin = tiny_llama(seed=TEACHER_SEED, hidden=TEACHER_HIDDEN)
    ((by_twin, _),) = batches_seen(tmp_path / "b", twin, teacher, on_policy_fraction=1.0, **options)
    assert same_batch(by_teacher, by_twin)
    # ...which the student does not
    ((by_student, _),) = batches_seen(
        tmp_path / "c", tiny_llama(), teacher, on_policy_fraction=1.0, **options
    )
    assert not same_batch(by_teacher, by_student)


def test_the_teacher_generated_batch_is_masked_and_trained_on_like_an_on_policy_one(
    teacher_generated_step: dict[str, Any],
) -> None:
    batch, loss, teacher, student, reference = (
        teacher_generated_step[k] for k in ("batch", "loss", "teacher", "student", "student_before")
    )
    prompts = {
        tuple(e["input_ids"][: leading_ignored(e["labels"])].tolist()) for e in prompt_examples(4)
    }
    lengths, ends = leading_ignored(batch["labels"]), batch["attention_mask"].sum(-1)
    for row, (n, end) in enumerate(zip(lengths.tolist(), ends.tolist(), strict=True)):
        assert tuple(batch["input_ids"][row, :n].tolist()) in prompts  # a dataset prompt
        assert n < end  # then a completion, labelled with its tokens
        assert torch.equal(batch["labels"][row, n:end], batch["input_ids"][row, n:end])
        assert (batch["labels"][row, end:] == -100).all()  # padding is not learned

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
    expected = kd.registries().criteria.get("forward_kl")()(
        reference(input_ids=ids, attention_mask=mask).logits,
        teacher_logits,
        labels=llm.shift_labels(batch["labels"]),
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()  # the step's update is this gradient: prompt rows count for nothing
    trained = dict(student.named_parameters())
    for name, before in reference.named_parameters():
        assert before.grad is not None
        torch.testing.assert_close(trained[name], before - 0.5 * before.grad, rtol=1e-4, atol=1e-6)


def test_the_teacher_stays_frozen_and_in_eval_mode(teacher_generated_step: dict[str, Any]) -> None:
    teacher, before = teacher_generated_step["teacher"], teacher_generated_step["teacher_before"]
    for (name, after), was in zip(teacher.named_parameters(), before.parameters(), strict=True):
        assert torch.equal(after, was) and after.grad is None, name
    assert not teacher.training


def test_the_student_is_drawn_first_and_the_teacher_takes_the_next_share_of_the_steps(
    tmp_path: Path,
) -> None:
    teacher = tiny_llama(seed=TEACHER_SEED, hidden=TEACHER_HIDDEN)
    options = {"on_policy_fraction": 0.5, "max_steps": 4}
    alone = batches_seen(
        tmp_path / "a", tiny_llama(), teacher, teacher_generated_fraction=0.0, **options
    )
    mixed = batches_seen(
        tmp_path / "b", tiny_llama(), teacher, teacher_generated_fraction=0.5, **options
    )
    fixed_text = {tuple(e["input_ids"].tolist()) for e in prompt_examples(4)}

    def generated(batch: dict[str, torch.Tensor]) -> bool:
        return any(tuple(row.tolist()) not in fixed_text for row in batch["input_ids"])

    student_steps = [generated(batch) for batch, _ in alone]
    # fraction 0: the on-policy steps are drawn as they always were (test_onpolicy's seed test)
    assert student_steps == [True, False, True, True]
    assert same_batch(alone[0][0], mixed[0][0])  # the same student step, sampled the same
    assert all(generated(batch) for batch, _ in mixed)  # the other half: the teacher's


def test_a_resumed_run_with_teacher_generated_steps_ends_where_an_uninterrupted_one_does(
    tmp_path: Path,
) -> None:
    teacher = tiny_llama(seed=1, hidden=32)

    def run(folder: str, max_steps: int, resume: str | None = None) -> Any:
        student = tiny_llama()
        KDTrainer(
            model=student,
            args=training_arguments(
                tmp_path / folder, max_steps=max_steps, save_strategy="steps", save_steps=1
            ),
            kd_config={"teacher_model": teacher, "criterion": {"name": "forward_kl"}},
            train_dataset=prompt_examples(8),
            on_policy_fraction=0.5,
            teacher_generated_fraction=0.5,
            max_new_tokens=4,
        ).train(resume_from_checkpoint=resume)
        return dict(student.named_parameters())

    # step 0 is the student's, step 1 (after the resume) the teacher's
    uninterrupted = run("whole", 2)
    run("first-half", 1)
    resumed = run("first-half", 2, resume=str(tmp_path / "first-half" / "run" / "checkpoint-1"))
    for name, parameter in uninterrupted.items():
        assert torch.equal(parameter, resumed[name]), name


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"teacher_generated_fraction": 0.5}, r"teacher_generated_fraction=0.5 needs max_new"),
        ({"teacher_generated_fraction": 1.5, "max_new_tokens": 2}, "teacher_generated_fraction"),
        (
            {"on_policy_fraction": 0.6, "teacher_generated_fraction": 0.5, "max_new_tokens": 2},
            r"on_policy_fraction=0.6 and teacher_generated_fraction=0.5 add up to more than 1",
        ),
    ],
)
def test_bad_teacher_generated_options_are_config_errors(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(kd.ConfigError, match=message):
        KDTrainer(
            model=tiny_llama(),
            args=training_arguments(tmp_path),
            kd_config={"teacher_model": tiny_llama(seed=1), "criterion": {"name": "forward_kl"}},
            **options,
        )


def test_a_teacher_token_outside_the_students_vocabulary_is_named(tmp_path: Path) -> None:
    teacher = tiny_llama_from_config(vocab=40, hidden=16, seed=1)
    teacher.lm_head.register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor([35]), 50.0)
    )
    trainer = KDTrainer(
        model=tiny_llama(),
        args=training_arguments(tmp_path),
        kd_config={"teacher_model": teacher, "criterion": {"name": "forward_kl"}},
        train_dataset=prompt_examples(2),
        teacher_generated_fraction=1.0,
        max_new_tokens=3,
    )
    with pytest.raises(kd.DistillationStateError, match=r"sampled token 35, outside .* 23"):
        trainer.train()
