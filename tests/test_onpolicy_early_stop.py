"""``llm.generate_completions`` stops sampling once every row has produced EOS, and what it
returns is the un-stopped generation cut after each row's EOS."""

from __future__ import annotations

from typing import Any

import torch

from kdcore import llm
from tests.test_onpolicy import EOS, PROMPT_MASK, PROMPTS, tiny_llama

MAX_NEW_TOKENS = 12


def likes_eos(model: Any) -> list[int]:
    """Make EOS likely (about a third of the mass) and count the model's forward calls."""
    calls: list[int] = []

    def bias_eos(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return out.index_add(-1, torch.tensor([EOS]), torch.full_like(out[..., :1], 2.5))

    model.lm_head.register_forward_hook(bias_eos)
    return calls


def completions(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    return [row[row != -100].tolist() for row in batch["labels"]]


def test_sampling_stops_once_every_row_has_its_eos_with_the_unstopped_tokens() -> None:
    model = tiny_llama()
    calls = likes_eos(model)

    def generate(eos: int | None) -> dict[str, torch.Tensor]:
        calls.clear()
        return llm.generate_completions(
            model,
            PROMPTS,
            PROMPT_MASK,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=eos,
            generator=torch.Generator().manual_seed(3),
        )

    stopped = completions(generate(EOS))
    stopped_steps = len(calls)
    unstopped = completions(generate(None))
    assert len(calls) == MAX_NEW_TOKENS and all(len(row) == MAX_NEW_TOKENS for row in unstopped)

    lengths = [len(row) for row in stopped]
    assert len(set(lengths)) > 1 and all(row[-1] == EOS for row in stopped)  # rows end apart
    assert stopped_steps == max(lengths) < MAX_NEW_TOKENS  # no step after the last EOS
    for short, full in zip(stopped, unstopped, strict=True):
        assert short == full[: full.index(EOS) + 1]  # the same tokens, up to the first EOS
