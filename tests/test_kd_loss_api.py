"""What training code needs from a distillation model, through its public API:
``compute_kd_loss(return_terms=True)``, the distillation-state accessors, and when
``StudentLossWeightWarning`` is said (at the first ``compute_kd_loss`` that matters, never at
``convert``)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdcore as kd
from tests.conftest import TinyNet, make_teacher

LABELS = torch.tensor([0, 1, 2, 0, 1])
DOCS = Path(__file__).resolve().parent.parent / "docs"


def two_losses(student: nn.Module, kd_loss_weight: Any = (0.4, 0.2)) -> Any:
    return kd.convert(
        student,
        [
            (
                "kd_loss",
                {
                    "teacher_model": make_teacher,
                    "criterion": {
                        ("", ""): kd.LogitsDistillationLoss(temperature=2.0),
                        ("fc1", "fc1"): {"name": "fitnet", "student_width": 8, "teacher_width": 16},
                    },
                    "loss_balancer": {"name": "static", "kd_loss_weight": list(kd_loss_weight)},
                },
            )
        ],
    )


# ------------------------------------------------------------------ return_terms
def test_return_terms_gives_the_balanced_total_and_the_parts_it_was_made_of(
    student: TinyNet, batch: torch.Tensor
) -> None:
    model = two_losses(student)
    student_loss = F.cross_entropy(model(batch), LABELS)
    total, terms = model.compute_kd_loss(student_loss=student_loss, return_terms=True)
    assert list(terms) == ["student_loss", "LogitsDistillationLoss_0", "FitNetLoss_1"]
    assert terms["student_loss"] is student_loss
    expected = 0.4 * terms["LogitsDistillationLoss_0"] + 0.2 * terms["FitNetLoss_1"]
    expected = expected + 0.4 * student_loss
    assert torch.allclose(total, expected)


def test_return_terms_gives_the_same_total_as_a_plain_call(
    student: TinyNet, batch: torch.Tensor
) -> None:
    model = two_losses(student)
    model(batch)
    total, _ = model.compute_kd_loss(student_loss=torch.tensor(1.0), return_terms=True)
    model(batch)
    assert torch.equal(total, model.compute_kd_loss(student_loss=torch.tensor(1.0)))


def test_return_terms_without_a_balancer_gives_the_kd_loss_and_its_one_term(
    student: TinyNet, batch: torch.Tensor
) -> None:
    model: Any = kd.convert(
        student,
        [("kd_loss", {"teacher_model": make_teacher, "criterion": kd.LogitsDistillationLoss()})],
    )
    model(batch)
    total, terms = model.compute_kd_loss(return_terms=True)
    assert list(terms) == ["LogitsDistillationLoss_0"]
    assert total is terms["LogitsDistillationLoss_0"]


def test_return_terms_with_skip_balancer_is_refused(student: TinyNet, batch: torch.Tensor) -> None:
    model = two_losses(student)
    model(batch)
    with pytest.raises(TypeError, match="skip_balancer=True returns the terms alone"):
        model.compute_kd_loss(skip_balancer=True, return_terms=True)


# ------------------------------------------------------------------ state accessors
def test_kd_state_dict_holds_the_loss_modules_and_balancer_state_keyed_as_in_state_dict(
    student: TinyNet,
) -> None:
    model: Any = kd.convert(
        student,
        [
            (
                "kd_loss",
                {
                    "teacher_model": make_teacher,
                    "criterion": {
                        ("", ""): kd.LogitsDistillationLoss(),
                        ("fc1", "fc1"): {"name": "fitnet", "student_width": 8, "teacher_width": 16},
                    },
                    "loss_balancer": {"name": "scheduled", "steps": 4, "end": [0.5, 0.5]},
                },
            )
        ],
    )
    state = model.kd_state_dict()
    assert set(state) == {
        "_loss_modules.1.projection.weight",
        "_loss_modules.1.projection.bias",
        "_loss_balancer.current_step",
        "_loss_balancer.pending_calls",
    }
    for key, value in state.items():
        assert torch.equal(value, model.state_dict()[key])


def test_student_state_dict_is_what_the_exported_student_holds(student: TinyNet) -> None:
    model = two_losses(student, kd_loss_weight=(0.5, 0.5))
    state = {key: value.clone() for key, value in model.student_state_dict().items()}
    exported = kd.export(model)
    assert state.keys() == exported.state_dict().keys()
    for key, value in exported.state_dict().items():
        assert torch.equal(state[key], value)


def test_load_kd_state_dict_carries_learned_loss_weights_to_another_model(
    batch: torch.Tensor,
) -> None:
    trained = two_losses(TinyNet())
    with torch.no_grad():
        trained.loss_modules[1].projection.weight.add_(1.0)
    fresh = two_losses(TinyNet())
    fresh.load_kd_state_dict(trained.kd_state_dict())
    for key, value in trained.kd_state_dict().items():
        assert torch.equal(fresh.kd_state_dict()[key], value)


def test_load_kd_state_dict_names_a_missing_or_extra_key() -> None:
    model = two_losses(TinyNet())
    state = model.kd_state_dict()
    with pytest.raises(
        kd.DistillationStateError, match=r"missing: _loss_modules\.1\.projection\.bias$"
    ):
        model.load_kd_state_dict({k: v for k, v in state.items() if not k.endswith("bias")})
    with pytest.raises(kd.DistillationStateError, match=r"balancer: unexpected: fc1\.weight$"):
        model.load_kd_state_dict({**state, "fc1.weight": torch.zeros(8, 4)})
    with pytest.raises(kd.DistillationStateError, match=r"(?s)_loss_modules: .*size mismatch"):
        model.load_kd_state_dict({**state, "_loss_modules.1.projection.bias": torch.zeros(3)})


# ------------------------------------------------------------------ the student-loss warning
def test_convert_with_a_balancer_that_needs_the_student_loss_does_not_warn(
    student: TinyNet,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = two_losses(student)
    assert model.loss_balancer.needs_student_loss


def test_the_readme_training_step_says_nothing(batch: torch.Tensor) -> None:
    # README "The API in 16 lines": convert, then compute_kd_loss(student_loss=...) each step.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = two_losses(TinyNet())
        optimizer = torch.optim.Adam(model.parameters())
        for _ in range(2):
            output = model(batch)
            loss = model.compute_kd_loss(student_loss=F.cross_entropy(output, LABELS))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        kd.export(model)


def test_the_first_example_of_the_docs_says_nothing_about_the_student_loss() -> None:
    page = (DOCS / "index.md").read_text(encoding="utf-8")
    first = re.search(r"```python\n(.*?)```", page, re.DOTALL)
    assert first is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # An instance teacher is not recordable yet (issue 11, item 2): said, and expected.
        warnings.simplefilter("ignore", kd.NotRecordableWarning)
        exec(compile(first.group(1), str(DOCS / "index.md"), "exec"), {})


def test_the_first_compute_kd_loss_without_a_needed_student_loss_warns_once_at_the_caller(
    student: TinyNet, batch: torch.Tensor
) -> None:
    model = two_losses(student)
    model(batch)
    with (
        pytest.warns(kd.StudentLossWeightWarning, match="got no student_loss") as record,
        pytest.raises(ValueError, match="compute_kd_loss got no student_loss"),
    ):
        model.compute_kd_loss()  # the static balancer refuses the missing share
    assert record[0].filename == __file__
    model(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="compute_kd_loss got no student_loss"):
            model.compute_kd_loss()


class KDOnlyWhenAlone(kd.DistillationLossBalancer):
    """Weighs student_loss when given; without it, the KD loss alone (no error)."""

    @property
    def needs_student_loss(self) -> bool:
        return True

    def forward(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        losses = dict(loss_dict)
        student_loss = self.pop_student_loss(losses)
        kd_loss: torch.Tensor = sum(losses.values())  # type: ignore[assignment]
        return kd_loss if student_loss is None else (kd_loss + student_loss) / 2


def test_a_balancer_that_tolerates_the_missing_student_loss_gets_one_warning_per_model(
    batch: torch.Tensor,
) -> None:
    config = {"teacher_model": make_teacher, "criterion": kd.LogitsDistillationLoss()}
    models = [
        kd.convert(TinyNet(), [("kd_loss", {**config, "loss_balancer": KDOnlyWhenAlone()})])
        for _ in range(2)
    ]
    for model in models:
        with pytest.warns(kd.StudentLossWeightWarning):
            model(batch)
            model.compute_kd_loss()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(batch)
            model.compute_kd_loss()


def test_skip_balancer_without_student_loss_does_not_warn(
    student: TinyNet, batch: torch.Tensor
) -> None:
    model = two_losses(student)
    model(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.compute_kd_loss(skip_balancer=True)
