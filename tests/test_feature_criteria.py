"""The feature, relational and decoupled-logit criteria, each against its paper.

Every value is checked against a float64 computation of the paper's formula written here with
explicit loops (independent of the vectorised implementation), then gradients, the invariances
the papers state, bad input (shape mismatches naming both shapes, bad hyper-parameters refused
naming the value) and a kd.save/kd.restore round trip per criterion.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdcore as kd
from tests.conftest import TinyNet, make_teacher

TOL = {"atol": 1e-9, "rtol": 1e-7}
FEATURE_CRITERIA = ("fitnet", "hidden_cosine", "at", "pkt", "rkd", "sp", "dkd", "dist")


@pytest.fixture
def criteria(builtin_host: kd.PluginHost) -> Any:
    """The criterion registry of a fresh host: losses are looked up by their registered names."""
    return builtin_host.registries.criteria


def build(criteria: Any, name: str, **kwargs: Any) -> nn.Module:
    """The criterion ``name`` in float64, so that it can be compared to the references."""
    return criteria.get(name)(**kwargs).double()  # type: ignore[no-any-return]


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def orthogonal(size: int) -> torch.Tensor:
    q, r = torch.linalg.qr(randn(size, size))
    return q * torch.sign(torch.diagonal(r))  # type: ignore[no-any-return]


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


# ====================================================================== declarations
PAPERS = {
    "fitnet": ("Romero", "2015", "1412.6550"),
    "hidden_cosine": ("Sanh", "2019", "1910.01108"),
    "at": ("Zagoruyko & Komodakis", "2017", "1612.03928"),
    "pkt": ("Passalis & Tefas", "2018", "1803.10837"),
    "rkd": ("Park", "2019", "1904.05068"),
    "sp": ("Tung & Mori", "2019", "1907.09682"),
    "dkd": ("Zhao", "2022", "2203.08679"),
    "dist": ("Huang", "2022", "2205.10536"),
}


@pytest.mark.parametrize("name", FEATURE_CRITERIA)
def test_each_criterion_cites_its_paper_with_authors_year_and_arxiv_id(
    criteria: Any, name: str
) -> None:
    doc = criteria.get(name).__doc__
    for part in PAPERS[name]:
        assert part in doc, f"{name}: the docstring does not cite {part!r}"
    assert f"arXiv {PAPERS[name][2]}" in doc


@pytest.mark.parametrize(
    ("name", "kwargs", "learnable"),
    [
        ("fitnet", {"student_width": 4, "teacher_width": 6}, True),
        ("hidden_cosine", {"student_width": 4, "teacher_width": 6}, True),
        ("at", {}, False),
        ("pkt", {}, False),
        ("rkd", {}, False),
        ("sp", {}, False),
        ("dkd", {}, False),
        ("dist", {}, False),
    ],
)
def test_has_learnable_parameters_declares_whether_an_instance_has_parameters(
    criteria: Any, name: str, kwargs: dict[str, Any], learnable: bool
) -> None:
    cls = criteria.get(name)
    assert cls.has_learnable_parameters is learnable
    assert bool(list(cls(**kwargs).parameters())) is learnable


@pytest.mark.parametrize("name", ["fitnet", "hidden_cosine"])
def test_equal_widths_need_no_projection(criteria: Any, name: str) -> None:
    loss_fn = criteria.get(name)(student_width=5, teacher_width=5)
    assert isinstance(loss_fn.projection, nn.Identity)
    assert list(loss_fn.parameters()) == []


# ====================================================================== fitnet
def reference_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> Any:
    """The regressor by loops: channels are dim 1 of a 4-D map, the last dim otherwise."""
    out_width = weight.shape[0]
    channels_first = x.dim() == 4
    moved = x.movedim(1, -1) if channels_first else x
    out = torch.zeros(*moved.shape[:-1], out_width, dtype=x.dtype)
    for index in itertools.product(*(range(n) for n in moved.shape[:-1])):
        for o in range(out_width):
            out[(*index, o)] = bias[o] + sum(
                weight[o, c] * moved[(*index, c)] for c in range(moved.shape[-1])
            )
    return out.movedim(-1, 1) if channels_first else out


def reference_mse(a: torch.Tensor, b: torch.Tensor) -> Any:
    flat_a, flat_b = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    return sum((x - y) ** 2 for x, y in zip(flat_a, flat_b, strict=True)) / len(flat_a)


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [((3, 4), (3, 6)), ((2, 3, 4), (2, 3, 6)), ((2, 4, 3, 2), (2, 6, 3, 2))],
    ids=["2d", "3d-tokens", "4d-conv"],
)
def test_fitnet_is_the_mse_between_the_projected_student_and_the_teacher(
    criteria: Any, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]
) -> None:
    loss_fn = build(criteria, "fitnet", student_width=4, teacher_width=6)
    student, teacher = randn(*student_shape), randn(*teacher_shape)
    projection = loss_fn.projection
    expected = reference_mse(
        reference_projection(student, projection.weight.detach(), projection.bias.detach()),
        teacher,
    )
    torch.testing.assert_close(loss_fn(student, teacher), scalar(expected), **TOL)


def test_fitnet_projects_a_4d_map_with_a_1x1_conv_sharing_the_linear_weights(
    criteria: Any,
) -> None:
    loss_fn = build(criteria, "fitnet", student_width=4, teacher_width=6)
    feature_map = randn(2, 4, 3, 5)
    conv = nn.Conv2d(4, 6, kernel_size=1).double()
    with torch.no_grad():
        conv.weight.copy_(loss_fn.projection.weight[:, :, None, None])
        conv.bias.copy_(loss_fn.projection.bias)
    torch.testing.assert_close(loss_fn.projection(feature_map), conv(feature_map), **TOL)


def test_fitnet_with_equal_widths_is_plain_mse(criteria: Any) -> None:
    student, teacher = randn(3, 5), randn(3, 5)
    loss = build(criteria, "fitnet", student_width=5, teacher_width=5)(student, teacher)
    torch.testing.assert_close(loss, scalar(reference_mse(student, teacher)), **TOL)


def test_fitnet_reductions(criteria: Any) -> None:
    student, teacher = randn(3, 4), randn(3, 6)
    none = build(criteria, "fitnet", student_width=4, teacher_width=6, reduction="none")
    elementwise = none(student, teacher)
    assert elementwise.shape == teacher.shape
    summed = build(criteria, "fitnet", student_width=4, teacher_width=6, reduction="sum")
    summed.load_state_dict(none.state_dict())
    torch.testing.assert_close(summed(student, teacher), elementwise.sum(), **TOL)


def test_fitnet_gradient_reaches_the_student_and_the_projection_not_the_teacher(
    criteria: Any,
) -> None:
    loss_fn = criteria.get("fitnet")(student_width=4, teacher_width=6)
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    teacher = torch.randn(2, 6, 3, 3, requires_grad=True)
    loss_fn(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert loss_fn.projection.weight.grad.abs().sum() > 0
    assert loss_fn.projection.bias.grad.abs().sum() > 0
    assert teacher.grad is None


def test_fitnet_refuses_student_features_of_another_width_naming_both_shapes(
    criteria: Any,
) -> None:
    loss_fn = criteria.get("fitnet")(student_width=4, teacher_width=6)
    with pytest.raises(ValueError, match=r"student_width=4.*student \(3, 5\), teacher \(3, 6\)"):
        loss_fn(torch.randn(3, 5), torch.randn(3, 6))


def test_fitnet_refuses_a_projection_that_misses_the_teachers_shape_naming_both_shapes(
    criteria: Any,
) -> None:
    loss_fn = criteria.get("fitnet")(student_width=4, teacher_width=6)
    with pytest.raises(
        ValueError,
        match=r"projected student features \(2, 6, 3, 3\).*student \(2, 4, 3, 3\), teacher \(2, 6, 4, 4\)",
    ):
        loss_fn(torch.randn(2, 4, 3, 3), torch.randn(2, 6, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"student_width": 0, "teacher_width": 6}, "student_width must be a positive int, got 0"),
        ({"student_width": 4, "teacher_width": -2}, "teacher_width must be a positive int, got -2"),
        ({"student_width": 4.0, "teacher_width": 6}, "student_width.*got 4.0"),
        ({"student_width": True, "teacher_width": 6}, "student_width.*got True"),
        ({"student_width": 4, "teacher_width": 6, "reduction": "avg"}, "reduction.*'avg'"),
    ],
)
def test_fitnet_refuses_bad_arguments_naming_the_value(
    criteria: Any, kwargs: dict[str, Any], shown: str
) -> None:
    with pytest.raises(ValueError, match=shown):
        criteria.get("fitnet")(**kwargs)


# ====================================================================== hidden_cosine
def reference_cosine_losses(student: torch.Tensor, teacher: torch.Tensor) -> list[float]:
    """1 - cos per position of [..., H] features, by loops."""
    flat_s = student.reshape(-1, student.shape[-1]).tolist()
    flat_t = teacher.reshape(-1, teacher.shape[-1]).tolist()
    losses = []
    for s, t in zip(flat_s, flat_t, strict=True):
        dot = sum(a * b for a, b in zip(s, t, strict=True))
        norms = math.sqrt(sum(a * a for a in s)) * math.sqrt(sum(b * b for b in t))
        losses.append(1 - dot / norms)
    return losses


def test_hidden_cosine_is_one_minus_the_cosine_averaged_over_positions(criteria: Any) -> None:
    student, teacher = randn(2, 3, 5), randn(2, 3, 5)
    losses = reference_cosine_losses(student, teacher)
    loss = build(criteria, "hidden_cosine")(student, teacher)
    torch.testing.assert_close(loss, scalar(sum(losses) / len(losses)), **TOL)


def test_hidden_cosine_none_reduction_gives_one_loss_per_position(criteria: Any) -> None:
    student, teacher = randn(2, 3, 5), randn(2, 3, 5)
    loss = build(criteria, "hidden_cosine", reduction="none")(student, teacher)
    expected = torch.tensor(reference_cosine_losses(student, teacher), dtype=torch.float64)
    torch.testing.assert_close(loss, expected.reshape(2, 3), **TOL)


def test_hidden_cosine_on_a_4d_map_compares_channel_vectors(criteria: Any) -> None:
    student, teacher = randn(2, 4, 3, 3), randn(2, 4, 3, 3)
    losses = reference_cosine_losses(student.movedim(1, -1), teacher.movedim(1, -1))
    loss = build(criteria, "hidden_cosine")(student, teacher)
    torch.testing.assert_close(loss, scalar(sum(losses) / len(losses)), **TOL)


def test_hidden_cosine_with_widths_projects_the_student_first(criteria: Any) -> None:
    loss_fn = build(criteria, "hidden_cosine", student_width=4, teacher_width=6)
    student, teacher = randn(2, 3, 4), randn(2, 3, 6)
    weight, bias = loss_fn.projection.weight.detach(), loss_fn.projection.bias.detach()
    losses = reference_cosine_losses(reference_projection(student, weight, bias), teacher)
    torch.testing.assert_close(loss_fn(student, teacher), scalar(sum(losses) / len(losses)), **TOL)


def test_hidden_cosine_attention_mask_drops_positions(criteria: Any) -> None:
    student, teacher = randn(2, 3, 5), randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    losses = reference_cosine_losses(student, teacher)
    kept = [loss for loss, keep in zip(losses, mask.reshape(-1).tolist(), strict=True) if keep]
    loss_fn = build(criteria, "hidden_cosine")
    torch.testing.assert_close(
        loss_fn(student, teacher, attention_mask=mask), scalar(sum(kept) / len(kept)), **TOL
    )
    per_position = build(criteria, "hidden_cosine", reduction="none")(
        student, teacher, attention_mask=mask.bool()
    )
    assert (per_position[mask == 0] == 0).all()
    summed = build(criteria, "hidden_cosine", reduction="sum")(student, teacher, mask)
    torch.testing.assert_close(summed, scalar(sum(kept)), **TOL)


def test_hidden_cosine_is_invariant_to_positive_scaling_of_each_position(criteria: Any) -> None:
    student, teacher = randn(2, 3, 5), randn(2, 3, 5)
    scale = torch.rand(2, 3, 1, dtype=torch.float64) * 10 + 0.1
    loss_fn = build(criteria, "hidden_cosine")
    torch.testing.assert_close(
        loss_fn(student * scale, teacher / scale), loss_fn(student, teacher), **TOL
    )
    assert loss_fn(teacher * scale, teacher).abs() < 1e-12


def test_hidden_cosine_gradient_reaches_the_student_and_the_projection(criteria: Any) -> None:
    loss_fn = criteria.get("hidden_cosine")(student_width=4, teacher_width=6)
    student = torch.randn(2, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 6, requires_grad=True)
    loss_fn(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert loss_fn.projection.weight.grad.abs().sum() > 0
    assert teacher.grad is None


def test_hidden_cosine_without_widths_refuses_different_shapes_naming_both(
    criteria: Any,
) -> None:
    with pytest.raises(
        ValueError, match=r"student \(2, 3, 4\), teacher \(2, 3, 6\).*student_width"
    ):
        criteria.get("hidden_cosine")()(torch.randn(2, 3, 4), torch.randn(2, 3, 6))


def test_hidden_cosine_refuses_a_mask_that_does_not_fit_the_positions(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"attention_mask \(2, 4\).*positions \(2, 3\)"):
        criteria.get("hidden_cosine")()(
            torch.randn(2, 3, 5), torch.randn(2, 3, 5), attention_mask=torch.ones(2, 4)
        )


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"student_width": 4}, "student_width=4, teacher_width=None"),
        ({"teacher_width": 6}, "student_width=None, teacher_width=6"),
        ({"student_width": -4, "teacher_width": 6}, "student_width.*-4"),
        ({"reduction": "batchmean"}, "reduction.*'batchmean'"),
    ],
)
def test_hidden_cosine_refuses_bad_arguments_naming_the_value(
    criteria: Any, kwargs: dict[str, Any], shown: str
) -> None:
    with pytest.raises(ValueError, match=shown):
        criteria.get("hidden_cosine")(**kwargs)


# ====================================================================== at
def reference_at(student: torch.Tensor, teacher: torch.Tensor, p: float) -> float:
    """mean over samples and positions of (Q_s/|Q_s| - Q_t/|Q_t|)**2, Q = sum_c |A_c|**p."""

    def attention(sample: torch.Tensor) -> list[float]:
        channels, positions = sample.shape[0], sample[0].numel()
        flat = sample.reshape(channels, positions).tolist()
        q = [sum(abs(flat[c][i]) ** p for c in range(channels)) for i in range(positions)]
        norm = math.sqrt(sum(v * v for v in q))
        return [v / norm for v in q]

    total, count = 0.0, 0
    for s, t in zip(student, teacher, strict=True):
        for a, b in zip(attention(s), attention(t), strict=True):
            total += (a - b) ** 2
            count += 1
    return total / count


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_at_is_the_squared_distance_between_normalised_attention_maps(
    criteria: Any, p: float
) -> None:
    student, teacher = randn(3, 4, 3, 2), randn(3, 6, 3, 2)
    loss = build(criteria, "at", p=p)(student, teacher)
    torch.testing.assert_close(loss, scalar(reference_at(student, teacher, p)), **TOL)


def test_at_is_invariant_to_scaling_the_maps_and_permuting_channels(criteria: Any) -> None:
    student, teacher = randn(3, 4, 3, 3), randn(3, 6, 3, 3)
    loss_fn = build(criteria, "at")
    expected = loss_fn(student, teacher)
    torch.testing.assert_close(loss_fn(student * 3.0, teacher * 0.2), expected, **TOL)
    torch.testing.assert_close(loss_fn(student[:, [2, 0, 3, 1]], teacher), expected, **TOL)
    assert loss_fn(teacher[:, :4] * 5, teacher[:, :4]) < 1e-12


def test_at_gradient_reaches_the_student_only(criteria: Any) -> None:
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    teacher = torch.randn(2, 6, 3, 3, requires_grad=True)
    criteria.get("at")()(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [((2, 4, 3, 3), (2, 6, 4, 4)), ((2, 4, 3, 3), (3, 4, 3, 3)), ((2, 4), (2, 4))],
)
def test_at_refuses_maps_of_other_batch_or_spatial_sizes_naming_both_shapes(
    criteria: Any, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]
) -> None:
    shown = rf"student {tuple(student_shape)}, teacher {tuple(teacher_shape)}".replace(
        "(", r"\("
    ).replace(")", r"\)")
    with pytest.raises(ValueError, match=shown):
        criteria.get("at")()(torch.randn(student_shape), torch.randn(teacher_shape))


@pytest.mark.parametrize(
    ("p", "error"), [(0, ValueError), (0.5, ValueError), (-2, ValueError), ("2", TypeError)]
)
def test_at_refuses_a_bad_p_naming_it(criteria: Any, p: Any, error: type) -> None:
    with pytest.raises(error, match=rf"p must .*{p!r}"):
        criteria.get("at")(p=p)


# ====================================================================== pkt
def reference_pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> float:
    """The paper's conditional probabilities and KL, by loops: self-pairs excluded, mean over anchors."""

    def conditional(x: torch.Tensor) -> list[list[float]]:
        rows = x.reshape(x.shape[0], -1).tolist()
        n = len(rows)

        def cosine(a: list[float], b: list[float]) -> float:
            dot = sum(u * v for u, v in zip(a, b, strict=True))
            return dot / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)))

        kernel = [[(cosine(rows[i], rows[j]) + 1) / 2 for j in range(n)] for i in range(n)]
        return [
            [
                kernel[i][j] / sum(kernel[i][k] for k in range(n) if k != i) if j != i else 0.0
                for j in range(n)
            ]
            for i in range(n)
        ]

    p, q = conditional(teacher), conditional(student)
    n = len(p)
    per_anchor = [
        sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps)) for j in range(n) if j != i)
        for i in range(n)
    ]
    return sum(per_anchor) / n


