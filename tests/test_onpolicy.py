"""On-policy distillation: ``llm.generate_completions`` (the student's own samples as a batch),
the sampled-token reverse-KL estimators, and ``KDTrainer``'s on-policy options."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import kdcore as kd
from kdcore import llm

transformers = pytest.importorskip("transformers")

from kdcore_transformers import KDTrainer  # noqa: E402

from tests.conftest import tiny_llama_from_config  # noqa: E402

VOCAB, EOS = 23, 2


def tiny_llama(seed: int = 0, hidden: int = 16) -> Any:
    return tiny_llama_from_config(vocab=VOCAB, hidden=hidden, seed=seed)


PROMPTS = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0], [0, 11, 12, 13]])
PROMPT_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])


def generate(model: Any, seed: int = 0, **options: Any) -> dict[str, torch.Tensor]:
    options = {"max_new_tokens": 6, "eos_token_id": EOS, **options}
    generator = torch.Generator().manual_seed(seed)
    return llm.generate_completions(model, PROMPTS, PROMPT_MASK, generator=generator, **options)


# ====================================================================== generate_completions
def test_generated_batch_is_each_prompt_then_its_completion_right_padded() -> None:
    batch = generate(tiny_llama())
    for row, prompt in enumerate(PROMPTS):
        real = prompt[PROMPT_MASK[row].bool()]
        ids, mask, labels = (batch[k][row] for k in ("input_ids", "attention_mask", "labels"))
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right-padded
        assert torch.equal(ids[: len(real)], real)
        assert (labels[: len(real)] == -100).all()  # the prompt is not learned
        assert (labels[n:] == -100).all()  # nor the padding
        completion = ids[len(real) : n]
        assert torch.equal(labels[len(real) : n], completion)
        assert 1 <= len(completion) <= 6
        eos = (completion == EOS).nonzero()
        if len(eos):  # a row stops at its EOS, which is labelled
            assert int(eos[0]) == len(completion) - 1


def test_tokens_after_eos_are_padding_and_unlabelled() -> None:
    always_eos = tiny_llama()
    with torch.no_grad():
        always_eos.lm_head.weight.zero_()
        always_eos.model.norm.weight.zero_()
    always_eos.lm_head.register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor([EOS]), 50.0)
    )
    batch = generate(always_eos, max_new_tokens=5)
    lengths = PROMPT_MASK.sum(-1)
    assert torch.equal(batch["attention_mask"].sum(-1), lengths + 1)  # one EOS each, then stop
    assert batch["input_ids"].shape[1] == int(lengths.max()) + 1
    for row, n in enumerate(lengths.tolist()):
        assert batch["labels"][row].tolist() == [-100] * n + [EOS] + [-100] * (4 - n)
        assert (batch["input_ids"][row, n + 1 :] == EOS).all()


def test_the_same_seed_gives_the_same_batch_and_another_seed_another() -> None:
    model = tiny_llama()
    first, again, other = generate(model, 3), generate(model, 3), generate(model, 4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["input_ids"], other["input_ids"])


def test_sampling_matches_a_full_forward_without_the_kv_cache() -> None:
    """Positions and masks under left padding and the KV cache are right: near-greedy tokens
    are the argmax of a plain forward over the returned (right-padded) batch."""
    model = tiny_llama()
    greedy = llm.generate_completions(
        model, PROMPTS, PROMPT_MASK, max_new_tokens=4, temperature=1e-4
    )
    with torch.no_grad():
        logits = model(
            input_ids=greedy["input_ids"], attention_mask=greedy["attention_mask"]
        ).logits
    labels = llm.shift_labels(greedy["labels"])
    rows = labels != -100
    assert torch.equal(logits.argmax(-1)[rows], labels[rows])  # greedy = argmax everywhere


def test_the_model_goes_back_to_its_mode_and_gets_no_gradients() -> None:
    model = tiny_llama()
    model.train()
    batch = generate(model)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert not batch["input_ids"].requires_grad
    model.eval()
    generate(model)
    assert not model.training


def test_top_p_keeps_only_the_nucleus() -> None:
    model = tiny_llama()
    model.lm_head.register_forward_hook(
        lambda module, args, out: (
            torch.full_like(out, -50.0)
            .index_fill(-1, torch.tensor([3]), 10.0)
            .index_fill(-1, torch.tensor([4]), 9.0)
        )
    )
    for seed in range(5):
        completion = generate(model, seed, top_p=0.5, eos_token_id=None)["labels"]
        assert set(completion[completion != -100].tolist()) == {3}


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("max_new_tokens", 0, "max_new_tokens"),
        ("temperature", 0.0, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
    ],
)
def test_bad_generation_options_are_config_errors(option: str, value: Any, message: str) -> None:
    with pytest.raises(kd.ConfigError, match=message):
        generate(tiny_llama(), **{option: value})


# ====================================================================== sampled reverse KL
def sampled_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(3, 4, VOCAB, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 4, VOCAB, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (3, 4), generator=generator)
    labels[0, :2] = -100
    labels[2, 3] = -100
    return student, teacher, labels


def independent_estimate(estimator: str, student: Any, teacher: Any, labels: Any) -> Any:
    """Schulman's estimators written out per position, in plain Python over float64 values."""
    total, count = 0.0, 0
    for row, token in enumerate(labels.flatten().tolist()):
        if token == -100:
            continue
        log_p = torch.log_softmax(student.reshape(-1, VOCAB)[row], -1)[token].item()
        log_q = torch.log_softmax(teacher.reshape(-1, VOCAB)[row], -1)[token].item()
        r = math.exp(log_q - log_p)
        total += -math.log(r) if estimator == "k1" else (r - 1) - math.log(r)
        count += 1
    return total / count


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sampled_reverse_kl_is_schulmans_estimator_per_sampled_token(estimator: str) -> None:
    student, teacher, labels = sampled_inputs()
    loss = kd.registries().criteria.get("sampled_reverse_kl")(estimator=estimator)
    value = loss(student, teacher, labels=labels)
    assert abs(value.item() - independent_estimate(estimator, student, teacher, labels)) < 1e-10
    summed = type(loss)(estimator=estimator, reduction="sum")(student, teacher, labels=labels)
    halved = loss(student, teacher, labels=labels, num_items_in_batch=2 * int((labels >= 0).sum()))
    assert torch.allclose(halved, value / 2, rtol=1e-12)
    assert torch.allclose(summed, value * int((labels >= 0).sum()), rtol=1e-12)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sampled_reverse_kl_leaves_unsampled_positions_out(estimator: str) -> None:
    student, teacher, labels = sampled_inputs()
    student.requires_grad_(True)
    loss = kd.registries().criteria.get("sampled_reverse_kl")(estimator=estimator)
    loss(student, teacher, labels=labels).backward()
    assert student.grad is not None
    assert (student.grad[labels == -100] == 0).all()
    assert (student.grad[labels != -100] != 0).any(-1).all()
    per_position = type(loss)(estimator=estimator, reduction="none")(student, teacher, labels)
    assert per_position.shape == labels.shape and (per_position[labels == -100] == 0).all()


