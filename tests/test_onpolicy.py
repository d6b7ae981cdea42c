"""On-policy distillation: ``llm.generate_completions`` (the student's own samples as a batch),
the sampled-token reverse-KL estimators, and ``KDTrainer``'s on-policy options."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import kdcore as kd
from kdcore import llm

transformers = pytest.importorskip("transformers")

VOCAB, EOS = 23, 2


def tiny_llama(seed: int = 0, hidden: int = 16) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


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
