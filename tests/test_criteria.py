"""The built-in criteria, each checked against an independent computation of its definition.

``logits`` and ``mse`` follow REFERENCE.md section 1; ``mft`` (the Minifinetuning paper, arXiv
2506.15702) must survive ignore-index labels (section 2); ``mgd`` follows Masked Generative
Distillation (arXiv 2205.01529). The values of ``mft`` and ``mgd`` are compared with the
reference's formulas in ``tests/test_seed_losses.py``.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdcore as kd

TOL = {"atol": 1e-6, "rtol": 1e-6}


@pytest.fixture
def criteria(builtin_host: kd.PluginHost) -> Any:
    """The criterion registry of a fresh host: losses are looked up by their registered names."""
    return builtin_host.registries.criteria


def reference_kd(s: torch.Tensor, t: torch.Tensor, temperature: float, reduction: str) -> Any:
    """REFERENCE.md: F.kl_div(log_softmax(s/T), softmax(t/T), reduction) * T**2."""
    log_p = F.log_softmax(s / temperature, dim=-1)
    q = F.softmax(t / temperature, dim=-1)
    if reduction == "none":
        return F.kl_div(log_p, q, reduction="none").sum(-1) * temperature**2
    with warnings.catch_warnings():  # F.kl_div warns that "mean" also divides by the classes
        warnings.simplefilter("ignore", UserWarning)
        return F.kl_div(log_p, q, reduction=reduction) * temperature**2


# ====================================================================== logits
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logits_loss_equals_reference_kl_div_times_t_squared(
    criteria: Any, shape: tuple[int, ...], reduction: str, temperature: float
) -> None:
    student, teacher = torch.randn(shape) * 3, torch.randn(shape) * 3
    loss = criteria.get("logits")(temperature=temperature, reduction=reduction)
    torch.testing.assert_close(
        loss(student, teacher), reference_kd(student, teacher, temperature, reduction), **TOL
    )


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7)], ids=["2d", "3d"])
def test_logits_loss_none_reduction_gives_one_loss_per_position(
    criteria: Any, shape: tuple[int, ...]
) -> None:
    loss = criteria.get("logits")(reduction="none")(torch.randn(shape), torch.randn(shape))
    assert loss.shape == shape[:-1]


def test_logits_loss_default_is_temperature_1_mean(criteria: Any) -> None:
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(
        criteria.get("logits")()(student, teacher),
        reference_kd(student, teacher, 1.0, "mean"),
        **TOL,
    )


def test_logits_loss_is_zero_when_student_matches_teacher(criteria: Any) -> None:
    logits = torch.randn(4, 6)
    assert criteria.get("logits")(reduction="sum")(logits, logits.clone()).abs() < 1e-6


def test_logits_loss_gradient_reaches_the_student_only(criteria: Any) -> None:
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    criteria.get("logits")(temperature=2.0)(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_logits_loss_reads_the_logits_attribute_of_model_outputs(criteria: Any) -> None:
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    loss = criteria.get("logits")(reduction="sum")
    wrapped = loss(SimpleNamespace(logits=student), SimpleNamespace(logits=teacher, hidden=None))
    assert torch.equal(wrapped, loss(student, teacher))


def test_logits_loss_takes_the_first_element_of_tuple_outputs(criteria: Any) -> None:
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    loss = criteria.get("logits")(reduction="sum")
    assert torch.equal(loss((student, "extra"), [teacher, None]), loss(student, teacher))


def test_logits_loss_refuses_an_output_without_logits_naming_its_type(criteria: Any) -> None:
    with pytest.raises(TypeError, match=r"student.*dict"):
        criteria.get("logits")()({"logits": "not a tensor"}, torch.randn(2, 3))


@pytest.mark.parametrize(
    ("temperature", "shown"),
    [(0, "0"), (0.0, "0.0"), (-1.5, "-1.5"), (float("nan"), "nan"), (float("inf"), "inf")],
)
def test_logits_loss_refuses_a_temperature_that_is_not_finite_and_positive(
    criteria: Any, temperature: float, shown: str
) -> None:
    with pytest.raises(ValueError, match=rf"temperature.*{shown}"):
        criteria.get("logits")(temperature=temperature)


@pytest.mark.parametrize("temperature", [True, "2.0", None])
def test_logits_loss_refuses_a_temperature_that_is_not_a_number(
    criteria: Any, temperature: object
) -> None:
    with pytest.raises(TypeError, match=rf"temperature.*{temperature!r}"):
        criteria.get("logits")(temperature=temperature)


def test_logits_loss_accepts_an_int_temperature(criteria: Any) -> None:
    assert criteria.get("logits")(temperature=2).temperature == 2.0


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None])
def test_logits_loss_refuses_an_unknown_reduction_naming_it(criteria: Any, reduction: Any) -> None:
    with pytest.raises(ValueError, match=rf"reduction.*{reduction!r}"):
        criteria.get("logits")(reduction=reduction)


def test_logits_loss_shape_mismatch_error_names_both_shapes(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"\(4, 6\).*\(4, 7\)"):
        criteria.get("logits")()(torch.randn(4, 6), torch.randn(4, 7))


# ====================================================================== mft
def confident_teacher_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits and labels: in rows 0, 1 and 3 the teacher's argmax is not the label (row 1
    ties), in row 2 it is, by far."""
    logits = torch.tensor(
        [
            [2.0, 2.1, 0.0, -1.0],  # label 0 trails class 1
            [0.0, 0.0, 0.0, 0.0],  # uniform: label 2 ties everything
            [5.0, 0.0, 0.0, 0.0],  # label 0 leads by ~0.96
            [0.5, 3.0, 2.9, 0.0],  # label 2 trails class 1 slightly
        ]
    )
    return logits, torch.tensor([0, 2, 0, 2])


