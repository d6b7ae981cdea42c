"""The on-policy demo (examples/on_policy_demo.py) in its --quick form: it prints and returns
both figures for every student and the teacher, and the figures are what they claim."""

from __future__ import annotations

import math
import random
import runpy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import kdcore as kd
from kdcore import llm

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "on_policy_demo.py"


@pytest.fixture(scope="module")
def demo() -> SimpleNamespace:
    # run_path takes the script's module out of sys.modules again: Hypothesis draws constants
    # from every local module it finds there, so a module left behind would change what the
    # property tests that run later generate.
    return SimpleNamespace(**runpy.run_path(str(SCRIPT), run_name="on_policy_demo"))


@pytest.fixture(scope="module")
def quick_run(demo: SimpleNamespace) -> tuple[Any, str]:
    import transformers

    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    printed: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("builtins.print", lambda *args, **_: printed.append(" ".join(map(str, args))))
        try:
            result = demo.main(["--quick"])
        finally:  # the script's process-wide settings, put back for the other tests
            torch.set_num_threads(threads)
            transformers.logging.set_verbosity(verbosity)
    return result, "\n".join(printed)


def test_quick_run_prints_both_figures_for_every_student_and_the_teacher(
    demo: SimpleNamespace, quick_run: tuple[Any, str]
) -> None:
    result, printed = quick_run
    names = [demo.TEACHER, demo.START, *(name for name, _, _ in demo.STUDENTS)]
    assert list(result.students) == names[1:]
    for name in names:
        row = next(line for line in printed.splitlines() if line.startswith(f"| {name} |"))
        reverse_kl, log_likelihood = (float(cell) for cell in row.split("|")[2:4])
        assert math.isfinite(reverse_kl) and reverse_kl >= 0
        assert math.isfinite(log_likelihood) and log_likelihood < 0
    for figures in result.students.values():
        for samples in figures:
            assert math.isfinite(samples.reverse_kl) and samples.reverse_kl >= 0
            assert math.isfinite(samples.teacher_log_likelihood)


def test_the_teacher_figure_is_its_log_likelihood_of_its_own_samples(
    quick_run: tuple[Any, str],
) -> None:
    result, _ = quick_run
    samples = result.teacher_samples
    assert samples.model is result.teacher and samples.reverse_kl == pytest.approx(0, abs=1e-9)
    with torch.no_grad():  # transformers' own loss: the mean negative log-likelihood per label
        loss = result.teacher(**samples.batch).loss
    assert samples.teacher_log_likelihood == pytest.approx(-float(loss), abs=1e-5)


def test_a_students_reverse_kl_is_kdcores_reverse_kl_on_its_own_samples(
    demo: SimpleNamespace, quick_run: tuple[Any, str]
) -> None:
    result, _ = quick_run
    samples = result.students["on-policy reverse_kl"][0]
    inputs = {k: samples.batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        student, teacher = samples.model(**inputs).logits, result.teacher(**inputs).logits
    reverse_kl = kd.registries().criteria.get("reverse_kl")()
    expected = reverse_kl(student, teacher, labels=llm.shift_labels(samples.batch["labels"]))
    assert samples.reverse_kl == pytest.approx(float(expected), rel=1e-4)
    assert (samples.batch["labels"][:, 0] == -100).all()  # scored on the completions only


def test_the_text_is_the_grammars_and_agreement_errors_are_not(demo: SimpleNamespace) -> None:
    rng = random.Random(0)
    assert all(demo.is_sentence(demo.sentence(rng)) for _ in range(500))

    def words(text: str) -> list[str]:
        return text.split(" ")

    assert demo.is_sentence(words("the cats that a dog sees sleep ."))
    assert not demo.is_sentence(words("the cats that a dog see sleep ."))
    assert not demo.is_sentence(words("a cat sleep ."))
