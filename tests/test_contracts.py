"""Every registered criterion, balancer, teacher loader, checkpoint backend and core mode keeps
the contracts of :mod:`kdcore.testing`, the kit third-party plugins are checked with: the
built-ins go through the same checks, so the kit cannot rot.

The tests are parametrised over the names in ``kdcore.registries()``, so a newly registered
built-in is covered automatically, and fails until it has an entry in ``CRITERIA`` or
``BALANCERS`` below: the arguments that build it, sample inputs and an end-to-end set-up.
Restoring in a fresh process costs an interpreter start per plugin: those checks are slow.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import kdcore as kd
from kdcore.testing import (
    BACKEND_CONTRACTS,
    BALANCER_CONTRACTS,
    CRITERION_CONTRACTS,
    MODE_CONTRACTS,
    TEACHER_LOADER_CONTRACTS,
    TINY_CONV_NET,
    Sample,
    Setup,
    check_backend,
    check_balancer,
    check_criterion,
    check_mode,
    check_teacher_loader,
    logits_sample,
)

FRESH_PROCESS = "restores_in_a_fresh_process"


def all_but(contracts: tuple[str, ...], kept: str) -> list[str]:
    return [name for name in contracts if name != kept]


def _conv_setup(batch: int = 3) -> Setup:
    """Two tiny conv nets, 4 and 6 channels wide, compared on their ``features`` layers."""
    return Setup(
        student=TINY_CONV_NET,
        student_kwargs={"channels": 4},
        teacher=TINY_CONV_NET,
        teacher_kwargs={"channels": 6, "seed": 1},
        layers=("features", "features"),
        batch_shape=(batch, 3, 6, 6),
    )


def _feature_map_inputs() -> Sample:
    return torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5), {}


def _relation_inputs() -> Sample:
    """A batch of 4 (PKT needs 3 or more for a gradient), widths differing."""
    return torch.randn(4, 5), torch.randn(4, 7), {}


def _hidden_inputs() -> Sample:
    """Hidden states (widths 4 and 6) and the two lm heads (vocabulary 5) for ``fused_logits``."""
    heads = (nn.Linear(4, 5), nn.Linear(6, 5))
    return torch.randn(2, 3, 4), torch.randn(2, 3, 6), {"lm_heads": heads}


# ====================================================================== the tables
@dataclass
class CriterionCase:
    """How the contract tests build and feed one registered criterion."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    sample: Callable[[], Sample] = logits_sample
    setup: Setup = field(default_factory=Setup)
    #: the shape reduction="none" gives for ``sample()``; None: the criterion has no reduction.
    none_shape: tuple[int, ...] | None = None


