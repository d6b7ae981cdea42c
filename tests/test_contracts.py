"""Contracts every registered criterion and loss balancer must keep.

The tests are parametrised over the names in ``kdcore.registries()``, so a newly registered
built-in is covered automatically, and fails until it has an entry in ``CRITERIA`` or
``BALANCERS`` below: the smallest arguments that build it, inputs it accepts, and a tiny
end-to-end setup through ``kd.convert``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import kdcore as kd
from tests.conftest import TinyNet, make_teacher

Inputs = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


# ====================================================================== tiny models
class TinyConvNet(nn.Module):
    """A conv feature extractor (the ``features`` layer) and a linear head."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, channels, kernel_size=3, padding=1)
        self.head = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))


@dataclass
class EndToEnd:
    """A student, a teacher, the ``criterion`` config, a batch and ``compute_kd_loss`` kwargs."""

    student: nn.Module
    teacher: nn.Module
    criterion: Any
    batch: torch.Tensor
    loss_kwargs: dict[str, Any] = field(default_factory=dict)


def _tiny_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    return TinyNet(), make_teacher(), torch.randn(5, 4)


def _whole_model(name: str, **kwargs: Any) -> Callable[[], EndToEnd]:
    def build() -> EndToEnd:
        student, teacher, batch = _tiny_pair()
        return EndToEnd(student, teacher, {"name": name, **kwargs}, batch)

    return build


def _mft_end_to_end() -> EndToEnd:
    student, teacher, batch = _tiny_pair()
    labels = torch.tensor([0, 2, -100, 1, 2])
    return EndToEnd(student, teacher, {"name": "mft"}, batch, {"labels": labels})


def _mgd_end_to_end() -> EndToEnd:
    torch.manual_seed(3)
    teacher = TinyConvNet(channels=6)
    criterion = {
        ("features", "features"): {
            "name": "mgd",
            "num_student_channels": 4,
            "num_teacher_channels": 6,
        }
    }
    return EndToEnd(TinyConvNet(channels=4), teacher, criterion, torch.randn(2, 3, 6, 6))


def _logit_inputs() -> Inputs:
    return torch.randn(2, 3, 5), torch.randn(2, 3, 5), {}


def _mft_inputs() -> Inputs:
    return (
        torch.randn(2, 3, 5),
        torch.randn(2, 3, 5),
        {"labels": torch.tensor([[0, 4, -100], [2, 1, 3]])},
    )


def _feature_map_inputs() -> Inputs:
    return torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5), {}


# ---------------------------------------------------- kdcore_builtins.feature_criteria
def _conv_end_to_end(name: str, **kwargs: Any) -> Callable[[], EndToEnd]:
    def build() -> EndToEnd:
        torch.manual_seed(3)
        teacher = TinyConvNet(channels=6)
        criterion = {("features", "features"): {"name": name, **kwargs}}
        return EndToEnd(TinyConvNet(channels=4), teacher, criterion, torch.randn(3, 3, 6, 6))

    return build


def _dkd_end_to_end() -> EndToEnd:
    student, teacher, batch = _tiny_pair()
    labels = torch.tensor([0, 2, -100, 1, 2])
    return EndToEnd(student, teacher, {"name": "dkd"}, batch, {"labels": labels})


def _relation_inputs() -> Inputs:
    """A batch of 4 (PKT needs 3 or more for a gradient), widths differing."""
    return torch.randn(4, 5), torch.randn(4, 7), {}


# ---------------------------------------------------------- kdcore_builtins.divergences
def _hidden_inputs() -> Inputs:
    """Hidden states (widths 4 and 6) and the two lm heads (vocabulary 5) for ``fused_logits``."""
    heads = (nn.Linear(4, 5), nn.Linear(6, 5))
    return torch.randn(2, 3, 4), torch.randn(2, 3, 6), {"lm_heads": heads}


def _fused_end_to_end() -> EndToEnd:
    student, teacher, batch = _tiny_pair()
    criterion = {("fc2:input", "fc2:input"): {"name": "fused_logits", "divergence": "jsd"}}
    return EndToEnd(student, teacher, criterion, batch)


