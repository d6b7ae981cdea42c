"""The ``scheduled`` and ``logits_magnitude`` balancers: values, state, save/restore, errors.

``scheduled`` ramps the KD weights from ``start`` to ``end`` over ``steps`` steps, counting the
steps in a buffer so that kd.save/kd.restore resume the ramp exactly. ``logits_magnitude``
rescales intermediate KD losses to the logits loss's magnitude (as Megatron-LM does with
ModelOpt) before weighing the result against the student loss.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import kdcore as kd
from tests.conftest import TinyNet, make_teacher

LABELS = torch.tensor([0, 1, 2, 0, 1])


def settings_of(balancer: Any) -> dict[str, Any]:
    """A balancer's public settings, tuples as lists (a restored one read them from JSON)."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in vars(balancer).items()
        if not key.startswith("_") and key != "training"
    }


@pytest.fixture
def scheduled(builtin_host: kd.PluginHost) -> Any:
    return builtin_host.registries.balancers.get("scheduled")


@pytest.fixture
def magnitude(builtin_host: kd.PluginHost) -> Any:
    return builtin_host.registries.balancers.get("logits_magnitude")


def losses(**values: Any) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in values.items()}


def ramp(start: float, end: float, step: int, steps: int, schedule: str) -> float:
    """The schedule's definition, in plain Python."""
    x = min(step, steps) / steps
    shape = x if schedule == "linear" else (1 - math.cos(math.pi * x)) / 2
    return start + (end - start) * shape


# ====================================================================== scheduled: values
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_kd_weight_ramps_from_start_to_end_over_steps_then_stays(
    scheduled: Any, schedule: str
) -> None:
    balancer = scheduled(steps=6, start=0.1, end=0.7, schedule=schedule)
    for step in range(10):
        expected = ramp(0.1, 0.7, step, 6, schedule)
        assert balancer.kd_weights(1).tolist() == pytest.approx([expected], abs=1e-12)
        total = balancer(losses(student_loss=10.0, A_0=2.0))
        assert total.item() == pytest.approx(expected * 2.0 + (1 - expected) * 10.0, abs=1e-12)
    assert balancer.current_step.item() == 10


def test_the_weight_can_ramp_down(scheduled: Any) -> None:
    balancer = scheduled(steps=4, start=0.9, end=0.1)
    seen = []
    for _ in range(5):
        seen.append(balancer.kd_weights(1).item())
        balancer(losses(student_loss=0.0, A_0=1.0))
    assert seen == pytest.approx([0.9, 0.7, 0.5, 0.3, 0.1])


def test_one_number_is_the_total_kd_weight_split_equally_between_the_kd_losses(
    scheduled: Any,
) -> None:
    balancer = scheduled(steps=2, start=0.0, end=0.6)
    balancer(losses(student_loss=1.0, A_0=1.0, B_1=1.0, C_2=1.0))
    assert balancer.kd_weights(3).tolist() == pytest.approx([0.1, 0.1, 0.1])
    total = balancer(losses(student_loss=5.0, A_0=1.0, B_1=2.0, C_2=3.0))
    assert total.item() == pytest.approx(0.1 * (1 + 2 + 3) + 0.7 * 5.0)


def test_lists_give_one_schedule_per_kd_loss_and_a_number_is_split(scheduled: Any) -> None:
    balancer = scheduled(steps=4, start=0.0, end=[0.4, 0.2], schedule="linear")
    balancer.current_step.fill_(1)
    assert balancer.kd_weights(2).tolist() == pytest.approx([0.1, 0.05])
    balancer = scheduled(steps=4, start=[0.4, 0.0], end=[0.0, 0.8])
    balancer.current_step.fill_(3)
    assert balancer.kd_weights(2).tolist() == pytest.approx([0.1, 0.6])
    total = balancer(losses(student_loss=2.0, A_0=10.0, B_1=20.0))
    assert total.item() == pytest.approx(0.1 * 10 + 0.6 * 20 + 0.3 * 2.0)


def test_kd_weights_follow_criterion_order(scheduled: Any) -> None:
    balancer = scheduled(steps=1, start=[0.9, 0.1], end=[0.9, 0.1])
    assert balancer(losses(Z_0=1.0, A_1=0.0)).item() == pytest.approx(0.9)