CRITERIA: dict[str, CriterionCase] = {
    "logits": CriterionCase(kwargs={"temperature": 2.0}, none_shape=(2, 3)),
    "mft": CriterionCase(none_shape=(2, 3)),
    "mgd": CriterionCase(
        kwargs={"num_student_channels": 4, "num_teacher_channels": 6},
        sample=_feature_map_inputs,
        setup=_conv_setup(batch=2),
    ),
    "mse": CriterionCase(none_shape=(2, 3, 5)),  # elementwise, as torch's MSELoss
    "fitnet": CriterionCase(
        kwargs={"student_width": 4, "teacher_width": 6},
        sample=_feature_map_inputs,
        setup=_conv_setup(),
        none_shape=(2, 6, 5, 5),  # elementwise, in the teacher's shape
    ),
    "hidden_cosine": CriterionCase(
        kwargs={"student_width": 4, "teacher_width": 6},
        sample=_feature_map_inputs,
        setup=_conv_setup(),
        none_shape=(2, 5, 5),  # one per position
    ),
    "at": CriterionCase(sample=_feature_map_inputs, setup=_conv_setup()),
    "pkt": CriterionCase(sample=_relation_inputs),
    "rkd": CriterionCase(sample=_relation_inputs),
    "sp": CriterionCase(sample=_relation_inputs),
    "dkd": CriterionCase(),
    "dist": CriterionCase(kwargs={"tau": 2.0}),
    # kdcore_builtins.divergences
    "forward_kl": CriterionCase(kwargs={"temperature": 2.0}, none_shape=(2, 3)),
    "reverse_kl": CriterionCase(none_shape=(2, 3)),
    "jsd": CriterionCase(kwargs={"beta": 0.3}, none_shape=(2, 3)),
    "skew_kl": CriterionCase(none_shape=(2, 3)),
    "skew_reverse_kl": CriterionCase(none_shape=(2, 3)),
    "tvd": CriterionCase(none_shape=(2, 3)),
    "topk_kl": CriterionCase(kwargs={"k": 2, "tail_bucket": True}, none_shape=(2, 3)),
    "sampled_reverse_kl": CriterionCase(kwargs={"estimator": "k1"}, none_shape=(2, 3)),
    "fused_logits": CriterionCase(
        kwargs={"divergence": "jsd"},
        sample=_hidden_inputs,
        setup=Setup(layers=("fc2:input", "fc2:input")),
        none_shape=(2, 3),
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
#: The built-in backends; each saves the same tiny model.
BACKEND_NAMES = ["safetensors", "safetensors-sharded", "torch-dcp"]
#: The core's modes, configured as kd_loss is; layerwise_kd pairs layers explicitly.
MODES = {
    "kd_loss": None,
    "layerwise_kd": [{"student": "fc1", "teacher": "fc1", "loss": {"name": "mse"}}],
}
CALLABLE_TEACHER = {"target": "kdcore.testing.models:TinyNet", "kwargs": {"width": 16, "seed": 1}}


def criterion_case(name: str) -> CriterionCase:
    if name not in CRITERIA:
        pytest.fail(
            f"criterion {name!r} is registered but tests/test_contracts.py has no CRITERIA entry "
            "for it: add its kwargs, sample inputs and an end-to-end set-up"
        )
    return CRITERIA[name]


def balancer_case(name: str) -> BalancerCase:
    if name not in BALANCERS:
        pytest.fail(
            f"loss balancer {name!r} is registered but tests/test_contracts.py has no BALANCERS "
            "entry for it: add its minimal kwargs and the number of KD losses it takes"
        )
    return BALANCERS[name]


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
def _check_criterion(name: str, skip: list[str]) -> None:
    case = criterion_case(name)
    check_criterion(name, kwargs=case.kwargs, sample=case.sample, setup=case.setup, skip=skip)


@pytest.mark.parametrize("name", CRITERION_NAMES)
def test_criterion_keeps_the_contracts(builtin_host: kd.PluginHost, name: str) -> None:
    _check_criterion(name, skip=[FRESH_PROCESS])


@pytest.mark.slow
@pytest.mark.parametrize("name", CRITERION_NAMES)
def test_criterion_restores_in_a_fresh_process(builtin_host: kd.PluginHost, name: str) -> None:
    _check_criterion(name, skip=all_but(CRITERION_CONTRACTS, FRESH_PROCESS))


@pytest.mark.parametrize("name", CRITERION_NAMES)
def test_criterion_is_an_nn_module_class(builtin_host: kd.PluginHost, name: str) -> None:
    factory = builtin_host.registries.criteria.get(name)
    assert isinstance(factory, type) and issubclass(factory, nn.Module)


@pytest.mark.parametrize("name", CRITERION_NAMES)
def test_criterion_none_reduction_has_the_documented_shape(
    builtin_host: kd.PluginHost, name: str
) -> None:
    case = criterion_case(name)
    if case.none_shape is None:
        pytest.skip(f"{name!r} has no reduction argument")
    loss_fn = builtin_host.registries.criteria.get(name)(**{**case.kwargs, "reduction": "none"})
    student, teacher, kwargs = case.sample()
    accepted = inspect.signature(loss_fn.forward).parameters
    kwargs = {key: value for key, value in kwargs.items() if key in accepted}
    assert loss_fn(student, teacher, **kwargs).shape == case.none_shape


# ====================================================================== balancers
def _check_balancer(name: str, skip: list[str]) -> None:
    case = balancer_case(name)
    check_balancer(name, kwargs=case.kwargs, kd_losses=case.kd_losses, skip=skip)


@pytest.mark.parametrize("name", BALANCER_NAMES)
def test_balancer_keeps_the_contracts(builtin_host: kd.PluginHost, name: str) -> None:
    _check_balancer(name, skip=[FRESH_PROCESS])


@pytest.mark.slow
@pytest.mark.parametrize("name", BALANCER_NAMES)
def test_balancer_restores_in_a_fresh_process(builtin_host: kd.PluginHost, name: str) -> None:
    _check_balancer(name, skip=all_but(BALANCER_CONTRACTS, FRESH_PROCESS))


# ====================================================================== the other kinds
def test_the_callable_teacher_loader_keeps_the_contracts(builtin_host: kd.PluginHost) -> None:
    check_teacher_loader("callable", kwargs=CALLABLE_TEACHER, skip=[FRESH_PROCESS])


@pytest.mark.slow
def test_the_callable_teacher_loader_restores_in_a_fresh_process(
    builtin_host: kd.PluginHost,
) -> None:
    skip = all_but(TEACHER_LOADER_CONTRACTS, FRESH_PROCESS)
    check_teacher_loader("callable", kwargs=CALLABLE_TEACHER, skip=skip)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_backend_keeps_the_contracts(builtin_host: kd.PluginHost, name: str) -> None:
    check_backend(name, skip=[FRESH_PROCESS])


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_backend_restores_in_a_fresh_process(builtin_host: kd.PluginHost, name: str) -> None:
    check_backend(name, skip=all_but(BACKEND_CONTRACTS, FRESH_PROCESS))


@pytest.mark.parametrize("name", MODES)
def test_core_mode_keeps_the_contracts(builtin_host: kd.PluginHost, name: str) -> None:
    check_mode(name, criterion=MODES[name], skip=[FRESH_PROCESS])


@pytest.mark.slow
@pytest.mark.parametrize("name", MODES)
def test_core_mode_restores_in_a_fresh_process(builtin_host: kd.PluginHost, name: str) -> None:
    check_mode(name, criterion=MODES[name], skip=all_but(MODE_CONTRACTS, FRESH_PROCESS))
