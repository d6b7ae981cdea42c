"""On-policy distillation: ``llm.generate_completions`` (the student's own samples as a batch),
the sampled-token reverse-KL estimators, and ``KDTrainer``'s on-policy options."""

from __future__ import annotations

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
