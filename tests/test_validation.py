"""kdcore.validation: the argument checks criteria share, built-in and third-party alike."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kdcore import validation as v


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: v.check_number("x", 3), 3.0),
        (lambda: v.check_non_negative("x", 0), 0.0),
        (lambda: v.check_positive("x", 0.5), 0.5),
        (lambda: v.check_temperature(2), 2.0),
        (lambda: v.check_unit_interval("beta", 1), 1.0),
        (lambda: v.check_unit_interval("alpha", 0, upper_open=True), 0.0),
        (lambda: v.check_int("k", 1, minimum=1), 1),
        (lambda: v.check_positive_int("width", 4), 4),
        (lambda: v.check_reduction("batchmean"), "batchmean"),
        (lambda: v.check_reduction("none", ("mean", "none")), "none"),
        (lambda: v.check_ignore_index(-100), -100),
    ],
)
def test_a_check_returns_the_value_it_accepts(call: Any, expected: Any) -> None:
    result = call()
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: v.check_number("x", True), TypeError, "x must be a number, got True"),
        (lambda: v.check_non_negative("x", -1), ValueError, "x must be finite and >= 0, got -1"),
        (lambda: v.check_positive("x", 0), ValueError, "x must be finite and > 0, got 0"),
        (lambda: v.check_temperature("2"), TypeError, "temperature must be a number, got '2'"),
        (
            lambda: v.check_temperature(float("inf")),
            ValueError,
            "temperature must be finite and > 0, got inf",
        ),
        (lambda: v.check_unit_interval("beta", 1.5), ValueError, r"beta must be in \[0, 1\]"),
        (
            lambda: v.check_unit_interval("alpha", 1, upper_open=True),
            ValueError,
            r"alpha must be in \[0, 1\), got 1",
        ),
        (lambda: v.check_int("k", 2.0, minimum=1), TypeError, "k must be an int, got 2.0"),
        (lambda: v.check_int("k", 0, minimum=1), ValueError, "k must be >= 1, got 0"),
        (
            lambda: v.check_positive_int("width", 0),
            ValueError,
            "width must be a positive int, got 0",
        ),
        (
            lambda: v.check_reduction("batchmean", ("mean", "sum", "none")),
            ValueError,
            "reduction must be one of mean, sum, none; got 'batchmean'",
        ),
        (
            lambda: v.check_ignore_index(None),
            TypeError,
            "ignore_index must be an int, got None",
        ),
        (
            lambda: v.check_labels(torch.zeros(3), "MyLoss"),
            TypeError,
            "MyLoss: labels must be an integer tensor, got torch.float32",
        ),
        (
            lambda: v.check_labels([0, 1], "MyLoss"),
            TypeError,
            "MyLoss: labels must be an integer tensor, got list",
        ),
    ],
)
def test_a_check_names_the_argument_and_the_value_it_refuses(
    call: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()


def test_integer_labels_pass_through() -> None:
    labels = torch.tensor([0, -100, 2])
    assert v.check_labels(labels, "MyLoss") is labels


def test_as_logits_takes_a_tensor_its_logits_attribute_or_a_tuples_first_item() -> None:
    logits = torch.randn(2, 5)
    assert v.as_logits(logits, "student") is logits
    assert v.as_logits(SimpleNamespace(logits=logits), "student") is logits
    assert v.as_logits((logits, None), "student") is logits
    with pytest.raises(TypeError, match="expected the teacher output to be a logits tensor"):
        v.as_logits({"logits": logits}, "teacher")