def test_the_gradient_of_each_loss_is_its_current_weight(scheduled: Any) -> None:
    balancer = scheduled(steps=4, start=0.0, end=[0.4, 0.4])
    balancer.current_step.fill_(2)
    student = torch.tensor(1.0, requires_grad=True)
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    balancer({"student_loss": student, "A_0": a, "B_1": b}).backward()
    assert (a.grad.item(), b.grad.item(), student.grad.item()) == pytest.approx((0.2, 0.2, 0.6))


def test_the_total_keeps_the_losses_dtype(scheduled: Any) -> None:
    balancer = scheduled(steps=3)
    bf16 = {"student_loss": torch.tensor(1.0), "A_0": torch.tensor(2.0)}
    total = balancer({key: value.to(torch.bfloat16) for key, value in bf16.items()})
    assert total.dtype == torch.bfloat16


def test_weights_ending_at_one_need_no_student_loss(scheduled: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer = scheduled(steps=2, start=1.0, end=[0.5, 0.5])
    assert balancer(losses(A_0=2.0, B_1=4.0)).item() == pytest.approx(3.0)


# ====================================================================== scheduled: advancing
def test_only_training_mode_calls_advance_the_step(scheduled: Any) -> None:
    balancer = scheduled(steps=10)
    balancer.eval()
    for _ in range(3):
        balancer(losses(student_loss=1.0, A_0=1.0))
    assert balancer.current_step.item() == 0
    balancer.train()
    balancer(losses(student_loss=1.0, A_0=1.0))
    assert balancer.current_step.item() == 1


def test_advance_every_counts_micro_batches_per_step(scheduled: Any) -> None:
    balancer = scheduled(steps=4, start=0.0, end=0.4, advance_every=3)
    weights = []
    for _ in range(7):
        weights.append(balancer.kd_weights(1).item())
        balancer(losses(student_loss=1.0, A_0=1.0))
    assert weights == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.2])
    assert (balancer.current_step.item(), balancer.pending_calls.item()) == (2, 1)


def test_advance_every_none_advances_only_by_step(scheduled: Any) -> None:
    balancer = scheduled(steps=4, start=0.0, end=0.4, advance_every=None)
    for _ in range(5):
        balancer(losses(student_loss=1.0, A_0=1.0))
    assert balancer.current_step.item() == 0
    balancer.step()
    balancer.step()
    assert balancer.kd_weights(1).item() == pytest.approx(0.2)


def test_the_step_counter_is_a_buffer_in_the_state_dict(scheduled: Any) -> None:
    balancer = scheduled(steps=4, advance_every=2)
    for _ in range(3):
        balancer(losses(student_loss=1.0, A_0=1.0))
    state = balancer.state_dict()
    assert set(state) == {"current_step", "pending_calls"}
    assert (state["current_step"].item(), state["pending_calls"].item()) == (1, 1)
    assert list(balancer.parameters()) == []
    fresh = scheduled(steps=4, advance_every=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.kd_weights(1), balancer.kd_weights(1))


def test_the_balancer_follows_the_model_between_train_and_eval(
    builtin_host: kd.PluginHost, batch: torch.Tensor
) -> None:
    model = scheduled_model(steps=10)
    model.eval()
    model(batch)
    model.compute_kd_loss(student_loss=torch.tensor(1.0))
    assert model.loss_balancer.current_step.item() == 0
    model.train()
    model(batch)
    model.compute_kd_loss(student_loss=torch.tensor(1.0))
    assert model.loss_balancer.current_step.item() == 1


