"""``check_mode``: the contracts a distillation mode keeps (those of the core's ``kd_loss``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

import kdcore as kd
from kdcore.plugin import is_distillation_model
from kdcore.testing._report import Checker, ContractReport, expect
from kdcore.testing._restores import expect_restored_in_a_fresh_process
from kdcore.testing._setup import Setup

MODE_CONTRACTS = (
    "converts_to_a_distillation_model",
    "distils_the_student_only",
    "is_recorded_by_name",
    "exports_back_to_the_student_class",
    "refuses_a_distillation_model",
    "leaves_the_student_untouched_on_a_bad_layer",
    "restores_in_a_fresh_process",
)


def check_mode(name: str, *, criterion: Any = None, skip: Iterable[str] = ()) -> ContractReport:
    """Check the mode registered as ``name``, configured like ``kd_loss`` (``teacher_model``,
    ``criterion``, ``loss_balancer``), against the contracts of the core's own modes.

    The student and teacher are two tiny MLPs (layers ``fc1``, ``fc2``, same widths);
    ``criterion`` defaults to ``{"name": "mse"}`` on the whole models.
    """
    criterion = criterion if criterion is not None else {"name": "mse"}
    setup = Setup(teacher_kwargs={"width": 8, "seed": 1})
    checker = Checker(f"mode {name!r}", frozenset(skip))

    def convert(student: Any = None, with_criterion: Any = criterion) -> Any:
        return setup.convert(with_criterion, mode=name, student=student)

    def converts_to_a_distillation_model() -> None:
        model = convert()
        expect(
            is_distillation_model(model),
            f"kd.convert with {name!r} gave a {type(model).__name__}, not a DistillationModel",
        )

    def distils_the_student_only() -> None:
        model = convert()
        loss = setup.training_loss(model)
        expect(bool(torch.isfinite(loss)), f"compute_kd_loss gave {loss.item()}")
        loss.backward()
        expect(model.fc1.weight.grad is not None, "the student got no gradient")
        expect(
            all(p.grad is None for p in model.teacher_model.parameters()),
            "a teacher parameter got a gradient",
        )

    def is_recorded_by_name() -> None:
        names = [record.name for record in convert().mode_records]
        expect(names == [name], f"the model records the modes {names}, expected [{name!r}]")

    def exports_back_to_the_student_class() -> None:
        student = setup.build_student()
        keys = set(student.state_dict())
        exported = kd.export(convert(student=student))
        expect(
            exported is student and type(exported).__name__ == "TinyNet",
            f"kd.export gave a {type(exported).__name__}, expected the student itself",
        )
        expect(set(exported.state_dict()) == keys, "the exported state dict has other keys")

    def refuses_a_distillation_model() -> None:
        try:
            convert(student=convert())
        except kd.ConfigError as exc:
            expect("already a distillation" in str(exc), f"unclear message: {exc}")
        else:
            expect(False, "converting a distillation model again should raise ConfigError")

    def leaves_the_student_untouched_on_a_bad_layer() -> None:
        student = setup.build_student()
        try:
            convert(student, [{"student": "fc3", "teacher": "fc2", "loss": {"name": "mse"}}])
        except kd.UnknownLayerError as exc:
            expect("fc3" in str(exc), f"the error should name the layer 'fc3': {exc}")
        else:
            expect(False, "an unknown student layer 'fc3' should raise UnknownLayerError")
        expect(
            not is_distillation_model(student) and list(student._modules) == ["fc1", "fc2"],
            "a failed convert changed the student",
        )

    def restores_in_a_fresh_process() -> None:
        expect_restored_in_a_fresh_process(setup, convert())

    for contract in MODE_CONTRACTS:
        checker.run(contract, locals()[contract])
    return checker.report(MODE_CONTRACTS)
