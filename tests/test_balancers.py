"""StaticLossBalancer (``static``): REFERENCE.md section 1, without the section 2 defects
(``StaticLossBalancer(1)`` crashing, negative single weights accepted)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import kdcore as kd
from tests.conftest import TinyNet, make_teacher


@pytest.fixture
def static(builtin_host: kd.PluginHost) -> Any:
    """The class registered as ``static`` in a fresh host."""
    return builtin_host.registries.balancers.get("static")


def losses(**values: float) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value) for name, value in values.items()}


# ------------------------------------------------------------------ the formula
@pytest.mark.parametrize(
    ("weights", "kd_values", "student"),
    [
        (0.5, [2.0], 4.0),
        (0.25, [8.0], 1.0),
        ([0.2, 0.3], [1.0, 10.0], 100.0),
        ([0.1, 0.2, 0.3], [3.0, 5.0, 7.0], 11.0),
    ],
)
def test_total_is_weighted_kd_losses_plus_remaining_weight_times_student_loss(
    static: Any, weights: Any, kd_values: list[float], student: float
) -> None:
    balancer = static(weights)
    weight_list = weights if isinstance(weights, list) else [weights]
    loss_dict = {"student_loss": torch.tensor(student)}
    loss_dict.update({f"Loss_{i}": torch.tensor(v) for i, v in enumerate(kd_values)})
    expected = sum(w * v for w, v in zip(weight_list, kd_values, strict=True))
    expected += (1 - sum(weight_list)) * student
    assert balancer(loss_dict).item() == pytest.approx(expected, rel=1e-6)


def test_weights_follow_criterion_order_not_key_order(static: Any) -> None:
    balancer = static([0.9, 0.1])
    total = balancer({"Z_0": torch.tensor(1.0), "A_1": torch.tensor(0.0)})
    assert total.item() == pytest.approx(0.9)


def test_weights_summing_to_one_need_no_student_loss(static: Any) -> None:
    assert static([0.25, 0.75])(losses(A_0=4.0, B_1=8.0)).item() == pytest.approx(7.0)


def test_a_given_student_loss_with_weights_summing_to_one_does_not_change_the_total(
    static: Any,
) -> None:
    balancer = static(1.0)
    assert balancer(losses(student_loss=5.0, A_0=3.0)).item() == pytest.approx(3.0)


def test_default_weight_is_half(static: Any) -> None:
    balancer = static()
    assert balancer.weights == [0.5]
    assert balancer(losses(student_loss=2.0, A_0=4.0)).item() == pytest.approx(3.0)


def test_total_backpropagates_into_every_loss(static: Any) -> None:
    student_loss = torch.tensor(2.0, requires_grad=True)
    kd_loss = torch.tensor(3.0, requires_grad=True)
    static(0.3)({"student_loss": student_loss, "A_0": kd_loss}).backward()
    assert kd_loss.grad is not None and kd_loss.grad.item() == pytest.approx(0.3)
    assert student_loss.grad is not None and student_loss.grad.item() == pytest.approx(0.7)


# ------------------------------------------------------------------ accepted weights
@pytest.mark.parametrize("weight", [1, 0, [0, 1], (1, 0), [1]])
def test_int_weights_are_accepted(static: Any, weight: Any) -> None:
    balancer = static(weight)
    assert all(isinstance(w, float) for w in balancer.weights)


def test_int_weight_1_puts_everything_on_the_kd_loss(static: Any) -> None:
    assert static(1)(losses(A_0=3.0)).item() == 3.0


def test_int_weights_0_and_1_pick_the_second_kd_loss(static: Any) -> None:
    assert static([0, 1])(losses(A_0=3.0, B_1=5.0)).item() == 5.0


def test_zero_weight_means_student_loss_only(static: Any) -> None:
    balancer = static(0.0)
    assert balancer(losses(student_loss=2.0, A_0=9.0)).item() == 2.0


def test_a_sum_a_rounding_error_above_one_is_accepted_and_weighs_student_loss_zero(
    static: Any,
) -> None:
    balancer = static([0.5, 0.5 + 1e-12])
    assert balancer.student_loss_weight == 0.0


# ------------------------------------------------------------------ refused weights
@pytest.mark.parametrize(
    ("weight", "shown"),
    [
        (-0.1, "-0.1"),
        ([0.5, -0.2], "-0.2"),
        (-1, "-1"),
        (float("nan"), "nan"),
        ([0.2, float("inf")], "inf"),
    ],
)
def test_negative_or_non_finite_weights_are_refused_naming_the_value(
    static: Any, weight: Any, shown: str
) -> None:
    with pytest.raises(ValueError, match=rf"kd_loss_weight.*{shown}"):
        static(weight)


@pytest.mark.parametrize(
    ("weight", "shown"),
    [
        (True, "True"),
        ([0.5, False], "False"),
        ("0.5", "'0.5'"),
        (None, "None"),
        ([[0.5]], r"\[0.5\]"),
    ],
)
def test_bools_and_non_numbers_are_refused_naming_the_value(
    static: Any, weight: Any, shown: str
) -> None:
    with pytest.raises(TypeError, match=rf"kd_loss_weight.*{shown}"):
        static(weight)


@pytest.mark.parametrize("weight", [[], ()])
def test_an_empty_weight_list_is_refused(static: Any, weight: Any) -> None:
    with pytest.raises(ValueError, match="kd_loss_weight is empty"):
        static(weight)


@pytest.mark.parametrize(
    ("weight", "shown"), [(1.5, "1.5"), (2, "2"), ([0.6, 0.6], r"\[0.6, 0.6\]")]
)
def test_weights_summing_to_more_than_one_are_refused_naming_them(
    static: Any, weight: Any, shown: str
) -> None:
    with pytest.raises(ValueError, match=rf"sum to at most 1, got {shown}"):
        static(weight)


# ------------------------------------------------------------------ needs_student_loss
@pytest.mark.parametrize(("weight", "needed"), [(0.5, True), ([0.1, 0.2], True), (1.0, False),
                                                 (1, False), ([0.4, 0.6], False)])  # fmt: skip
def test_weights_summing_to_less_than_one_need_the_student_loss(
    static: Any, weight: Any, needed: bool
) -> None:
    assert static(weight).needs_student_loss is needed


def test_building_a_balancer_that_needs_the_student_loss_does_not_warn(static: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        static(0.5)


# ------------------------------------------------------------------ count mismatches
def test_check_kd_losses_refuses_a_weight_count_that_differs_from_the_loss_count(
    static: Any,
) -> None:
    with pytest.raises(
        ValueError, match=r"2 weight\(s\) but there are 3 KD losses \(A_0, B_1, C_2\)"
    ):
        static([0.5, 0.5]).check_kd_losses(["A_0", "B_1", "C_2"])


def test_check_kd_losses_accepts_a_matching_count(static: Any) -> None:
    static([0.5, 0.5]).check_kd_losses(["A_0", "B_1"])


def test_forward_refuses_a_loss_dict_with_a_different_kd_loss_count(static: Any) -> None:
    with pytest.raises(ValueError, match=r"1 weight\(s\) but there are 2 KD losses"):
        static(1.0)(losses(A_0=1.0, B_1=2.0))


def test_forward_does_not_count_student_loss_as_a_kd_loss(static: Any) -> None:
    balancer = static([0.2, 0.3])
    with pytest.raises(ValueError, match=r"2 weight.*1 KD losses"):
        balancer(losses(student_loss=1.0, A_0=1.0))


def test_convert_refuses_a_weight_count_mismatch_as_a_config_error_at_the_balancer(
    builtin_host: kd.PluginHost,
) -> None:
    student = TinyNet()
    config = {
        "teacher_model": make_teacher(),
        "criterion": {("", ""): {"name": "logits"}, ("fc1", "fc1"): {"name": "mse"}},
        "loss_balancer": {"name": "static", "kd_loss_weight": [0.2, 0.3, 0.5]},
    }
    with pytest.raises(kd.ConfigError, match="3 weight") as info:
        kd.convert(student, [("kd_loss", config)])
    assert info.value.path == "kd_loss.loss_balancer"
    assert type(student) is TinyNet  # a refused convert leaves the student as it was


def test_convert_reports_a_refused_weight_as_a_config_error_at_the_balancer(
    builtin_host: kd.PluginHost,
) -> None:
    config = {
        "teacher_model": make_teacher(),
        "criterion": {"name": "logits"},
        "loss_balancer": {"name": "static", "kd_loss_weight": -0.5},
    }
    with pytest.raises(kd.ConfigError, match=r"-0\.5") as info:
        kd.convert(TinyNet(), [("kd_loss", config)])
    assert info.value.path == "kd_loss.loss_balancer"


# ------------------------------------------------------------------ student loss
def test_missing_student_loss_is_an_error_when_weights_sum_below_one(static: Any) -> None:
    with pytest.raises(ValueError, match=r"sum to 0.4.*0.6 of the total is student_loss"):
        static(0.4)(losses(A_0=1.0))


def test_reduction_fn_is_applied_to_the_student_loss(static: Any) -> None:
    balancer = static(0.5)
    balancer.set_student_loss_reduction_fn(lambda loss: loss.mean())
    total = balancer({"student_loss": torch.tensor([1.0, 3.0]), "A_0": torch.tensor(4.0)})
    assert total.shape == ()
    assert total.item() == pytest.approx(0.5 * 4.0 + 0.5 * 2.0)


def test_reduction_fn_is_not_applied_to_kd_losses(static: Any) -> None:
    balancer = static(0.5)
    seen: list[torch.Tensor] = []
    balancer.set_student_loss_reduction_fn(lambda loss: seen.append(loss) or loss * 10)
    total = balancer(losses(student_loss=1.0, A_0=4.0))
    assert [t.item() for t in seen] == [1.0]
    assert total.item() == pytest.approx(0.5 * 4.0 + 0.5 * 10.0)


def test_reduction_fn_can_be_removed(static: Any) -> None:
    balancer = static(0.5)
    balancer.set_student_loss_reduction_fn(lambda loss: loss * 10)
    balancer.set_student_loss_reduction_fn(None)
    assert balancer(losses(student_loss=2.0, A_0=4.0)).item() == pytest.approx(3.0)


# ------------------------------------------------------------------ module hygiene
@pytest.mark.parametrize("weight", [0.5, [0.2, 0.3]])
def test_the_balancer_has_no_parameters_or_buffers(static: Any, weight: Any) -> None:
    balancer = static(weight)
    assert list(balancer.parameters()) == []
    assert balancer.state_dict() == {}


def test_the_balancer_does_not_mutate_the_loss_dict(static: Any) -> None:
    balancer = static(0.5)
    balancer.set_student_loss_reduction_fn(lambda loss: loss.mean())
    loss_dict = {"student_loss": torch.tensor([1.0, 3.0]), "A_0": torch.tensor(4.0)}
    snapshot = dict(loss_dict)
    balancer(loss_dict)
    assert list(loss_dict) == list(snapshot)
    assert all(loss_dict[k] is snapshot[k] for k in snapshot)
    assert torch.equal(loss_dict["student_loss"], torch.tensor([1.0, 3.0]))


def test_the_balancer_is_a_distillation_loss_balancer(static: Any) -> None:
    assert issubclass(static, kd.DistillationLossBalancer)
    assert static is kd.StaticLossBalancer


def test_the_repr_shows_the_weights(static: Any) -> None:
    assert "kd_loss_weight=[0.2, 0.3]" in repr(static([0.2, 0.3]))


# ------------------------------------------------------------------ through a model
def test_a_converted_model_combines_student_and_kd_losses_with_the_static_weights(
    builtin_host: kd.PluginHost, batch: torch.Tensor
) -> None:
    model: Any = kd.convert(
        TinyNet(),
        [
            (
                "kd_loss",
                {
                    "teacher_model": make_teacher(),
                    "criterion": {"name": "logits", "reduction": "batchmean"},
                    "loss_balancer": {"name": "static", "kd_loss_weight": 0.3},
                },
            )
        ],
    )
    output = model(batch)
    student_loss = output.pow(2).mean()
    parts = model.compute_kd_loss(student_loss=student_loss, skip_balancer=True)
    model(batch)
    total = model.compute_kd_loss(student_loss=student_loss)
    expected = 0.3 * parts["LogitsDistillationLoss_0"] + 0.7 * student_loss
    torch.testing.assert_close(total, expected)