# ====================================================================== the tables
@dataclass
class CriterionCase:
    """How the contract tests build and feed one registered criterion."""

    kwargs: dict[str, Any]
    inputs: Callable[[], Inputs]
    end_to_end: Callable[[], EndToEnd]
    #: the shape reduction="none" gives for ``inputs()``; None: the criterion has no reduction.
    none_shape: tuple[int, ...] | None = None


CRITERIA: dict[str, CriterionCase] = {
    "logits": CriterionCase(
        kwargs={},
        inputs=_logit_inputs,
        end_to_end=_whole_model("logits", temperature=2.0),
        none_shape=(2, 3),
    ),
    "mft": CriterionCase(
        kwargs={}, inputs=_mft_inputs, end_to_end=_mft_end_to_end, none_shape=(2, 3)
    ),
    "mgd": CriterionCase(
        kwargs={"num_student_channels": 4, "num_teacher_channels": 6},
        inputs=_feature_map_inputs,
        end_to_end=_mgd_end_to_end,
    ),
    "mse": CriterionCase(
        kwargs={},
        inputs=_logit_inputs,
        end_to_end=_whole_model("mse"),
        none_shape=(2, 3, 5),  # elementwise, as torch's MSELoss
    ),
    "fitnet": CriterionCase(
        kwargs={"student_width": 4, "teacher_width": 6},
        inputs=_feature_map_inputs,
        end_to_end=_conv_end_to_end("fitnet", student_width=4, teacher_width=6),
        none_shape=(2, 6, 5, 5),  # elementwise, in the teacher's shape
    ),
    "hidden_cosine": CriterionCase(
        kwargs={"student_width": 4, "teacher_width": 6},
        inputs=_feature_map_inputs,
        end_to_end=_conv_end_to_end("hidden_cosine", student_width=4, teacher_width=6),
        none_shape=(2, 5, 5),  # one per position
    ),
    "at": CriterionCase(kwargs={}, inputs=_feature_map_inputs, end_to_end=_conv_end_to_end("at")),
    "pkt": CriterionCase(kwargs={}, inputs=_relation_inputs, end_to_end=_whole_model("pkt")),
    "rkd": CriterionCase(kwargs={}, inputs=_relation_inputs, end_to_end=_whole_model("rkd")),
    "sp": CriterionCase(kwargs={}, inputs=_relation_inputs, end_to_end=_whole_model("sp")),
    "dkd": CriterionCase(kwargs={}, inputs=_mft_inputs, end_to_end=_dkd_end_to_end),
    "dist": CriterionCase(
        kwargs={}, inputs=_logit_inputs, end_to_end=_whole_model("dist", tau=2.0)
    ),
    # kdcore_builtins.divergences
    "forward_kl": CriterionCase(
        kwargs={},
        inputs=_logit_inputs,
        end_to_end=_whole_model("forward_kl", temperature=2.0),
        none_shape=(2, 3),
    ),
    "reverse_kl": CriterionCase(
        kwargs={}, inputs=_logit_inputs, end_to_end=_whole_model("reverse_kl"), none_shape=(2, 3)
    ),
    "jsd": CriterionCase(
        kwargs={}, inputs=_logit_inputs, end_to_end=_whole_model("jsd", beta=0.3), none_shape=(2, 3)
    ),
    "skew_kl": CriterionCase(
        kwargs={}, inputs=_logit_inputs, end_to_end=_whole_model("skew_kl"), none_shape=(2, 3)
    ),
    "skew_reverse_kl": CriterionCase(
        kwargs={},
        inputs=_logit_inputs,
        end_to_end=_whole_model("skew_reverse_kl"),
        none_shape=(2, 3),
    ),
    "tvd": CriterionCase(
        kwargs={}, inputs=_logit_inputs, end_to_end=_whole_model("tvd"), none_shape=(2, 3)
    ),
    "topk_kl": CriterionCase(
        kwargs={"k": 3},
        inputs=_logit_inputs,
        end_to_end=_whole_model("topk_kl", k=2, tail_bucket=True),
        none_shape=(2, 3),
    ),
    "fused_logits": CriterionCase(
        kwargs={}, inputs=_hidden_inputs, end_to_end=_fused_end_to_end, none_shape=(2, 3)
    ),
}


@dataclass
class BalancerCase:
    """How the contract tests build one registered balancer, and how many KD losses it takes."""

    kwargs: dict[str, Any]
    kd_losses: int