def test_mft_correction_makes_the_label_lead_the_runner_up_by_exactly_threshold(
    criteria: Any,
) -> None:
    logits, labels = confident_teacher_rows()
    corrected = criteria.get("mft")(threshold=0.2).corrected_teacher(logits, labels)
    for row in (0, 1, 3):
        label = int(labels[row])
        others = torch.cat([corrected[row, :label], corrected[row, label + 1 :]])
        assert (corrected[row, label] - others.max()).item() == pytest.approx(0.2, abs=1e-6)


def test_mft_correction_keeps_leading_rows_bit_for_bit_even_for_small_probabilities(
    criteria: Any,
) -> None:
    logits = torch.randn(256, 12) * 0.5  # flat rows: the argmax holds ~0.1-0.4 of the mass
    labels = logits.argmax(-1)
    corrected = criteria.get("mft")(threshold=0.0).corrected_teacher(logits, labels)
    assert torch.equal(corrected, torch.softmax(logits, dim=-1))


def test_mft_corrected_rows_are_distributions(criteria: Any) -> None:
    logits, labels = torch.randn(64, 9) * 4, torch.randint(0, 9, (64,))
    corrected = criteria.get("mft")(threshold=0.3).corrected_teacher(logits, labels)
    torch.testing.assert_close(corrected.sum(-1), torch.ones(64), **TOL)
    assert (corrected >= 0).all()


def test_mft_correction_keeps_the_order_of_the_non_label_classes(criteria: Any) -> None:
    logits, labels = confident_teacher_rows()
    corrected = criteria.get("mft")().corrected_teacher(logits, labels)
    p = torch.softmax(logits, dim=-1)
    ratios = corrected[0, 1:] / p[0, 1:]  # row 0, label 0: the others are scaled by one factor
    torch.testing.assert_close(ratios, ratios[:1].expand(3), **TOL)


def test_mft_ignores_label_minus_100_as_if_those_rows_were_absent(criteria: Any) -> None:
    student, teacher = torch.randn(10, 5), torch.randn(10, 5)
    labels = torch.randint(0, 5, (10,))
    labels[[1, 4, 7]] = -100
    keep = labels != -100
    loss = criteria.get("mft")()
    torch.testing.assert_close(
        loss(student, teacher, labels), loss(student[keep], teacher[keep], labels[keep]), **TOL
    )


def test_mft_with_every_label_ignored_is_zero_and_still_backpropagates(criteria: Any) -> None:
    student = torch.randn(2, 3, 5, requires_grad=True)
    loss = criteria.get("mft")()(student, torch.randn(2, 3, 5), torch.full((2, 3), -100))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert student.grad is not None and torch.equal(student.grad, torch.zeros_like(student))


def test_mft_honours_a_custom_ignore_index(criteria: Any) -> None:
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([1, -1, 3, -1])
    loss = criteria.get("mft")(ignore_index=-1)
    torch.testing.assert_close(
        loss(student, teacher, labels), loss(student[[0, 2]], teacher[[0, 2]], labels[[0, 2]])
    )


