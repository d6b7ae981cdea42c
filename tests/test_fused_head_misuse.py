"""Fused lm-head set-ups a user gets wrong: an embedding named as the head, the head's output
paired instead of its input. Both are refused at convert time, saying what to pair or name."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kdcore as kd

transformers = pytest.importorskip("transformers")

from tests.conftest import tiny_llama_from_config  # noqa: E402

VOCAB = 101


def tiny_llama(hidden: int = 32, seed: int = 0) -> Any:
    return tiny_llama_from_config(vocab=VOCAB, hidden=hidden, seed=seed, tied=False)


def test_an_embedding_named_as_the_head_is_refused_leaving_the_student_alone() -> None:
    student = tiny_llama()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    criterion = {
        "name": "fused_logits",
        "student_head": "model.embed_tokens",  # [vocab, hidden] like the head, but not the head
        "teacher_head": "lm_head",
    }
    with pytest.raises(kd.ConfigError) as error:
        kd.convert(student, [("kd_loss", {
            "teacher_model": tiny_llama(hidden=48, seed=1),
            "criterion": {("model.norm", "model.norm"): criterion},
        })])  # fmt: skip
    message = str(error.value)
    assert "kd_loss.criterion[0].loss" in message
    assert "student layer is an embedding (Embedding), not the lm head" in message
    assert "student_head and teacher_head name the lm heads" in message
    assert type(student) is transformers.LlamaForCausalLM
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_the_heads_output_paired_with_named_heads_says_to_pair_their_input() -> None:
    student, teacher = tiny_llama(), tiny_llama(hidden=48, seed=1)
    model = kd.convert(student, [("kd_loss", {
        "teacher_model": teacher,
        "criterion": {("lm_head", "lm_head"): {"name": "fused_logits", "student_head": "lm_head",
                                               "teacher_head": "lm_head"}},
    })])  # fmt: skip
    ids = torch.randint(0, VOCAB, (2, 7))
    model(input_ids=ids)
    with pytest.raises(kd.KDCoreError) as error:
        model.compute_kd_loss(labels=ids)
    message = str(error.value)
    assert f"(2, 7, {VOCAB}) do not fit the student lm-head weight ({VOCAB}, 32)" in message
    assert "look like the head's output" in message and "'lm_head:input'" in message