BALANCERS: dict[str, BalancerCase] = {
    "static": BalancerCase(kwargs={"kd_loss_weight": [0.3, 0.3]}, kd_losses=2),
    "scheduled": BalancerCase(kwargs={"steps": 10, "start": 0.1, "end": 0.6}, kd_losses=2),
    "logits_magnitude": BalancerCase(kwargs={"kd_loss_weight": 0.5}, kd_losses=2),
}

CRITERION_NAMES = kd.registries().criteria.names()
BALANCER_NAMES = kd.registries().balancers.names()


def criterion_case(name: str) -> CriterionCase:
    if name not in CRITERIA:
        pytest.fail(
            f"criterion {name!r} is registered but tests/test_contracts.py has no CRITERIA entry "
            "for it: add its minimal kwargs, sample inputs and an end-to-end setup"
        )
    return CRITERIA[name]


def balancer_case(name: str) -> BalancerCase:
    if name not in BALANCERS:
        pytest.fail(
            f"loss balancer {name!r} is registered but tests/test_contracts.py has no BALANCERS "
            "entry for it: add its minimal kwargs and the number of KD losses it takes"
        )
    return BALANCERS[name]


def build_balancer(factory: Any, case: BalancerCase) -> Any:
    return factory(**case.kwargs)


def kd_loss_dict(count: int) -> dict[str, torch.Tensor]:
    values = {"student_loss": torch.tensor([1.0, 3.0], requires_grad=True)}
    values.update(
        {f"Loss_{i}": torch.tensor(float(i + 1), requires_grad=True) for i in range(count)}
    )
    return values


def test_the_built_in_names_are_registered() -> None:
    assert {"logits", "mft", "mgd", "mse"} <= set(CRITERION_NAMES)
    assert "static" in BALANCER_NAMES


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_every_criteria_table_entry_names_a_registered_criterion(name: str) -> None:
    assert name in CRITERION_NAMES, f"CRITERIA has a stale entry {name!r}"


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_every_balancers_table_entry_names_a_registered_balancer(name: str) -> None:
    assert name in BALANCER_NAMES, f"BALANCERS has a stale entry {name!r}"


# ====================================================================== criteria
@pytest.mark.parametrize("name", CRITERION_NAMES)
def test_criterion_is_an_nn_module_class(builtin_host: kd.PluginHost, name: str) -> None:
    factory = builtin_host.registries.criteria.get(name)
    assert isinstance(factory, type) and issubclass(factory, nn.Module)


@pytest.mark.parametrize("name", CRITERION_NAMES)
def test_criterion_is_constructible_from_its_minimal_kwargs(
    builtin_host: kd.PluginHost, name: str
) -> None:
    case = criterion_case(name)
    assert isinstance(builtin_host.registries.criteria.get(name)(**case.kwargs), nn.Module)


@pytest.mark.parametrize("name", CRITERION_NAMES)
def test_criterion_returns_a_finite_scalar_with_gradient_to_the_student_only(
    builtin_host: kd.PluginHost, name: str
) -> None:
    case = criterion_case(name)
    loss_fn = builtin_host.registries.criteria.get(name)(**case.kwargs)
    student, teacher, kwargs = case.inputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = loss_fn(student, teacher, **kwargs)
    assert isinstance(loss, torch.Tensor) and loss.shape == ()
    assert torch.isfinite(loss)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None, "criteria must detach the teacher's output"


