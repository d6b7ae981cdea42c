"""``check_criterion``: the contracts every criterion (a KD loss plugin) keeps."""

from __future__ import annotations

import inspect
import math
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kdcore as kd
from kdcore.plugin import is_distillation_model
from kdcore.testing._report import Checker, ContractReport, NotApplicable, expect
from kdcore.testing._restores import expect_restored_in_a_fresh_process
from kdcore.testing._setup import Setup

#: ``(student_output, teacher_output, forward_kwargs)``
Sample = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]

CRITERION_CONTRACTS = (
    "builds_an_nn_module",
    "unknown_keyword_is_a_config_error",
    "bad_reduction_is_a_config_error",
    "scalar_loss_with_gradient_to_the_student_only",
    "reduction_none_is_unreduced",
    "ignored_labels_contribute_nothing",
    "deterministic",
    "trains_end_to_end",
    "an_instance_is_recordable",
    "restores_in_a_fresh_process",
)


def logits_sample() -> Sample:
    """Logits of 2 sequences x 3 positions x 5 classes, and labels with one ignored position."""
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 3, 5, generator=generator)
    teacher = torch.randn(2, 3, 5, generator=generator)
    return student, teacher, {"labels": torch.tensor([[0, 4, -100], [2, 1, 3]])}


def check_criterion(
    criterion: str | type[nn.Module],
    *,
    kwargs: Mapping[str, Any] | None = None,
    sample: Callable[[], Sample] = logits_sample,
    setup: Setup | None = None,
    skip: Iterable[str] = (),
) -> ContractReport:
    """Check a criterion against every contract kdcore's own criteria keep.

    ``criterion`` is a registered name (of the current plugin host) or the class. ``kwargs``
    build it; ``sample()`` gives ``(student_output, teacher_output, forward_kwargs)`` for the
    unit contracts (default: logits, and ``labels`` when ``forward`` takes them); ``setup`` is
    the end-to-end set-up (default: two tiny MLPs, the criterion on their outputs). ``skip``
    names contracts to leave out. Returns a :class:`ContractReport`; raises
    :class:`ContractFailure` listing every failed contract and what it expected.
    """
    name, factory = _lookup(criterion)
    kwargs = dict(kwargs or {})
    setup = setup or Setup()
    spec: Any = {"name": name, **kwargs} if name is not None else None
    checker = Checker(f"criterion {name or factory.__qualname__!r}", frozenset(skip))
    accepts = inspect.signature(factory).parameters

    def build(**overrides: Any) -> nn.Module:
        torch.manual_seed(0)
        return factory(**{**kwargs, **overrides})  # type: ignore[no-any-return]

    def config_entry() -> Any:
        return spec if spec is not None else build()

    def builds_an_nn_module() -> None:
        built = build()
        expect(
            isinstance(built, nn.Module),
            f"{factory.__qualname__}(**{kwargs}) should build an nn.Module (so its parameters "
            f"are trained and saved), got {type(built).__name__}",
        )

    def unknown_keyword_is_a_config_error() -> None:
        if spec is None:
            raise NotApplicable("checked for registered names (the config form)")
        student = setup.build_student()
        try:
            setup.convert({**spec, "no_such_argument": 1}, student=student)
        except kd.ConfigError as exc:
            expect(
                "no_such_argument" in str(exc),
                f"the ConfigError should name the unknown keyword 'no_such_argument': {exc}",
            )
        else:
            expect(False, "an unknown keyword in the criterion's config should raise ConfigError")
        expect(
            not is_distillation_model(student),
            "a failed convert should leave the student as it was",
        )

    def bad_reduction_is_a_config_error() -> None:
        if "reduction" not in accepts:
            raise NotApplicable("no reduction argument")
        bad = "no_such_reduction"
        if spec is None:  # not registered: built directly, a ValueError naming it will do
            try:
                build(reduction=bad)
            except (ValueError, TypeError) as exc:
                expect(bad in str(exc), f"the error should name the bad value {bad!r}: {exc}")
            else:
                expect(False, f"reduction={bad!r} should be refused when built")
            return
        student = setup.build_student()
        try:
            setup.convert({**spec, "reduction": bad}, student=student)
        except kd.ConfigError as exc:
            expect(bad in str(exc), f"the error should name the bad value {bad!r}: {exc}")
        except Exception as exc:
            expect(
                False,
                f"reduction={bad!r} in a config should end as kd.ConfigError (raise ValueError "
                f"naming the value, or use kdcore.validation.check_reduction), got "
                f"{type(exc).__name__}: {exc}",
            )
        else:
            expect(False, f"reduction={bad!r} should be refused when built")

    def scalar_loss_with_gradient_to_the_student_only() -> None:
        student, teacher, forward_kwargs = sample()
        student.requires_grad_(True)
        teacher.requires_grad_(True)
        loss = build()(student, teacher, **_accepted(build(), forward_kwargs))
        expect(
            isinstance(loss, torch.Tensor) and loss.shape == (),
            f"the loss should be a scalar tensor, got {_described(loss)}",
        )
        expect(bool(torch.isfinite(loss)), f"the loss should be finite, got {loss.item()}")
        loss.backward()
        expect(
            student.grad is not None and bool(torch.isfinite(student.grad).all()),
            "the student's output should get a finite gradient",
        )
        expect(
            student.grad is not None and student.grad.abs().sum().item() > 0,
            "the student's output should get a non-zero gradient",
        )
        expect(
            teacher.grad is None,
            "the teacher's output got a gradient: detach it (the teacher is not trained)",
        )

    def reduction_none_is_unreduced() -> None:
        if "reduction" not in accepts:
            raise NotApplicable("no reduction argument")
        student, teacher, forward_kwargs = sample()
        student.requires_grad_(True)
        loss_fn = build(reduction="none")
        loss = loss_fn(student, teacher, **_accepted(loss_fn, forward_kwargs))
        expect(
            isinstance(loss, torch.Tensor) and loss.dim() >= 1,
            f"reduction='none' should give one loss per example or position, got "
            f"{_described(loss)}",
        )
        expect(bool(torch.isfinite(loss).all()), "reduction='none' gave non-finite values")
        loss.sum().backward()
        expect(
            student.grad is not None and student.grad.abs().sum().item() > 0,
            "reduction='none' should keep the gradient to the student",
        )

    def ignored_labels_contribute_nothing() -> None:
        loss_fn = build()
        student, teacher, forward_kwargs = sample()
        labels = forward_kwargs.get("labels")
        keywords = _forward_keywords(loss_fn)
        if labels is None or (keywords is not None and "labels" not in keywords):
            raise NotApplicable("forward takes no labels")
        ignored = labels == -100
        if not ignored.any():
            raise NotApplicable("the sample's labels have no -100")
        student.requires_grad_(True)
        loss = loss_fn(student, teacher, **_accepted(loss_fn, forward_kwargs))
        loss.backward()
        assert student.grad is not None
        expect(
            student.grad[ignored].abs().sum().item() == 0,
            "positions labelled -100 should get no gradient",
        )
        changed_student, changed_teacher = student.detach().clone(), teacher.clone()
        changed_student[ignored] += 3.0
        changed_teacher[ignored] -= 3.0
        again = loss_fn(changed_student, changed_teacher, **_accepted(loss_fn, forward_kwargs))
        expect(
            torch.allclose(loss.detach(), again, rtol=1e-5, atol=1e-7),
            f"changing the outputs at positions labelled -100 changed the loss "
            f"({loss.item()} -> {again.item()}): they should be left out",
        )

    def deterministic() -> None:
        student, teacher, forward_kwargs = sample()
        losses = []
        for _ in range(2):
            loss_fn = build()
            torch.manual_seed(1)
            losses.append(loss_fn(student, teacher, **_accepted(loss_fn, forward_kwargs)))
        expect(
            torch.equal(losses[0], losses[1]),
            f"two criteria built and called under the same seeds gave {losses[0].item()} and "
            f"{losses[1].item()}",
        )

    def trains_end_to_end() -> None:
        model = setup.convert(config_entry())
        teacher_before = {k: v.clone() for k, v in model.teacher_model.state_dict().items()}
        loss = setup.training_loss(model)
        expect(
            isinstance(loss, torch.Tensor) and loss.shape == () and math.isfinite(loss.item()),
            f"compute_kd_loss should give a finite scalar, got {_described(loss)}",
        )
        loss.backward()
        student_grads = [p.grad for n, p in model.named_parameters() if not n.startswith("_")]
        expect(
            any(g is not None and g.abs().sum().item() > 0 for g in student_grads),
            "no student parameter got a gradient through kd.convert",
        )
        expect(
            all(p.grad is None for p in model.teacher_model.parameters()),
            "a teacher parameter got a gradient",
        )
        expect(
            all(
                torch.equal(value, teacher_before[key])
                for key, value in model.teacher_model.state_dict().items()
            ),
            "the teacher's state changed during a training step",
        )
        saved = {tensor.data_ptr() for tensor in model.state_dict().values()}
        for loss_module in model.loss_modules:
            for parameter_name, parameter in loss_module.named_parameters():
                expect(
                    parameter.grad is not None,
                    f"the criterion's parameter {parameter_name!r} got no gradient",
                )
                expect(
                    parameter.data_ptr() in saved,
                    f"the criterion's parameter {parameter_name!r} is not in the state dict",
                )

    def an_instance_is_recordable() -> None:
        instance = build()
        model = setup.convert(instance)
        with tempfile.TemporaryDirectory(prefix="kdcore-contract-") as folder:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", kd.NotRecordableWarning)
                path = kd.save(model, Path(folder) / "checkpoint")
            problems = [str(w.message) for w in caught if w.category is kd.NotRecordableWarning]
            expect(
                not problems,
                f"an instance passed to kd.convert cannot be recorded ({problems[:1]}): keep each "
                "constructor argument as a same-named attribute, or define kdcore_config()",
            )
            restored: Any = kd.restore(setup.build_student(), path)
        (rebuilt,) = restored.loss_modules
        expect(
            repr(rebuilt) == repr(instance),
            f"the restored criterion is {rebuilt!r}, the saved one {instance!r}",
        )

    def restores_in_a_fresh_process() -> None:
        expect(
            spec is not None,
            f"{factory.__qualname__} is not registered: a checkpoint names criteria by their "
            "registered name, so register it (kdcore_register_criteria) in an installed plugin",
        )
        model = setup.convert(spec)
        expect_restored_in_a_fresh_process(setup, model)

    for contract in CRITERION_CONTRACTS:
        checker.run(contract, locals()[contract])
    return checker.report(CRITERION_CONTRACTS)


def _lookup(criterion: str | type[nn.Module]) -> tuple[str | None, Any]:
    registry = kd.registries().criteria
    if isinstance(criterion, str):
        return criterion, registry.get(criterion)
    return registry.name_of(criterion), criterion


def _forward_keywords(loss_fn: Any) -> set[str] | None:
    parameters = inspect.signature(loss_fn.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def _accepted(loss_fn: Any, forward_kwargs: dict[str, Any]) -> dict[str, Any]:
    keywords = _forward_keywords(loss_fn)
    if keywords is None:
        return forward_kwargs
    return {k: v for k, v in forward_kwargs.items() if k in keywords}


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