def test_pkt_is_the_kl_between_cosine_conditional_probabilities(criteria: Any) -> None:
    student, teacher = randn(5, 3), randn(5, 7)
    loss = build(criteria, "pkt")(student, teacher)
    torch.testing.assert_close(loss, scalar(reference_pkt(student, teacher)), **TOL)


def test_pkt_flattens_feature_maps_per_sample(criteria: Any) -> None:
    student, teacher = randn(4, 2, 3, 3), randn(4, 5, 2)
    loss = build(criteria, "pkt")(student, teacher)
    torch.testing.assert_close(loss, scalar(reference_pkt(student, teacher)), **TOL)


def test_pkt_is_invariant_to_scaling_samples_and_rotating_the_feature_space(
    criteria: Any,
) -> None:
    student, teacher = randn(5, 4), randn(5, 6)
    loss_fn = build(criteria, "pkt")
    expected = loss_fn(student, teacher)
    scales = torch.rand(5, 1, dtype=torch.float64) * 5 + 0.1
    torch.testing.assert_close(loss_fn(student, teacher * scales), expected, **TOL)
    torch.testing.assert_close(loss_fn(student @ orthogonal(4), teacher), expected, **TOL)
    # A student that is a rotated, wider copy of the teacher matches it exactly.
    wider = torch.cat([teacher, torch.zeros(5, 2, dtype=torch.float64)], 1) @ orthogonal(8)
    assert loss_fn(wider, teacher).abs() < 1e-9