def test_k3_is_never_negative_and_k1_can_be() -> None:
    student, teacher, labels = sampled_inputs()
    criteria = kd.registries().criteria.get("sampled_reverse_kl")
    k1 = criteria(estimator="k1", reduction="none")(student, teacher, labels)
    k3 = criteria(estimator="k3", reduction="none")(student, teacher, labels)
    assert (k3 >= 0).all() and (k1 < 0).any()


def test_both_estimators_average_to_the_exact_reverse_kl_over_student_samples() -> None:
    """Unbiased: over many tokens drawn from the student, both approach KL(p || q)."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(1, 1, VOCAB, generator=generator, dtype=torch.float64)
    teacher = torch.randn(1, 1, VOCAB, generator=generator, dtype=torch.float64)
    p, log_p, log_q = student.softmax(-1), student.log_softmax(-1), teacher.log_softmax(-1)
    exact = (p * (log_p - log_q)).sum().item()
    draws = torch.multinomial(p[0, 0], 200_000, replacement=True, generator=generator)
    many = (student.expand(1, len(draws), VOCAB), teacher.expand(1, len(draws), VOCAB))
    criteria = kd.registries().criteria.get("sampled_reverse_kl")
    for estimator in ("k1", "k3"):
        estimate = criteria(estimator=estimator)(*many, labels=draws[None]).item()
        assert abs(estimate - exact) < 0.02 * max(exact, 1.0)


def test_the_k3_estimator_keeps_the_criterion_contracts(builtin_host: kd.PluginHost) -> None:
    from kdcore.testing import check_criterion

    check_criterion(
        "sampled_reverse_kl", kwargs={"estimator": "k3"}, skip=["restores_in_a_fresh_process"]
    )


def test_sampled_reverse_kl_names_a_misspelt_estimator() -> None:
    with pytest.raises(kd.ConfigError, match=r"'k4'.*did you mean"):
        kd.registries().criteria.get("sampled_reverse_kl")(estimator="k4")


def test_sampled_reverse_kl_without_labels_says_it_needs_them() -> None:
    student, teacher, _ = sampled_inputs()
    with pytest.raises(ValueError, match="needs labels"):
        kd.registries().criteria.get("sampled_reverse_kl")()(student, teacher)


# ====================================================================== KDTrainer on-policy
def training_arguments(tmp_path: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "learning_rate": 0.5,
        "optim": "sgd",
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "seed": 7,
        **overrides,
    }
    return transformers.TrainingArguments(**settings)


def prompt_examples(n: int, seed: int = 0, length: int = 10) -> list[dict[str, torch.Tensor]]:
    """Fixed text whose first 2 to 4 labels are -100: the prompt on-policy steps complete."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[: int(torch.randint(2, 5, (), generator=generator))] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