def test_mft_gradient_reaches_the_student_only(criteria: Any) -> None:
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    criteria.get("mft")()(student, teacher, torch.tensor([0, 1, 2, 3])).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("bad_label", [5, 17, -1, -99])
def test_mft_refuses_labels_outside_the_class_range(criteria: Any, bad_label: int) -> None:
    labels = torch.tensor([0, bad_label, 2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        criteria.get("mft")()(torch.randn(3, 5), torch.randn(3, 5), labels)


def test_mft_refuses_a_label_count_that_does_not_match_the_positions(criteria: Any) -> None:
    with pytest.raises(ValueError, match="4 labels for 6 positions"):
        criteria.get("mft")()(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.zeros(4).long())


def test_mft_refuses_float_labels(criteria: Any) -> None:
    with pytest.raises(TypeError, match=r"integer tensor.*float32"):
        criteria.get("mft")()(torch.randn(3, 5), torch.randn(3, 5), torch.zeros(3))


@pytest.mark.parametrize("threshold", [-0.1, 1.0, 1.5, float("nan")])
def test_mft_refuses_a_threshold_outside_0_1(criteria: Any, threshold: float) -> None:
    with pytest.raises(ValueError, match=rf"threshold.*{threshold!r}"):
        criteria.get("mft")(threshold=threshold)


@pytest.mark.parametrize("threshold", [True, "0.2"])
def test_mft_refuses_a_threshold_that_is_not_a_number(criteria: Any, threshold: object) -> None:
    with pytest.raises(TypeError, match="threshold"):
        criteria.get("mft")(threshold=threshold)


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan")])
def test_mft_refuses_a_bad_temperature(criteria: Any, temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        criteria.get("mft")(temperature=temperature)


def test_mft_refuses_an_unknown_reduction(criteria: Any) -> None:
    with pytest.raises(ValueError, match="'avg'"):
        criteria.get("mft")(reduction="avg")


def test_mft_shape_mismatch_error_names_both_shapes(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(3, 6\)"):
        criteria.get("mft")()(torch.randn(3, 5), torch.randn(3, 6), torch.zeros(3).long())


# ====================================================================== mgd
def test_mgd_adds_an_align_conv_only_when_channel_counts_differ(criteria: Any) -> None:
    mgd = criteria.get("mgd")
    differing = mgd(num_student_channels=4, num_teacher_channels=6)
    assert isinstance(differing.align, nn.Conv2d)
    assert (differing.align.in_channels, differing.align.out_channels) == (4, 6)
    assert differing.align.kernel_size == (1, 1)
    same = mgd(num_student_channels=6, num_teacher_channels=6)
    assert isinstance(same.align, nn.Identity)
    assert not list(same.align.parameters())


def test_mgd_has_learnable_parameters(criteria: Any) -> None:
    mgd = criteria.get("mgd")(4, 6)
    names = {name for name, p in mgd.named_parameters() if p.requires_grad}
    assert {"align.weight", "generation.0.weight", "generation.2.weight"} <= names


def test_mgd_generator_is_conv3x3_relu_conv3x3_on_teacher_channels(criteria: Any) -> None:
    gen = criteria.get("mgd")(4, 6).generation
    assert [type(m) for m in gen] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert all(m.kernel_size == (3, 3) and m.out_channels == 6 for m in (gen[0], gen[2]))


@pytest.mark.parametrize(("cs", "ct"), [(4, 6), (5, 5)])
@pytest.mark.parametrize("alpha", [1.0, 2e-5])
def test_mgd_without_masking_equals_alpha_times_the_mean_squared_error(
    criteria: Any, cs: int, ct: int, alpha: float
) -> None:
    mgd = criteria.get("mgd")(cs, ct, alpha_mgd=alpha, lambda_mgd=0.0)
    student, teacher = torch.randn(3, cs, 5, 4), torch.randn(3, ct, 5, 4)
    expected = alpha * ((mgd.generation(mgd.align(student)) - teacher) ** 2).mean()
    torch.testing.assert_close(mgd(student, teacher), expected, **TOL)


def test_mgd_with_full_masking_generates_from_zeros(criteria: Any) -> None:
    mgd = criteria.get("mgd")(4, 4, lambda_mgd=1.0)
    student, teacher = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    expected = ((mgd.generation(torch.zeros_like(student)) - teacher) ** 2).mean()
    torch.testing.assert_close(mgd(student, teacher), expected, **TOL)


@pytest.mark.parametrize("lambda_mgd", [0.2, 0.65])
def test_mgd_masks_about_lambda_of_the_spatial_positions(criteria: Any, lambda_mgd: float) -> None:
    mgd = criteria.get("mgd")(3, 3, lambda_mgd=lambda_mgd)
    seen: list[torch.Tensor] = []
    mgd.generation.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    student = torch.rand(4, 3, 64, 64) + 1  # never 0, so 0 means masked
    mgd(student, torch.randn(4, 3, 64, 64))
    masked = seen[0] == 0
    assert torch.equal(masked.all(1), masked.any(1)), "a position is masked across all channels"
    assert masked.all(1).float().mean().item() == pytest.approx(lambda_mgd, abs=0.02)


def test_mgd_is_reproducible_under_the_same_seed(criteria: Any) -> None:
    mgd = criteria.get("mgd")(4, 6)
    student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    torch.manual_seed(123)
    first = mgd(student, teacher)
    torch.manual_seed(123)
    assert torch.equal(mgd(student, teacher), first)


def test_mgd_gradient_reaches_the_student_and_its_own_parameters_not_the_teacher(
    criteria: Any,
) -> None:
    mgd = criteria.get("mgd")(4, 6)
    student = torch.randn(2, 4, 5, 5, requires_grad=True)
    teacher = torch.randn(2, 6, 5, 5, requires_grad=True)
    mgd(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert all(p.grad is not None for p in mgd.parameters())


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"), [((2, 4, 5), (2, 6, 5, 5)), ((2, 4, 5, 5), (2, 6, 25))]
)
def test_mgd_refuses_feature_maps_that_are_not_4d_naming_both_shapes(
    criteria: Any, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match=rf"\[N, C, H, W\].*{student_shape}.*{teacher_shape}"):
        criteria.get("mgd")(4, 6)(torch.randn(student_shape), torch.randn(teacher_shape))


def test_mgd_refuses_student_features_with_the_wrong_channel_count(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"4 student channels.*\(2, 3, 5, 5\)"):
        criteria.get("mgd")(4, 6)(torch.randn(2, 3, 5, 5), torch.randn(2, 6, 5, 5))


def test_mgd_refuses_spatial_size_mismatch_naming_both_shapes(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"\(2, 6, 5, 5\).*\(2, 6, 4, 4\)"):
        criteria.get("mgd")(4, 6)(torch.randn(2, 4, 5, 5), torch.randn(2, 6, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_student_channels": 0}, "num_student_channels.*0"),
        ({"num_teacher_channels": 2.0}, "num_teacher_channels.*2.0"),
        ({"num_student_channels": True}, "num_student_channels.*True"),
        ({"lambda_mgd": 1.5}, r"lambda_mgd.*1\.5"),
        ({"lambda_mgd": -0.1}, r"lambda_mgd.*-0\.1"),
        ({"lambda_mgd": float("nan")}, "lambda_mgd.*nan"),
        ({"alpha_mgd": float("inf")}, "alpha_mgd.*inf"),
    ],
)
def test_mgd_refuses_bad_construction_values_naming_them(
    criteria: Any, kwargs: dict[str, Any], match: str
) -> None:
    args = {"num_student_channels": 4, "num_teacher_channels": 6, **kwargs}
    with pytest.raises(ValueError, match=match):
        criteria.get("mgd")(**args)


@pytest.mark.parametrize(
    "kwargs", [{"lambda_mgd": "0.5"}, {"alpha_mgd": None}, {"lambda_mgd": True}]
)
def test_mgd_refuses_non_numbers_for_alpha_and_lambda(
    criteria: Any, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        criteria.get("mgd")(4, 6, **kwargs)


# ====================================================================== mse
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_equals_f_mse_loss(criteria: Any, reduction: str) -> None:
    student, teacher = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.equal(
        criteria.get("mse")(reduction=reduction)(student, teacher),
        F.mse_loss(student, teacher, reduction=reduction),
    )


def test_mse_gradient_reaches_the_student_only(criteria: Any) -> None:
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    criteria.get("mse")()(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


def test_mse_shape_mismatch_error_names_both_shapes_instead_of_broadcasting(
    criteria: Any,
) -> None:
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(1, 4\)"):
        criteria.get("mse")()(torch.randn(3, 4), torch.randn(1, 4))


def test_mse_refuses_an_unknown_reduction_at_construction(criteria: Any) -> None:
    with pytest.raises(ValueError, match="'avg'"):
        criteria.get("mse")(reduction="avg")


# ====================================================================== public names
@pytest.mark.parametrize(
    ("attribute", "name"),
    [
        ("LogitsDistillationLoss", "logits"),
        ("MFTLoss", "mft"),
        ("MGDLoss", "mgd"),
        ("MSELoss", "mse"),
    ],
)
def test_kdcore_attribute_is_the_registered_criterion(
    criteria: Any, attribute: str, name: str
) -> None:
    assert getattr(kd, attribute) is criteria.get(name)