def test_pkt_gradient_reaches_the_student_only(criteria: Any) -> None:
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    criteria.get("pkt")()(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("name", ["pkt", "rkd", "sp"])
def test_relational_criteria_refuse_different_batch_sizes_naming_both_shapes(
    criteria: Any, name: str
) -> None:
    with pytest.raises(ValueError, match=r"batch.*student \(4, 3\), teacher \(5, 3\)"):
        criteria.get(name)()(torch.randn(4, 3), torch.randn(5, 3))


@pytest.mark.parametrize("name", ["pkt", "rkd"])
def test_pairwise_criteria_refuse_a_batch_of_one(criteria: Any, name: str) -> None:
    with pytest.raises(ValueError, match=r"at least 2; got student \(1, 3\), teacher \(1, 3\)"):
        criteria.get(name)()(torch.randn(1, 3), torch.randn(1, 3))


# ====================================================================== rkd
def huber(a: float, b: float) -> float:
    diff = abs(a - b)
    return 0.5 * diff * diff if diff < 1 else diff - 0.5


def reference_rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> float:
    def normalised(x: torch.Tensor) -> list[list[float]]:
        rows = x.reshape(x.shape[0], -1).tolist()
        n = len(rows)
        d = [[math.dist(rows[i], rows[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[value / mu for value in row] for row in d]

    ds, dt = normalised(student), normalised(teacher)
    n = len(ds)
    return sum(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2


def reference_rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> float:
    def cosines(x: torch.Tensor) -> dict[tuple[int, int, int], float]:
        rows = x.reshape(x.shape[0], -1).tolist()
        n = len(rows)

        def unit(i: int, j: int) -> list[float] | None:  # e_ij = (x_i - x_j) / |x_i - x_j|
            diff = [a - b for a, b in zip(rows[i], rows[j], strict=True)]
            norm = math.sqrt(sum(v * v for v in diff))
            return [v / norm for v in diff] if norm > 0 else None

        values = {}
        for i, j, k in itertools.product(range(n), repeat=3):  # the angle at vertex j
            e_ij, e_kj = unit(i, j), unit(k, j)
            values[i, j, k] = (
                0.0
                if e_ij is None or e_kj is None
                else sum(a * b for a, b in zip(e_ij, e_kj, strict=True))
            )
        return values

    cs, ct = cosines(student), cosines(teacher)
    return sum(huber(cs[key], ct[key]) for key in cs) / len(cs)


def test_rkd_distance_loss_is_the_huber_loss_between_mean_normalised_distances(
    criteria: Any,
) -> None:
    student, teacher = randn(5, 3), randn(5, 7) * 3
    loss = build(criteria, "rkd", distance_weight=1.0, angle_weight=0.0)(student, teacher)
    torch.testing.assert_close(loss, scalar(reference_rkd_distance(student, teacher)), **TOL)


def test_rkd_angle_loss_is_the_huber_loss_between_triplet_angle_cosines(criteria: Any) -> None:
    student, teacher = randn(4, 3), randn(4, 6)
    loss = build(criteria, "rkd", distance_weight=0.0, angle_weight=1.0)(student, teacher)
    torch.testing.assert_close(loss, scalar(reference_rkd_angle(student, teacher)), **TOL)


def test_rkd_defaults_to_the_papers_weights_25_and_50(criteria: Any) -> None:
    student, teacher = randn(4, 3), randn(4, 6)
    loss_fn = build(criteria, "rkd")
    assert (loss_fn.distance_weight, loss_fn.angle_weight) == (25.0, 50.0)
    expected = 25 * reference_rkd_distance(student, teacher) + 50 * reference_rkd_angle(
        student, teacher
    )
    torch.testing.assert_close(loss_fn(student, teacher), scalar(expected), **TOL)


def test_rkd_huber_loss_uses_its_linear_part_for_large_differences(criteria: Any) -> None:
    # One far outlier in the student makes some normalised distances differ by more than 1.
    student, teacher = randn(5, 3), randn(5, 3)
    student[0] += 100
    loss = build(criteria, "rkd", distance_weight=1.0, angle_weight=0.0)(student, teacher)
    torch.testing.assert_close(loss, scalar(reference_rkd_distance(student, teacher)), **TOL)


@pytest.mark.parametrize(
    "weights", [{"angle_weight": 0.0}, {"distance_weight": 0.0}, {}], ids=["D", "A", "DA"]
)
def test_rkd_is_invariant_to_scaling_translating_and_rotating_the_teacher(
    criteria: Any, weights: dict[str, float]
) -> None:
    student, teacher = randn(5, 3), randn(5, 4)
    loss_fn = build(criteria, "rkd", **weights)
    expected = loss_fn(student, teacher)
    torch.testing.assert_close(loss_fn(student, teacher * 7.5), expected, **TOL)
    torch.testing.assert_close(loss_fn(student, teacher + randn(1, 4)), expected, **TOL)
    torch.testing.assert_close(loss_fn(student, teacher @ orthogonal(4)), expected, **TOL)
    assert loss_fn(teacher * 0.3 + 1, teacher) < 1e-9


def test_rkd_gradient_reaches_the_student_only_and_is_finite(criteria: Any) -> None:
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    criteria.get("rkd")()(student, teacher).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize(
    ("kwargs", "error", "shown"),
    [
        (
            {"distance_weight": -1.0},
            ValueError,
            "distance_weight must be finite and >= 0, got -1.0",
        ),
        ({"angle_weight": float("nan")}, ValueError, "angle_weight.*nan"),
        ({"angle_weight": "50"}, TypeError, "angle_weight must be a number, got '50'"),
        (
            {"distance_weight": 0, "angle_weight": 0.0},
            ValueError,
            "distance_weight=0 and angle_weight=0.0",
        ),
    ],
)
def test_rkd_refuses_bad_weights_naming_them(
    criteria: Any, kwargs: dict[str, Any], error: type, shown: str
) -> None:
    with pytest.raises(error, match=shown):
        criteria.get("rkd")(**kwargs)


# ====================================================================== sp
def reference_sp(student: torch.Tensor, teacher: torch.Tensor) -> float:
    def normalised_gram(x: torch.Tensor) -> list[list[float]]:
        rows = x.reshape(x.shape[0], -1).tolist()
        gram = [[sum(a * b for a, b in zip(r, s, strict=True)) for s in rows] for r in rows]
        return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in gram]

    gs, gt = normalised_gram(student), normalised_gram(teacher)
    b = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_is_the_frobenius_distance_between_row_normalised_similarities(
    criteria: Any,
) -> None:
    student, teacher = randn(4, 3, 2, 2), randn(4, 5, 2, 2)
    loss = build(criteria, "sp")(student, teacher)
    torch.testing.assert_close(loss, scalar(reference_sp(student, teacher)), **TOL)


def test_sp_is_invariant_to_scaling_and_orthogonal_maps_of_either_feature_space(
    criteria: Any,
) -> None:
    student, teacher = randn(5, 3), randn(5, 6)
    loss_fn = build(criteria, "sp")
    expected = loss_fn(student, teacher)
    torch.testing.assert_close(loss_fn(student * 0.01, teacher * 40), expected, **TOL)
    torch.testing.assert_close(
        loss_fn(student @ orthogonal(3), teacher @ orthogonal(6)), expected, **TOL
    )
    assert loss_fn(teacher @ orthogonal(6) * 2, teacher) < 1e-12


def test_sp_gradient_reaches_the_student_only(criteria: Any) -> None:
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    criteria.get("sp")()(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


# ====================================================================== dkd
def softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def reference_dkd_parts(
    student: list[float], teacher: list[float], label: int, temperature: float
) -> tuple[float, float]:
    """(TCKD, NCKD) of one row, from the paper's definitions."""
    ps = softmax_row([v / temperature for v in student])
    pt = softmax_row([v / temperature for v in teacher])
    tckd = kl([pt[label], 1 - pt[label]], [ps[label], 1 - ps[label]])
    others = [c for c in range(len(student)) if c != label]
    ns = [ps[c] / (1 - ps[label]) for c in others]
    nt = [pt[c] / (1 - pt[label]) for c in others]
    return tckd, kl(nt, ns)


def reference_dkd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> float:
    rows = []
    for s, t, y in zip(
        student.reshape(-1, student.shape[-1]).tolist(),
        teacher.reshape(-1, teacher.shape[-1]).tolist(),
        labels.reshape(-1).tolist(),
        strict=True,
    ):
        if y == -100:
            continue
        tckd, nckd = reference_dkd_parts(s, t, y, temperature)
        rows.append((alpha * tckd + beta * nckd) * temperature**2)
    return sum(rows) / len(rows)


@pytest.mark.parametrize(
    ("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.3, 2.0, 2.5)]
)
def test_dkd_is_alpha_tckd_plus_beta_nckd_times_t_squared(
    criteria: Any, alpha: float, beta: float, temperature: float
) -> None:
    student, teacher = randn(6, 5) * 3, randn(6, 5) * 3
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    loss_fn = build(criteria, "dkd", alpha=alpha, beta=beta, temperature=temperature)
    expected = reference_dkd(student, teacher, labels, alpha, beta, temperature)
    torch.testing.assert_close(loss_fn(student, teacher, labels), scalar(expected), **TOL)


def test_dkd_defaults_are_the_papers_cifar_setting(criteria: Any) -> None:
    loss_fn = criteria.get("dkd")()
    assert (loss_fn.alpha, loss_fn.beta, loss_fn.temperature) == (1.0, 8.0, 4.0)


def test_classic_kd_decomposes_as_tckd_plus_one_minus_teacher_target_prob_times_nckd(
    criteria: Any,
) -> None:
    """The paper's reformulation of classic KD: KD = TCKD + (1 - p_t^T) NCKD, sample by sample."""
    kd_loss = criteria.get("logits")(temperature=2.0, reduction="batchmean").double()
    tckd_only = build(criteria, "dkd", alpha=1.0, beta=0.0, temperature=2.0)
    nckd_only = build(criteria, "dkd", alpha=0.0, beta=1.0, temperature=2.0)
    for _ in range(5):
        student, teacher = randn(1, 6) * 2, randn(1, 6) * 2
        label = torch.randint(0, 6, (1,))
        p_target = F.softmax(teacher / 2.0, dim=-1)[0, label]
        decomposed = tckd_only(student, teacher, label) + (1 - p_target) * nckd_only(
            student, teacher, label
        )
        torch.testing.assert_close(decomposed[0], kd_loss(student, teacher), **TOL)


def test_dkd_skips_ignore_index_labels_and_flattens_sequences(criteria: Any) -> None:
    student, teacher = randn(2, 3, 5), randn(2, 3, 5)
    labels = torch.tensor([[0, -100, 4], [-100, 2, 1]])
    loss = build(criteria, "dkd")(student, teacher, labels)
    torch.testing.assert_close(
        loss, scalar(reference_dkd(student, teacher, labels, 1.0, 8.0, 4.0)), **TOL
    )


def test_dkd_with_every_label_ignored_is_zero(criteria: Any) -> None:
    student = torch.randn(3, 5, requires_grad=True)
    loss = criteria.get("dkd")()(student, torch.randn(3, 5), torch.full((3,), -100))
    assert loss.item() == 0.0
    loss.backward()


def test_dkd_gradient_reaches_the_student_only(criteria: Any) -> None:
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    criteria.get("dkd")()(student, teacher, torch.tensor([0, 1, 2, 3])).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_dkd_is_finite_for_a_saturated_teacher(criteria: Any) -> None:
    teacher = torch.tensor([[60.0, 0.0, 0.0, 0.0]])
    student = torch.randn(1, 4, requires_grad=True)
    loss = criteria.get("dkd")(temperature=1.0)(student, teacher, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_dkd_refuses_logits_of_different_shapes_naming_both(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"student \(4, 5\), teacher \(4, 6\)"):
        criteria.get("dkd")()(torch.randn(4, 5), torch.randn(4, 6), torch.zeros(4, dtype=int))


def test_dkd_refuses_a_label_count_that_differs_from_the_positions(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"3 labels \(3,\) for 4 positions \(logits \(4, 5\)\)"):
        criteria.get("dkd")()(torch.randn(4, 5), torch.randn(4, 5), torch.zeros(3, dtype=int))


@pytest.mark.parametrize(
    ("labels", "error", "shown"),
    [
        (torch.tensor([0, 5]), ValueError, r"labels must lie in \[0, 5\) or be -100"),
        (torch.tensor([0, -3]), ValueError, r"labels must lie in \[0, 5\)"),
        (
            torch.tensor([0.0, 1.0]),
            TypeError,
            "labels must be an integer tensor, got torch.float32",
        ),
        ([0, 1], TypeError, "labels must be an integer tensor, got list"),
    ],
)
def test_dkd_refuses_bad_labels(criteria: Any, labels: Any, error: type, shown: str) -> None:
    with pytest.raises(error, match=shown):
        criteria.get("dkd")()(torch.randn(2, 5), torch.randn(2, 5), labels)


@pytest.mark.parametrize(
    ("kwargs", "error", "shown"),
    [
        ({"alpha": -1.0}, ValueError, "alpha must be finite and >= 0, got -1.0"),
        ({"beta": float("inf")}, ValueError, "beta.*inf"),
        ({"temperature": 0}, ValueError, "temperature must be finite and > 0, got 0"),
        ({"temperature": True}, TypeError, "temperature must be a number, got True"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int, got 1.5"),
    ],
)
def test_dkd_refuses_bad_hyper_parameters_naming_them(
    criteria: Any, kwargs: dict[str, Any], error: type, shown: str
) -> None:
    with pytest.raises(error, match=shown):
        criteria.get("dkd")(**kwargs)


# ====================================================================== dist
def pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    """Pearson's r; ``eps`` is added to the denominator as the authors' code does."""
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    var_a = sum((x - mean_a) ** 2 for x in a)
    var_b = sum((y - mean_b) ** 2 for y in b)
    return cov / (math.sqrt(var_a) * math.sqrt(var_b) + eps)


def reference_dist(
    student: torch.Tensor, teacher: torch.Tensor, beta: float, gamma: float, tau: float
) -> float:
    classes = student.shape[-1]
    ys = [softmax_row([v / tau for v in row]) for row in student.reshape(-1, classes).tolist()]
    yt = [softmax_row([v / tau for v in row]) for row in teacher.reshape(-1, classes).tolist()]
    n = len(ys)
    inter = 1 - sum(pearson(ys[i], yt[i]) for i in range(n)) / n
    columns = [([ys[i][c] for i in range(n)], [yt[i][c] for i in range(n)]) for c in range(classes)]
    intra = 1 - sum(pearson(s, t) for s, t in columns) / classes
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize(
    ("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 0.0, 4.0), (0.0, 2.0, 4.0), (0.5, 3.0, 2.0)]
)
def test_dist_is_tau_squared_times_weighted_inter_and_intra_class_pearson_relations(
    criteria: Any, beta: float, gamma: float, tau: float
) -> None:
    student, teacher = randn(2, 3, 5) * 3, randn(2, 3, 5) * 3
    loss = build(criteria, "dist", beta=beta, gamma=gamma, tau=tau)(student, teacher)
    expected = reference_dist(student, teacher, beta, gamma, tau)
    torch.testing.assert_close(loss, scalar(expected), **TOL)


def test_dist_pearson_relation_is_invariant_to_positive_linear_maps(criteria: Any) -> None:
    """The paper's point: rho(a * x + b, y) = rho(x, y) for a > 0, unlike KL's exact match."""
    loss_fn = build(criteria, "dist")
    x, y = torch.rand(4, 6, dtype=torch.float64), torch.rand(4, 6, dtype=torch.float64)
    a = torch.rand(4, 1, dtype=torch.float64) * 3 + 0.5
    torch.testing.assert_close(loss_fn.pearson(a * x + 2.0, y), loss_fn.pearson(x, y), **TOL)


def test_dist_is_zero_for_a_matching_student_and_ignores_a_constant_logit_shift(
    criteria: Any,
) -> None:
    student, teacher = randn(4, 6), randn(4, 6)
    loss_fn = build(criteria, "dist")
    assert loss_fn(teacher + 3.0, teacher).abs() < 1e-5  # not 0: the 1e-8 in rho's denominator
    torch.testing.assert_close(loss_fn(student + randn(4, 1), teacher), loss_fn(student, teacher))


def test_dist_gradient_reaches_the_student_only(criteria: Any) -> None:
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    criteria.get("dist")()(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_dist_refuses_logits_of_different_shapes_naming_both(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"student \(4, 5\), teacher \(4, 7\)"):
        criteria.get("dist")()(torch.randn(4, 5), torch.randn(4, 7))


def test_dist_intra_class_relation_refuses_a_single_position(criteria: Any) -> None:
    with pytest.raises(ValueError, match=r"gamma=1.0.*at least 2.*student \(1, 5\)"):
        criteria.get("dist")()(torch.randn(1, 5), torch.randn(1, 5))
    criteria.get("dist")(gamma=0.0)(torch.randn(1, 5), torch.randn(1, 5))


@pytest.mark.parametrize(
    ("kwargs", "error", "shown"),
    [
        ({"beta": -0.5}, ValueError, "beta must be finite and >= 0, got -0.5"),
        ({"gamma": None}, TypeError, "gamma must be a number, got None"),
        ({"tau": 0.0}, ValueError, "tau must be finite and > 0, got 0.0"),
        ({"tau": float("inf")}, ValueError, "tau.*inf"),
    ],
)
def test_dist_refuses_bad_hyper_parameters_naming_them(
    criteria: Any, kwargs: dict[str, Any], error: type, shown: str
) -> None:
    with pytest.raises(error, match=shown):
        criteria.get("dist")(**kwargs)


# ====================================================================== model outputs
@pytest.mark.parametrize("name", ["fitnet", "hidden_cosine", "pkt", "rkd", "sp"])
def test_feature_criteria_take_a_tuple_output_by_its_first_item(criteria: Any, name: str) -> None:
    kwargs = {"student_width": 4, "teacher_width": 4} if name in ("fitnet", "hidden_cosine") else {}
    loss_fn = build(criteria, name, **kwargs)
    student, teacher = randn(3, 4), randn(3, 4)
    torch.testing.assert_close(
        loss_fn((student, "cache"), (teacher,)), loss_fn(student, teacher), **TOL
    )


@pytest.mark.parametrize("name", ["fitnet", "at", "pkt"])
def test_feature_criteria_refuse_a_non_tensor_output_naming_the_side(
    criteria: Any, name: str
) -> None:
    kwargs = {"student_width": 4, "teacher_width": 4} if name == "fitnet" else {}
    with pytest.raises(TypeError, match=r"teacher output to be a tensor.*got dict"):
        criteria.get(name)(**kwargs)(torch.randn(3, 4, 2, 2), {"x": 1})


# ====================================================================== save and restore
class ConvNet(nn.Module):
    """A conv feature extractor and a linear head, keeping its constructor argument."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.features = nn.Conv2d(3, channels, kernel_size=3, padding=1)
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))


@kd.teacher_factory
def make_conv_teacher() -> ConvNet:
    torch.manual_seed(1)
    return ConvNet(channels=6)


LABELS = torch.tensor([0, 2, 1, -100, 2])
SAVE_CASES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    # name: (student factory, teacher factory, criterion); TinyNet's fc1 is 8 wide, the teacher's 16
    "fitnet": (TinyNet, make_teacher, {("fc1", "fc1"): ("fitnet", (8, 16))}),
    "hidden_cosine": (TinyNet, make_teacher, {("fc1", "fc1"): ("hidden_cosine", (8, 16))}),
    "at": (ConvNet, make_conv_teacher, {("features", "features"): ("at", {"p": 1.5})}),
    "pkt": (TinyNet, make_teacher, {("fc1", "fc1"): ("pkt", {})}),
    "rkd": (TinyNet, make_teacher, {("fc1", "fc1"): ("rkd", {"angle_weight": 10.0})}),
    "sp": (TinyNet, make_teacher, {("fc1", "fc1"): ("sp", {})}),
    "dkd": (TinyNet, make_teacher, {("", ""): ("dkd", {"beta": 2.0, "temperature": 3.0})}),
    "dist": (TinyNet, make_teacher, {("", ""): ("dist", {"gamma": 2.0, "tau": 4.0})}),
}


def save_case_model(criteria: Any, name: str) -> tuple[nn.Module, torch.Tensor, dict[str, Any]]:
    student_factory, teacher_factory, pairs = SAVE_CASES[name]
    criterion = {}
    for layers, (loss_name, arguments) in pairs.items():
        cls = criteria.get(loss_name)
        loss = cls(*arguments) if isinstance(arguments, tuple) else cls(**arguments)
        criterion[layers] = loss
    with warnings.catch_warnings():
        warnings.simplefilter("error", kd.NotRecordableWarning)
        model = kd.convert(
            student_factory(),
            [("kd_loss", {"teacher_model": teacher_factory, "criterion": criterion})],
        )
    batch = torch.randn(5, 3, 4, 4) if student_factory is ConvNet else torch.randn(5, 4)
    kwargs = {"labels": LABELS} if name == "dkd" else {}
    return model, batch, kwargs


@pytest.mark.parametrize("name", FEATURE_CRITERIA)
def test_a_model_using_the_criterion_is_saved_and_restored_with_its_arguments_and_weights(
    criteria: Any, name: str, tmp_path: Path
) -> None:
    model, batch, kwargs = save_case_model(criteria, name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the student and any projection move away from their initial values
        model(batch)
        optimizer.zero_grad()
        model.compute_kd_loss(**kwargs).backward()
        optimizer.step()
    path = kd.save(model, tmp_path / f"{name}.safetensors")

    student_factory = SAVE_CASES[name][0]
    restored: Any = kd.restore(student_factory(), path)
    (original_loss,) = model.loss_modules
    (restored_loss,) = restored.loss_modules
    assert type(restored_loss) is type(original_loss)
    assert repr(restored_loss) == repr(original_loss)
    original_state, restored_state = original_loss.state_dict(), restored_loss.state_dict()
    assert original_state.keys() == restored_state.keys()
    assert all(torch.equal(original_state[k], restored_state[k]) for k in original_state)
    model(batch)
    restored(batch)
    assert torch.equal(restored.compute_kd_loss(**kwargs), model.compute_kd_loss(**kwargs))