class RecordingTrainer(KDTrainer):  # type: ignore[misc]
    """Keeps the batch and the loss of each micro-batch it trained on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []

    def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training:
            self.seen.append(({k: v.clone() for k, v in inputs.items()}, loss.detach().clone()))
        return loss


def on_policy_trainer(tmp_path: Path, student: Any, teacher: Any, **options: Any) -> Any:
    return RecordingTrainer(
        model=student,
        args=training_arguments(tmp_path, max_steps=options.pop("max_steps", 1)),
        kd_config={
            "teacher_model": teacher,
            "criterion": options.pop("criterion", {"name": "forward_kl"}),
        },
        train_dataset=prompt_examples(4),
        **options,
    )


def test_on_policy_fraction_zero_trains_exactly_as_before(tmp_path: Path) -> None:
    teacher = tiny_llama(seed=1, hidden=32)
    before, fraction_zero = tiny_llama(), tiny_llama()
    RecordingTrainer(
        model=before,
        args=training_arguments(tmp_path, max_steps=2),
        kd_config={"teacher_model": teacher, "criterion": {"name": "forward_kl"}},
        train_dataset=prompt_examples(4),
    ).train()
    with pytest.warns(UserWarning, match="max_new_tokens ignored"):
        trainer = on_policy_trainer(
            tmp_path, fraction_zero, teacher, on_policy_fraction=0.0, max_new_tokens=4, max_steps=2
        )
    trainer.train()
    for (name, a), b in zip(before.named_parameters(), fraction_zero.parameters(), strict=True):
        assert torch.equal(a, b), name


def leading_ignored(labels: torch.Tensor) -> torch.Tensor:
    return (labels == -100).int().cumprod(-1).sum(-1)


@pytest.mark.parametrize("criterion", ["forward_kl", "jsd", "sampled_reverse_kl"])
def test_an_on_policy_step_trains_on_the_students_completions_of_the_prompts(
    tmp_path: Path, criterion: str
) -> None:
    teacher, student = tiny_llama(seed=1, hidden=32), tiny_llama()
    reference = copy.deepcopy(student)
    trainer = on_policy_trainer(
        tmp_path,
        student,
        teacher,
        criterion={"name": criterion},
        on_policy_fraction=1.0,
        max_new_tokens=5,
    )
    trainer.train()
    ((batch, loss),) = trainer.seen  # one step, one micro-batch of 2 rows

    prompts = {
        tuple(e["input_ids"][: leading_ignored(e["labels"])].tolist()) for e in prompt_examples(4)
    }
    lengths = leading_ignored(batch["labels"])
    for row, n in enumerate(lengths.tolist()):
        assert tuple(batch["input_ids"][row, :n].tolist()) in prompts  # a dataset prompt...
        assert (batch["labels"][row, n : n + 1] != -100).all()  # ...then a labelled completion
    assert set(batch) == {"input_ids", "attention_mask", "labels"}

    # the criterion on the generated batch, computed here, with the student as it was
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
    student_logits = reference(input_ids=ids, attention_mask=mask).logits
    expected = kd.registries().criteria.get(criterion)()(
        student_logits, teacher_logits, labels=llm.shift_labels(batch["labels"])
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()  # prompt rows are masked here: the step's update must be this gradient
    trained = dict(student.named_parameters())
    for name, before in reference.named_parameters():
        assert before.grad is not None
        torch.testing.assert_close(trained[name], before - 0.5 * before.grad, rtol=1e-4, atol=1e-6)


def test_on_policy_steps_are_drawn_and_sampled_the_same_under_one_seed(tmp_path: Path) -> None:
    teacher = tiny_llama(seed=1, hidden=32)
    runs = []
    for attempt in range(2):
        trainer = on_policy_trainer(
            tmp_path / str(attempt),
            tiny_llama(),
            teacher,
            on_policy_fraction=0.5,
            max_new_tokens=4,
            max_steps=4,
        )
        trainer.train()
        runs.append(trainer.seen)
    assert len(runs[0]) == len(runs[1]) == 4
    for (first, loss_1), (second, loss_2) in zip(*runs, strict=True):
        assert all(torch.equal(first[k], second[k]) for k in first) and torch.equal(loss_1, loss_2)
    fixed_text = {tuple(e["input_ids"].tolist()) for e in prompt_examples(4)}
    on_policy = [
        any(tuple(row.tolist()) not in fixed_text for row in batch["input_ids"])
        for batch, _ in runs[0]
    ]
    assert any(on_policy) and not all(on_policy)  # a fraction of the steps, not all or none


def test_a_row_without_a_prompt_is_named(tmp_path: Path) -> None:
    data = prompt_examples(2)
    data[1]["labels"] = data[1]["input_ids"].clone()
    trainer = KDTrainer(
        model=tiny_llama(),
        args=training_arguments(tmp_path),
        kd_config={"teacher_model": tiny_llama(seed=1), "criterion": {"name": "forward_kl"}},
        train_dataset=data,
        on_policy_fraction=1.0,
        max_new_tokens=3,
    )
    with pytest.raises(kd.DistillationStateError, match=r"row \d of micro-batch 0 has no prompt"):
        trainer.train()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"on_policy_fraction": 0.5}, "needs max_new_tokens"),
        ({"on_policy_fraction": 1.5, "max_new_tokens": 2}, "on_policy_fraction"),
        ({"on_policy_fraction": 1.0, "max_new_tokens": 0}, "max_new_tokens"),
        ({"on_policy_fraction": 1.0, "max_new_tokens": 2, "top_p": 0.0}, "top_p"),
    ],
)
def test_bad_on_policy_options_are_config_errors(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(kd.ConfigError, match=message):
        KDTrainer(
            model=tiny_llama(),
            args=training_arguments(tmp_path),
            kd_config={"teacher_model": tiny_llama(seed=1), "criterion": {"name": "forward_kl"}},
            **options,
        )


def test_a_resumed_on_policy_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    """The draws and the samples depend on the seed and the step only, not on RNG state."""
    teacher = tiny_llama(seed=1, hidden=32)

    def run(folder: str, max_steps: int, resume: str | None = None) -> Any:
        student = tiny_llama()
        trainer = KDTrainer(
            model=student,
            args=training_arguments(
                tmp_path / folder, max_steps=max_steps, save_strategy="steps", save_steps=2
            ),
            kd_config={"teacher_model": teacher, "criterion": {"name": "forward_kl"}},
            train_dataset=prompt_examples(8),
            on_policy_fraction=1.0,
            max_new_tokens=4,
        )
        trainer.train(resume_from_checkpoint=resume)
        return dict(student.named_parameters())

    uninterrupted = run("whole", 4)
    run("first-half", 2)
    resumed = run("first-half", 4, resume=str(tmp_path / "first-half" / "run" / "checkpoint-2"))
    for name, parameter in uninterrupted.items():
        assert torch.equal(parameter, resumed[name]), name


def test_generation_stops_at_any_of_several_eos_ids() -> None:
    always = tiny_llama()
    always.lm_head.register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor([7]), 50.0)
    )
    batch = generate(always, eos_token_id=[EOS, 7])
    assert torch.equal(batch["attention_mask"].sum(-1), PROMPT_MASK.sum(-1) + 1)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == EOS).all()  # the first pads


def test_a_prompt_mask_of_another_shape_is_named() -> None:
    with pytest.raises(kd.ConfigError, match=r"attention_mask \(3, 3\) does not match"):
        llm.generate_completions(
            tiny_llama(), PROMPTS, PROMPT_MASK[:, :3], max_new_tokens=2, eos_token_id=EOS
        )


def gkd_jsd(student_logits: Any, teacher_logits: Any, labels: Any, beta: float) -> Any:
    """GKD's generalised JSD written out (TRL's endpoints), a mean over the labelled rows."""
    rows = labels != -100
    log_p, log_q = student_logits[rows].log_softmax(-1), teacher_logits[rows].log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        per_row = (q * (log_q - log_p)).sum(-1)
    elif beta == 1:
        per_row = (p * (log_p - log_q)).sum(-1)
    else:
        log_m = (beta * q + (1 - beta) * p).log()
        per_row = beta * (q * (log_q - log_m)).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)
    return per_row.mean()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_the_on_policy_loss_is_the_gkd_formula_in_float64(tmp_path: Path, beta: float) -> None:
    teacher, student = tiny_llama(seed=1, hidden=32).double(), tiny_llama().double()
    reference = copy.deepcopy(student)
    trainer = on_policy_trainer(
        tmp_path,
        student,
        teacher,
        criterion={"name": "jsd", "beta": beta},
        on_policy_fraction=1.0,
        max_new_tokens=5,
    )
    trainer.train()
    ((batch, loss),) = trainer.seen
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = gkd_jsd(
            reference(input_ids=ids, attention_mask=mask).logits,
            teacher(input_ids=ids, attention_mask=mask).logits,
            llm.shift_labels(batch["labels"]),
            beta,
        )
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected.item()) < 1e-6