# ====================================================================== scheduled: save/restore
def scheduled_model(**balancer: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("error", kd.NotRecordableWarning)
        return kd.convert(
            TinyNet(),
            [
                (
                    "kd_loss",
                    {
                        "teacher_model": make_teacher,
                        "criterion": {
                            ("", ""): kd.LogitsDistillationLoss(2.0),
                            ("fc1", "fc1"): {
                                "name": "fitnet",
                                "student_width": 8,
                                "teacher_width": 16,
                            },
                        },
                        "loss_balancer": {"name": "scheduled", **balancer},
                    },
                )
            ],
        )


def train_step(model: Any, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    output = model(batch)
    loss = model.compute_kd_loss(student_loss=F.cross_entropy(output, LABELS))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@pytest.mark.parametrize(
    "balancer",
    [
        {"steps": 8, "start": 0.0, "end": [0.5, 0.3], "schedule": "cosine"},
        {"steps": 5, "start": 0.1, "end": 0.8, "advance_every": 2},
    ],
    ids=["per-loss-cosine", "split-accumulating"],
)
def test_a_model_saved_mid_ramp_resumes_with_exactly_the_next_weights(
    builtin_host: kd.PluginHost, batch: torch.Tensor, tmp_path: Path, balancer: dict[str, Any]
) -> None:
    model = scheduled_model(**balancer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        train_step(model, optimizer, batch)
    path = kd.save(model, tmp_path / "mid-ramp.safetensors", optimizer=optimizer)

    restored: Any = kd.restore(TinyNet(), path)
    restored_optimizer = torch.optim.SGD(restored.parameters(), lr=0.05)
    kd.restore(restored, path, optimizer=restored_optimizer)
    original, resumed = model.loss_balancer, restored.loss_balancer
    assert type(resumed) is type(original)
    assert settings_of(resumed) == settings_of(original)
    assert torch.equal(resumed.current_step, original.current_step)
    assert torch.equal(resumed.pending_calls, original.pending_calls)
    for _ in range(8):  # through the rest of the ramp and past its end
        assert torch.equal(resumed.kd_weights(2), original.kd_weights(2))
        assert train_step(restored, restored_optimizer, batch) == train_step(
            model, optimizer, batch
        )
    assert original.current_step.item() > 3


def test_a_fresh_model_starts_the_ramp_at_step_zero(builtin_host: kd.PluginHost) -> None:
    model = scheduled_model(steps=4, start=0.2, end=0.6)
    assert model.loss_balancer.current_step.item() == 0
    assert model.loss_balancer.kd_weights(2).tolist() == pytest.approx([0.1, 0.1])


# ====================================================================== scheduled: errors
@pytest.mark.parametrize(
    ("kwargs", "error", "shown"),
    [
        ({"steps": 0}, ValueError, "steps must be a positive int, got 0"),
        ({"steps": -3}, ValueError, "steps must be a positive int, got -3"),
        ({"steps": 2.5}, ValueError, "steps must be a positive int, got 2.5"),
        ({"steps": True}, ValueError, "steps must be a positive int, got True"),
        ({"steps": 4, "schedule": "cosin"}, ValueError, "'cosin'; did you mean 'cosine'"),
        ({"steps": 4, "schedule": "step"}, ValueError, "one of linear, cosine; got 'step'"),
        ({"steps": 4, "advance_every": 0}, ValueError, "advance_every must .*got 0"),
        ({"steps": 4, "advance_every": True}, ValueError, "advance_every must .*got True"),
        (
            {"steps": 4, "start": -0.1},
            ValueError,
            r"start weights must be finite and >= 0, got -0\.1",
        ),
        ({"steps": 4, "end": float("nan")}, ValueError, "end weights must be finite.*nan"),
        ({"steps": 4, "end": [0.2, float("inf")]}, ValueError, "end weights.*inf"),
        ({"steps": 4, "end": 1.5}, ValueError, r"end weights must sum to at most 1, got 1\.5"),
        ({"steps": 4, "start": [0.6, 0.6]}, ValueError, r"start .*at most 1, got \[0\.6, 0\.6\]"),
        (
            {"steps": 4, "start": "0.1"},
            TypeError,
            "start must be a number or a list of numbers, got '0.1'",
        ),
        ({"steps": 4, "end": [0.1, None]}, TypeError, "end must be .*got None"),
        ({"steps": 4, "end": False}, TypeError, "end must be .*got False"),
        ({"steps": 4, "end": []}, ValueError, "end is empty"),
        (
            {"steps": 4, "start": [0.1, 0.1], "end": [0.1, 0.2, 0.3]},
            ValueError,
            r"start=\[0\.1, 0\.1\] and end=\[0\.1, 0\.2, 0\.3\] give different numbers",
        ),
    ],
)
def test_scheduled_refuses_bad_arguments_naming_the_value(
    scheduled: Any, kwargs: dict[str, Any], error: type, shown: str
) -> None:
    with pytest.raises(error, match=shown):
        scheduled(**kwargs)


def test_scheduled_refuses_a_per_loss_list_of_the_wrong_length(scheduled: Any) -> None:
    balancer = scheduled(steps=4, end=[0.2, 0.3])
    with pytest.raises(
        ValueError,
        match=r"end=\[0\.2, 0\.3\] gives 2 weight\(s\) but there are 3 KD losses \(A_0, B_1, C_2\)",
    ):
        balancer.check_kd_losses(["A_0", "B_1", "C_2"])
    with pytest.raises(ValueError, match="2 weight"):
        balancer(losses(student_loss=1.0, A_0=1.0))


def test_convert_reports_a_length_mismatch_at_the_balancer(builtin_host: kd.PluginHost) -> None:
    config = {
        "teacher_model": make_teacher(),
        "criterion": {"name": "logits"},
        "loss_balancer": {"name": "scheduled", "steps": 3, "end": [0.2, 0.3]},
    }
    with pytest.raises(kd.ConfigError, match="2 weight") as info:
        kd.convert(TinyNet(), [("kd_loss", config)])
    assert info.value.path == "kd_loss.loss_balancer"


def test_scheduled_needs_the_student_loss_when_an_end_sums_below_one_and_refuses_its_absence(
    scheduled: Any,
) -> None:
    assert not scheduled(steps=2, start=1.0, end=[0.5, 0.5]).needs_student_loss
    balancer = scheduled(steps=2, start=0.0, end=1.0)
    assert balancer.needs_student_loss
    with pytest.raises(ValueError, match="compute_kd_loss got no student_loss"):
        balancer(losses(A_0=1.0))


def test_scheduled_does_not_mutate_the_loss_dict(scheduled: Any) -> None:
    balancer = scheduled(steps=2)
    balancer.set_student_loss_reduction_fn(lambda loss: loss.mean())
    loss_dict = {"student_loss": torch.tensor([1.0, 3.0]), "A_0": torch.tensor(4.0)}
    snapshot = dict(loss_dict)
    assert balancer(loss_dict).item() == pytest.approx(2.0)
    assert loss_dict == snapshot


def test_scheduled_keeps_its_constructor_arguments_unchanged(scheduled: Any) -> None:
    balancer = scheduled(7, (0.1, 0.2), [0.3, 0.4], "cosine", None)
    assert (balancer.steps, balancer.start, balancer.end) == (7, (0.1, 0.2), [0.3, 0.4])
    assert (balancer.schedule, balancer.advance_every) == ("cosine", None)


# ====================================================================== logits_magnitude
def test_intermediate_losses_are_averaged_and_rescaled_to_the_logits_loss(
    magnitude: Any,
) -> None:
    balancer = magnitude(kd_loss_weight=0.4)
    total = balancer(losses(student_loss=3.0, Logits_0=2.0, Hidden_1=10.0, Hidden_2=30.0))
    # K = L + mean(I) * |L| / |mean(I)| = 2 + 2 = 4; total = 0.4 * 4 + 0.6 * 3
    assert total.item() == pytest.approx(0.4 * 4.0 + 0.6 * 3.0)


def test_the_scale_is_a_constant_computed_on_detached_values(magnitude: Any) -> None:
    balancer = magnitude(kd_loss_weight=0.5)
    logits = torch.tensor(2.0, requires_grad=True)
    hidden_a = torch.tensor(10.0, requires_grad=True)
    hidden_b = torch.tensor(30.0, requires_grad=True)
    student = torch.tensor(1.0, requires_grad=True)
    balancer({"student_loss": student, "L_0": logits, "H_1": hidden_a, "H_2": hidden_b}).backward()
    scale = 2.0 / 20.0
    assert logits.grad.item() == pytest.approx(0.5)  # no gradient through the scale
    assert hidden_a.grad.item() == pytest.approx(0.5 * scale / 2)
    assert hidden_b.grad.item() == pytest.approx(0.5 * scale / 2)
    assert student.grad.item() == pytest.approx(0.5)


@pytest.mark.parametrize("logits_loss", ["Logits_1", 1])
def test_the_logits_loss_can_be_named_by_key_or_index(magnitude: Any, logits_loss: Any) -> None:
    balancer = magnitude(kd_loss_weight=1.0, logits_loss=logits_loss)
    total = balancer(losses(Hidden_0=8.0, Logits_1=3.0))
    assert total.item() == pytest.approx(3.0 + 3.0)
    hidden = torch.tensor(8.0, requires_grad=True)
    balancer({"Hidden_0": hidden, "Logits_1": torch.tensor(3.0)}).backward()
    assert hidden.grad.item() == pytest.approx(3.0 / 8.0)


def test_a_single_kd_loss_is_weighed_against_the_student_loss(magnitude: Any) -> None:
    balancer = magnitude(kd_loss_weight=0.25)
    assert balancer(losses(student_loss=4.0, Logits_0=8.0)).item() == pytest.approx(
        0.25 * 8 + 0.75 * 4
    )


def test_a_zero_intermediate_loss_is_left_unscaled(magnitude: Any) -> None:
    balancer = magnitude(kd_loss_weight=1.0)
    hidden = torch.tensor(0.0, requires_grad=True)
    total = balancer({"L_0": torch.tensor(5.0), "H_1": hidden})
    total.backward()
    assert total.item() == 5.0 and hidden.grad.item() == 1.0


def test_magnitudes_are_absolute_so_a_negative_loss_keeps_its_sign(magnitude: Any) -> None:
    balancer = magnitude(kd_loss_weight=1.0)
    assert balancer(losses(L_0=2.0, H_1=-8.0)).item() == pytest.approx(2.0 - 2.0)


def test_match_student_loss_rescales_the_kd_loss_to_the_student_loss(magnitude: Any) -> None:
    balancer = magnitude(kd_loss_weight=0.5, match_student_loss=True)
    logits = torch.tensor(4.0, requires_grad=True)
    hidden = torch.tensor(1.0, requires_grad=True)
    student = torch.tensor(2.0, requires_grad=True)
    total = balancer({"student_loss": student, "L_0": logits, "H_1": hidden})
    total.backward()
    # K = 4 + 1 * 4 = 8, rescaled to |S| = 2; total = 0.5 * 2 + 0.5 * 2
    assert total.item() == pytest.approx(2.0)
    assert logits.grad.item() == pytest.approx(0.5 * 2.0 / 8.0)
    assert hidden.grad.item() == pytest.approx(0.5 * 4.0 * 2.0 / 8.0)
    assert student.grad.item() == pytest.approx(0.5)


def test_magnitude_through_a_converted_model(
    builtin_host: kd.PluginHost, batch: torch.Tensor
) -> None:
    model: Any = kd.convert(
        TinyNet(),
        [
            (
                "kd_loss",
                {
                    "teacher_model": make_teacher,
                    "criterion": {
                        ("", ""): {"name": "logits"},
                        ("fc1", "fc1"): {
                            "name": "fitnet",
                            "student_width": 8,
                            "teacher_width": 16,
                        },
                    },
                    "loss_balancer": {"name": "logits_magnitude", "kd_loss_weight": 0.7},
                },
            )
        ],
    )
    output = model(batch)
    student_loss = F.cross_entropy(output, LABELS)
    parts = model.compute_kd_loss(student_loss=student_loss, skip_balancer=True)
    model(batch)
    total = model.compute_kd_loss(student_loss=student_loss)
    logits, hidden = parts["LogitsDistillationLoss_0"], parts["FitNetLoss_1"]
    expected = 0.7 * (logits + hidden * (logits / hidden)) + 0.3 * student_loss
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "shown"),
    [
        ({"kd_loss_weight": -0.1}, ValueError, r"kd_loss_weight must be in \[0, 1\], got -0\.1"),
        ({"kd_loss_weight": 1.5}, ValueError, r"kd_loss_weight must be in \[0, 1\], got 1\.5"),
        ({"kd_loss_weight": float("nan")}, ValueError, "kd_loss_weight.*nan"),
        ({"kd_loss_weight": True}, TypeError, "kd_loss_weight must be a number, got True"),
        ({"kd_loss_weight": "0.5"}, TypeError, "kd_loss_weight must be a number, got '0.5'"),
        ({"logits_loss": -1}, ValueError, "logits_loss must be .*got -1"),
        ({"logits_loss": ""}, ValueError, "logits_loss must be .*got ''"),
        ({"logits_loss": True}, ValueError, "logits_loss must be .*got True"),
        ({"logits_loss": 1.0}, ValueError, "logits_loss must be .*got 1.0"),
        ({"match_student_loss": 1}, TypeError, "match_student_loss must be a bool, got 1"),
    ],
)
def test_magnitude_refuses_bad_arguments_naming_the_value(
    magnitude: Any, kwargs: dict[str, Any], error: type, shown: str
) -> None:
    with pytest.raises(error, match=shown):
        magnitude(**kwargs)


def test_magnitude_refuses_an_unknown_logits_loss_with_a_suggestion(magnitude: Any) -> None:
    balancer = magnitude(logits_loss="LogitsDistillationLoss_1")
    with pytest.raises(
        ValueError,
        match=r"'LogitsDistillationLoss_1' is not a KD loss; did you mean 'LogitsDistillationLoss_0'\? "
        r"\(KD losses: LogitsDistillationLoss_0, FitNetLoss_1\)",
    ):
        balancer.check_kd_losses(["LogitsDistillationLoss_0", "FitNetLoss_1"])
    with pytest.raises(ValueError, match=r"logits_loss=2 but there are 2 KD losses"):
        magnitude(logits_loss=2).check_kd_losses(["A_0", "B_1"])


def test_convert_reports_an_unknown_logits_loss_at_the_balancer(
    builtin_host: kd.PluginHost,
) -> None:
    config = {
        "teacher_model": make_teacher(),
        "criterion": {"name": "logits"},
        "loss_balancer": {"name": "logits_magnitude", "logits_loss": "Logits_0"},
    }
    with pytest.raises(kd.ConfigError, match="not a KD loss") as info:
        kd.convert(TinyNet(), [("kd_loss", config)])
    assert info.value.path == "kd_loss.loss_balancer"


def test_magnitude_refuses_non_scalar_losses_naming_them(magnitude: Any) -> None:
    balancer = magnitude(kd_loss_weight=1.0)
    with pytest.raises(ValueError, match=r"H_1 has shape \(2,\).*scalar"):
        balancer({"L_0": torch.tensor(1.0), "H_1": torch.ones(2)})
    balancer = magnitude(kd_loss_weight=0.5)
    with pytest.raises(ValueError, match=r"student_loss has shape \(3,\)"):
        balancer({"student_loss": torch.ones(3), "L_0": torch.tensor(1.0)})


@pytest.mark.parametrize(
    "kwargs", [{"kd_loss_weight": 0.5}, {"kd_loss_weight": 1.0, "match_student_loss": True}]
)
def test_magnitude_needs_and_then_requires_the_student_loss(
    magnitude: Any, kwargs: dict[str, Any]
) -> None:
    balancer = magnitude(**kwargs)
    assert balancer.needs_student_loss
    with pytest.raises(ValueError, match="needs student_loss, but compute_kd_loss got none"):
        balancer(losses(L_0=1.0))


def test_magnitude_with_full_kd_weight_needs_no_student_loss(magnitude: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer = magnitude(kd_loss_weight=1)
    assert balancer(losses(L_0=1.5)).item() == 1.5


def test_magnitude_has_no_state_and_does_not_mutate_the_loss_dict(magnitude: Any) -> None:
    balancer = magnitude()
    assert balancer.state_dict() == {} and list(balancer.parameters()) == []
    loss_dict = losses(student_loss=1.0, L_0=2.0, H_1=3.0)
    snapshot = dict(loss_dict)
    balancer(loss_dict)
    assert loss_dict == snapshot


# ====================================================================== both: recorded
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("scheduled", {"steps": 9, "start": [0.1, 0.0], "end": (0.4, 0.2), "schedule": "cosine"}),
        ("scheduled", {"steps": 3, "advance_every": None}),
        ("logits_magnitude", {"kd_loss_weight": 0.3, "logits_loss": 0, "match_student_loss": True}),
        ("logits_magnitude", {"logits_loss": "LogitsDistillationLoss_0"}),
    ],
)
def test_the_balancer_is_recorded_and_rebuilt_by_kd_restore(
    builtin_host: kd.PluginHost,
    batch: torch.Tensor,
    tmp_path: Path,
    name: str,
    kwargs: dict[str, Any],
) -> None:
    balancer = builtin_host.registries.balancers.get(name)(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kd.NotRecordableWarning)
        model: Any = kd.convert(
            TinyNet(),
            [
                (
                    "kd_loss",
                    {
                        "teacher_model": make_teacher,
                        "criterion": {
                            ("", ""): kd.LogitsDistillationLoss(),
                            ("fc1", "fc1"): {
                                "name": "hidden_cosine",
                                "student_width": 8,
                                "teacher_width": 16,
                            },
                        },
                        "loss_balancer": balancer,
                    },
                )
            ],
        )
    model(batch)
    model.compute_kd_loss(student_loss=torch.tensor(1.0))
    path = kd.save(model, tmp_path / "run.safetensors")
    restored: Any = kd.restore(TinyNet(), path)
    assert type(restored.loss_balancer) is type(balancer)
    assert settings_of(restored.loss_balancer) == settings_of(balancer)
    assert restored.loss_balancer.state_dict().keys() == balancer.state_dict().keys()
    for key, value in balancer.state_dict().items():
        assert torch.equal(restored.loss_balancer.state_dict()[key], value)
    model(batch)
    restored(batch)
    assert torch.equal(
        restored.compute_kd_loss(student_loss=torch.tensor(1.0)),
        model.compute_kd_loss(student_loss=torch.tensor(1.0)),
    )