@pytest.mark.parametrize("name", CRITERION_NAMES)
def test_criterion_none_reduction_gives_a_finite_unreduced_loss_with_gradient(
    builtin_host: kd.PluginHost, name: str
) -> None:
    case = criterion_case(name)
    if case.none_shape is None:
        pytest.skip(f"{name!r} has no reduction argument")
    loss_fn = builtin_host.registries.criteria.get(name)(**{**case.kwargs, "reduction": "none"})
    student, teacher, kwargs = case.inputs()
    student.requires_grad_(True)
    loss = loss_fn(student, teacher, **kwargs)
    assert loss.shape == case.none_shape
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CRITERION_NAMES)
def test_criterion_trains_end_to_end_through_convert(
    builtin_host: kd.PluginHost, name: str
) -> None:
    setup = criterion_case(name).end_to_end()
    teacher_before = {k: v.clone() for k, v in setup.teacher.state_dict().items()}
    model: Any = kd.convert(
        setup.student, [("kd_loss", {"teacher_model": setup.teacher, "criterion": setup.criterion})]
    )
    model.train()
    model(setup.batch)
    loss = model.compute_kd_loss(**setup.loss_kwargs)
    assert isinstance(loss, torch.Tensor) and loss.shape == ()
    assert math.isfinite(loss.item())
    loss.backward()

    student_grads = [p.grad for n, p in model.named_parameters() if not n.startswith("_")]
    assert any(g is not None and g.abs().sum() > 0 for g in student_grads)
    assert all(p.grad is None for p in model.teacher_model.parameters())
    model_parameters = set(model.parameters())
    saved = {tensor.data_ptr() for tensor in model.state_dict().values()}
    for loss_module in model.loss_modules:
        for param_name, param in loss_module.named_parameters():
            assert param.grad is not None, f"loss parameter {param_name} got no gradient"
            assert param in model_parameters
            assert param.data_ptr() in saved, f"loss parameter {param_name} is not saved"
    assert all(
        torch.equal(v, teacher_before[k]) for k, v in model.teacher_model.state_dict().items()
    )


# ====================================================================== balancers
@pytest.mark.parametrize("name", BALANCER_NAMES)
def test_balancer_is_a_distillation_loss_balancer_class(
    builtin_host: kd.PluginHost, name: str
) -> None:
    factory = builtin_host.registries.balancers.get(name)
    assert isinstance(factory, type) and issubclass(factory, kd.DistillationLossBalancer)


@pytest.mark.parametrize("name", BALANCER_NAMES)
def test_balancer_has_no_parameters(builtin_host: kd.PluginHost, name: str) -> None:
    balancer = build_balancer(builtin_host.registries.balancers.get(name), balancer_case(name))
    assert list(balancer.parameters()) == []


@pytest.mark.parametrize("name", BALANCER_NAMES)
def test_balancer_accepts_its_kd_loss_names(builtin_host: kd.PluginHost, name: str) -> None:
    case = balancer_case(name)
    balancer = build_balancer(builtin_host.registries.balancers.get(name), case)
    balancer.check_kd_losses([f"Loss_{i}" for i in range(case.kd_losses)])


@pytest.mark.parametrize("name", BALANCER_NAMES)
def test_balancer_returns_a_finite_scalar_that_backpropagates_to_the_kd_losses(
    builtin_host: kd.PluginHost, name: str
) -> None:
    case = balancer_case(name)
    balancer = build_balancer(builtin_host.registries.balancers.get(name), case)
    balancer.set_student_loss_reduction_fn(lambda loss: loss.mean())
    loss_dict = kd_loss_dict(case.kd_losses)
    snapshot = dict(loss_dict)
    total = balancer(loss_dict)
    assert isinstance(total, torch.Tensor) and total.shape == ()
    assert torch.isfinite(total)
    total.backward()
    assert any(loss_dict[k].grad is not None for k in loss_dict if k != "student_loss")
    assert loss_dict == snapshot, "the balancer must not change the dict it receives"


@pytest.mark.parametrize("name", BALANCER_NAMES)
def test_balancer_combines_losses_end_to_end_through_convert(
    builtin_host: kd.PluginHost, name: str, batch: torch.Tensor
) -> None:
    case = balancer_case(name)
    layers = [("", ""), ("fc1", "fc1"), ("fc2", "fc2")]
    if case.kd_losses > len(layers):
        pytest.fail(f"the end-to-end balancer test pairs at most {len(layers)} layers")
    criterion = {pair: {"name": "mse"} for pair in layers[: case.kd_losses]}
    model: Any = kd.convert(
        TinyNet(),
        [
            (
                "kd_loss",
                {
                    "teacher_model": TinyNet(width=8),
                    "criterion": criterion,
                    "loss_balancer": {"name": name, **case.kwargs},
                },
            )
        ],
    )
    output = model(batch)
    total = model.compute_kd_loss(student_loss=output.pow(2).mean())
    assert isinstance(total, torch.Tensor) and total.shape == ()
    assert torch.isfinite(total)
    total.backward()
    assert model.fc1.weight.grad is not None
