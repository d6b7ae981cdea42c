"""The compressed teacher cache: at most 24 bits per kept entry (index and value) and a KD loss
within 1e-3 of the lossless cache's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import kdcore as kd
from kdcore import llm
from tests.test_teacher_cache import lm_batches, tiny_llama


def kd_loss(student: torch.nn.Module, folder: Path, batch: dict[str, Any], criterion: Any) -> Any:
    model = kd.convert(
        student,
        [
            (
                "kd_loss",
                {"teacher_model": {"name": "cached", "path": str(folder)}, "criterion": criterion},
            )
        ],
    )
    model(input_ids=batch["input_ids"])
    loss = model.compute_kd_loss(labels=llm.shift_labels(batch["labels"]))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    "criterion",
    [
        {"name": "topk_kl", "k": 32, "tail_bucket": True},
        {"name": "topk_kl", "k": 32},
        {"name": "forward_kl"},
    ],
)
def test_the_compressed_cache_gives_the_lossless_loss_within_1e_3(
    tmp_path: Path, criterion: dict[str, Any]
) -> None:
    teacher, data = tiny_llama(32, seed=1), lm_batches()
    for compression in ("float32", "compressed"):
        kd.cache_teacher(teacher, data, tmp_path / compression, top_k=32, compression=compression)
    for batch in data:
        (exact, exact_grads), (approx, approx_grads) = (
            kd_loss(tiny_llama(16, seed=2), tmp_path / compression, batch, criterion)
            for compression in ("float32", "compressed")
        )
        assert abs(float(approx / exact) - 1) <= 1e-3
        for g, h in zip(exact_grads, approx_grads, strict=True):
            assert float((h - g).norm() / g.norm()) <= 1e-2


def test_the_compressed_cache_takes_at_most_24_bits_per_entry(tmp_path: Path) -> None:
    vocab, k = 151_936, 64
    teacher = torch.nn.Linear(4, vocab)
    x = torch.randn(32, 4)
    kd.cache_teacher(teacher, [x], tmp_path, top_k=k, compression="compressed")
    from safetensors import safe_open

    bits = {"value_top": 32, "value_step": 16}  # per element; the packed streams are uint8
    with safe_open(str(tmp_path / "shard-00000.safetensors"), "pt") as shard:
        entry_bits = sum(
            shard.get_slice(name).get_shape()[0] * bits.get(name, 8)
            for name in ("index_low", "index_high", "values", "value_top", "value_step")
        )
    assert entry_bits / (32 * k) <= 24
