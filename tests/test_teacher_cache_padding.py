"""A teacher cache matches examples by their attended tokens only: an example cached padded on
one side (or not at all) is served, at its own tokens, to a batch that pads it otherwise."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kdcore as kd
from kdcore import llm

VOCAB, K, PAD = 40, 6, 0


class CausalMean(nn.Module):
    """A causal LM whose output at a token is a head on the mean embedding of the attended
    tokens up to it: under any padding, the same at each token, bit for bit (the padding adds
    exact zeros)."""

    def __init__(self, hidden: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, hidden)
        self.head = nn.Linear(hidden, VOCAB)
        with torch.no_grad():  # sharp, so that losses are O(1), not float32 noise
            self.head.weight.mul_(8.0)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        embedded = self.embed(input_ids) * mask[..., None]
        mean = embedded.cumsum(1) / mask.cumsum(1).clamp(min=1)[..., None]
        return self.head(torch.tanh(mean))  # type: ignore[no-any-return]


def examples() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(1, VOCAB, (n,), generator=generator) for n in (3, 7, 5, 8, 4, 6)]


def padded(tokens: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on the padding and on each
    example's first token), padded on ``side`` to the longest example."""
    length = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), length), PAD)
    mask = torch.zeros(len(tokens), length, dtype=torch.int64)
    for row, t in enumerate(tokens):
        place = slice(0, len(t)) if side == "right" else slice(length - len(t), length)
        ids[row, place], mask[row, place] = t, 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(len(tokens)), mask.argmax(1)] = -100  # the prompt: not distilled
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def cached_batches(side: str) -> list[dict[str, torch.Tensor]]:
    tokens = examples()
    if side == "unpadded":  # one example a batch: no padding, no attention mask
        return [{"input_ids": t[None], "labels": padded([t], "right")["labels"]} for t in tokens]
    return [padded(tokens[:3], side), padded(tokens[3:], side)]


def loss_and_grads(teacher: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    criterion = {"name": "topk_kl", "k": K, "tail_bucket": True}
    model = kd.convert(
        CausalMean(8, seed=1), [("kd_loss", {"teacher_model": teacher, "criterion": criterion})]
    )
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = model.compute_kd_loss(labels=llm.shift_labels(batch["labels"]))
    loss.backward()
    return loss.detach(), *(p.grad for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    ("cached_as", "trained_as"), [("right", "left"), ("left", "right"), ("unpadded", "left")]
)
def test_an_example_padded_otherwise_gets_its_cached_distribution_at_its_tokens(
    tmp_path: Path, cached_as: str, trained_as: str
) -> None:
    teacher = CausalMean(16, seed=0)
    kd.cache_teacher(teacher, cached_batches(cached_as), tmp_path, top_k=K)
    batch = padded(examples()[::-1], trained_as)  # another order and composition too
    online = loss_and_grads(copy.deepcopy(teacher), batch)
    offline = loss_and_grads({"name": "cached", "path": str(tmp_path)}, batch)
    assert float(online[0]) > 0.1
    torch.testing.assert_close(offline[0], online[0], rtol=1e-6, atol=0.0)
    for a, b in zip(online[1:], offline[1:], strict=True):  # relative to the gradient's norm:
        assert float((b - a).norm() / a.norm()) <= 1e-6  # entries near 0 are float32 noise


def test_the_padding_itself_is_never_cached(tmp_path: Path) -> None:
    kd.cache_teacher(CausalMean(16, seed=0), cached_batches("left"), tmp_path, top_k=K)
    batch = padded(examples(), "left")
    sparse = kd.plugin.TeacherCache(tmp_path).lookup(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(sparse.covered, llm.shift_labels(batch["labels"]) != -100)


def test_an_example_with_other_attended_tokens_is_not_found(tmp_path: Path) -> None:
    kd.cache_teacher(CausalMean(16, seed=0), cached_batches("right"), tmp_path, top_k=K)
    batch = padded(examples(), "left")
    batch["attention_mask"][1, -1] = 0  # example 1 loses its last token
    cache = kd.plugin.TeacherCache(tmp_path)
    with pytest.raises(kd.TeacherCacheError, match="example 1 of the batch .* is not in"):
        cache.lookup(batch["input_ids"], batch["attention_mask"])


def test_an_attention_mask_of_another_shape_is_refused(tmp_path: Path) -> None:
    batch = padded(examples(), "left")
    batch["attention_mask"] = batch["attention_mask"][:, 1:]
    with pytest.raises(kd.TeacherCacheError, match=r"attention_mask \(6, 7\) and input_ids"):
        kd.cache_teacher(CausalMean(16, seed=0), [batch], tmp_path, top_k=K)
