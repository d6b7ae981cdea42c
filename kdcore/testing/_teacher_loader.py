"""``check_teacher_loader``: the contracts every teacher loader keeps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

import kdcore as kd
from kdcore.plugin import is_distillation_model
from kdcore.testing._report import Checker, ContractReport, expect
from kdcore.testing._restores import expect_restored_in_a_fresh_process
from kdcore.testing._setup import Setup

TEACHER_LOADER_CONTRACTS = (
    "is_registered",
    "loads_an_nn_module",
    "loads_the_same_teacher_every_time",
    "unknown_keyword_is_a_config_error",
    "restores_in_a_fresh_process",
)


def check_teacher_loader(
    name: str,
    *,
    kwargs: Mapping[str, Any] | None = None,
    setup: Setup | None = None,
    criterion: Any = None,
    skip: Iterable[str] = (),
) -> ContractReport:
    """Check the teacher loader registered as ``name`` against the contracts of kdcore's own.

    The teacher is ``{"name": name, **kwargs}``; ``setup`` gives the student and batch (default:
    the tiny MLP) and ``criterion`` compares the two (default: ``{"name": "mse"}`` on the whole
    models, so the loaded teacher must give outputs shaped like the student's).
    """
    spec = {"name": name, **dict(kwargs or {})}
    setup = setup or Setup()
    criterion = criterion if criterion is not None else {"name": "mse"}
    checker = Checker(f"teacher loader {name!r}", frozenset(skip))

    def convert(teacher: Any = spec, student: nn.Module | None = None) -> Any:
        return setup.convert(criterion, teacher=teacher, student=student)

    def is_registered() -> None:
        registry = kd.registries().teacher_loaders
        expect(
            name in registry,
            f"{name!r} is not a registered teacher loader: {registry.unknown_message(name)}",
        )

    def loads_an_nn_module() -> None:
        model = convert()
        expect(
            isinstance(model.teacher_model, nn.Module),
            f"the loader should give an nn.Module, got {type(model.teacher_model).__name__}",
        )
        loss = setup.training_loss(model)
        expect(bool(torch.isfinite(loss)), f"the KD loss with this teacher is {loss.item()}")

    def loads_the_same_teacher_every_time() -> None:
        first, second = (convert().teacher_model.state_dict() for _ in range(2))
        differing = [k for k in first if not torch.equal(first[k], second[k])]
        expect(
            first.keys() == second.keys() and not differing,
            "loading the same spec twice gave different weights "
            f"({differing[:3] or 'other keys'}): a checkpoint rebuilds the teacher from its "
            "spec, so the spec must fix the weights",
        )

    def unknown_keyword_is_a_config_error() -> None:
        student = setup.build_student()
        try:
            convert({**spec, "no_such_argument": 1}, student=student)
        except kd.ConfigError as exc:
            expect("no_such_argument" in str(exc), f"the error should name the keyword: {exc}")
        else:
            expect(False, "an unknown keyword in the teacher spec should raise ConfigError")
        expect(not is_distillation_model(student), "a failed convert changed the student")

    def restores_in_a_fresh_process() -> None:
        expect_restored_in_a_fresh_process(setup, convert())

    for contract in TEACHER_LOADER_CONTRACTS:
        checker.run(contract, locals()[contract])
    return checker.report(TEACHER_LOADER_CONTRACTS)
