"""``check_balancer``: the contracts every loss balancer keeps."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

import kdcore as kd
from kdcore.testing._report import Checker, ContractReport, expect
from kdcore.testing._restores import expect_restored_in_a_fresh_process
from kdcore.testing._setup import Setup

BALANCER_CONTRACTS = (
    "is_a_distillation_loss_balancer",
    "has_no_parameters",
    "accepts_its_kd_loss_names",
    "scalar_total_with_gradient_to_the_kd_losses",
    "leaves_the_loss_dict_unchanged",
    "unknown_keyword_is_a_config_error",
    "trains_end_to_end",
    "restores_in_a_fresh_process",
)

#: Balancers get these KD losses end to end: MSE between same-sized layers of two tiny MLPs.
_PAIRED_LAYERS = (("", ""), ("fc1", "fc1"), ("fc2", "fc2"))


def check_balancer(
    balancer: str | type[kd.DistillationLossBalancer],
    *,
    kwargs: Mapping[str, Any] | None = None,
    kd_losses: int = 2,
    skip: Iterable[str] = (),
) -> ContractReport:
    """Check a loss balancer against every contract kdcore's own balancers keep.

    ``balancer`` is a registered name or the class, ``kwargs`` build it, ``kd_losses`` is how
    many KD losses it is given (1 to 3). Returns a :class:`ContractReport`; raises
    :class:`ContractFailure` listing every failed contract.
    """
    if not 1 <= kd_losses <= len(_PAIRED_LAYERS):
        raise ValueError(f"kd_losses must be 1 to {len(_PAIRED_LAYERS)}, got {kd_losses}")
    registry = kd.registries().balancers
    if isinstance(balancer, str):
        name: str | None = balancer
        factory: Any = registry.get(balancer)
    else:
        name, factory = registry.name_of(balancer), balancer
    kwargs = dict(kwargs or {})
    spec = {"name": name, **kwargs} if name is not None else None
    setup = Setup(teacher_kwargs={"width": 8, "seed": 1})
    names = [f"Loss_{i}" for i in range(kd_losses)]
    checker = Checker(f"loss balancer {name or factory.__qualname__!r}", frozenset(skip))

    def build() -> Any:
        built = factory(**kwargs)
        built.set_student_loss_reduction_fn(lambda loss: loss.mean())
        return built

    def loss_dict() -> dict[str, torch.Tensor]:
        values = {"student_loss": torch.tensor([1.0, 3.0], requires_grad=True)}
        for i, loss_name in enumerate(names):
            values[loss_name] = torch.tensor(float(i + 1), requires_grad=True)
        return values

    def convert(balancer_config: Any = None) -> Any:
        criterion = [
            {"student": s, "teacher": t, "loss": {"name": "mse"}}
            for s, t in _PAIRED_LAYERS[:kd_losses]
        ]
        if balancer_config is None:
            balancer_config = spec if spec is not None else build()
        return setup.convert(criterion, loss_balancer=balancer_config)

    def is_a_distillation_loss_balancer() -> None:
        expect(
            isinstance(factory, type) and issubclass(factory, kd.DistillationLossBalancer),
            f"{factory!r} should be a subclass of kdcore.DistillationLossBalancer",
        )

    def has_no_parameters() -> None:
        parameters = [n for n, _ in build().named_parameters()]
        expect(
            not parameters,
            f"a balancer has no trainable parameters (the optimizer would not see them); "
            f"found {parameters}",
        )

    def accepts_its_kd_loss_names() -> None:
        build().check_kd_losses(names)

    def scalar_total_with_gradient_to_the_kd_losses() -> None:
        losses = loss_dict()
        total = build()(losses)
        expect(
            isinstance(total, torch.Tensor) and total.shape == () and bool(torch.isfinite(total)),
            f"the total should be a finite scalar tensor, got {total!r}",
        )
        total.backward()
        expect(
            any(losses[n].grad is not None for n in names),
            "no KD loss got a gradient from the total",
        )

    def leaves_the_loss_dict_unchanged() -> None:
        losses = loss_dict()
        snapshot = dict(losses)
        build()(losses)
        expect(
            losses == snapshot,
            f"the balancer changed the dict it was given: keys {sorted(snapshot)} -> "
            f"{sorted(losses)} (pop_student_loss works on a copy)",
        )

    def unknown_keyword_is_a_config_error() -> None:
        expect(spec is not None, "not registered, so no config can name it")
        try:
            convert({**(spec or {}), "no_such_argument": 1})
        except kd.ConfigError as exc:
            expect("no_such_argument" in str(exc), f"the error should name the keyword: {exc}")
        else:
            expect(False, "an unknown keyword in the balancer's config should raise ConfigError")

    def trains_end_to_end() -> None:
        model = convert()
        total = setup.training_loss(model)
        expect(
            total.shape == () and math.isfinite(total.item()),
            f"compute_kd_loss should give a finite scalar, got {total!r}",
        )
        total.backward()
        expect(model.fc1.weight.grad is not None, "the student got no gradient")

    def restores_in_a_fresh_process() -> None:
        expect(
            spec is not None,
            f"{factory.__qualname__} is not registered: register it (kdcore_register_balancers) "
            "in an installed plugin so that a checkpoint can name it",
        )
        model = convert()
        expect_restored_in_a_fresh_process(setup, model)

    for contract in BALANCER_CONTRACTS:
        checker.run(contract, locals()[contract])
    return checker.report(BALANCER_CONTRACTS)
