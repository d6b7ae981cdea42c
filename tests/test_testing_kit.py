"""kdcore.testing fails a broken plugin with the name of the contract it breaks, and what was
expected; its pytest plugin gives a third-party test file its fixtures."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kdcore as kd
from kdcore.testing import (
    CRITERION_CONTRACTS,
    ContractFailure,
    check_balancer,
    check_criterion,
    check_teacher_loader,
)
from kdcore.testing._report import Checker


class WrongSignatureLoss(nn.Module):
    def forward(self, student_output: torch.Tensor) -> torch.Tensor:
        return student_output.pow(2).mean()


class RandomLoss(nn.Module):
    """Different every call: its noise comes from the OS, which no torch seed reaches."""

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        noise = int.from_bytes(os.urandom(4), "little") / 2**32
        return (student_output - teacher_output.detach()).pow(2).mean() * (1 + noise)


class TeacherGradientLoss(nn.Module):
    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        return (student_output - teacher_output).pow(2).mean()  # no detach


class PlainValueErrorLoss(nn.Module):
    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError("bad reduction")  # not a kdcore error, and names nothing
        self.reduction = reduction

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        loss = (student_output - teacher_output.detach()).pow(2)
        return loss.mean() if self.reduction == "mean" else loss.sum()


class RenamedArgumentLoss(nn.Module):
    """Keeps its ``scale`` as ``factor``: an instance cannot be recorded."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.factor = scale

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        return self.factor * (student_output - teacher_output.detach()).pow(2).mean()


class IgnoresNoLabelsLoss(nn.Module):
    """Takes labels but lets the -100 positions count."""

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, labels: Any = None
    ) -> torch.Tensor:
        return (student_output - teacher_output.detach()).pow(2).mean()


class UnseededTeacherLoader:
    """Every call a new random teacher: a checkpoint cannot rebuild the teacher it saved with."""

    @staticmethod
    def load(width: int = 16) -> nn.Module:
        return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))


class ParameterBalancer(kd.DistillationLossBalancer):
    """Learns its weight: the optimizer of a training loop would never see it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))

    def forward(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_dict.pop("student_loss", None)  # and it changes the caller's dict
        return self.weight * sum(loss_dict.values())  # type: ignore[no-any-return]


class BrokenPlugins:
    """Registered in a fresh host for the test only: none of it is installed."""

    @kd.hookimpl
    def kdcore_register_criteria(self, registry: Any) -> None:
        registry.add("wrong_signature", WrongSignatureLoss)
        registry.add("random", RandomLoss)
        registry.add("teacher_gradient", TeacherGradientLoss)
        registry.add("plain_value_error", PlainValueErrorLoss)
        registry.add("ignores_no_labels", IgnoresNoLabelsLoss)
        registry.add("renamed_argument", RenamedArgumentLoss)

    @kd.hookimpl
    def kdcore_register_balancers(self, registry: Any) -> None:
        registry.add("parameter", ParameterBalancer)

    @kd.hookimpl
    def kdcore_register_teacher_loaders(self, registry: Any) -> None:
        registry.add("unseeded", UnseededTeacherLoader.load)


@pytest.fixture
def broken_host() -> Iterator[kd.PluginHost]:
    host = kd.PluginHost(plugins=[("broken", BrokenPlugins())], blocked=())
    with kd.use_host(host):
        yield host


def failed_contracts(check: Any, *args: Any, **kwargs: Any) -> dict[str, str]:
    with pytest.raises(ContractFailure) as failure:
        check(*args, **kwargs)
    assert str(failure.value).splitlines()[0].endswith("contract(s):")
    return dict(failure.value.failures)


FAST = {"skip": ["restores_in_a_fresh_process"]}


def test_a_wrong_forward_signature_fails_the_loss_contracts(broken_host: kd.PluginHost) -> None:
    failed = failed_contracts(check_criterion, "wrong_signature", **FAST)
    assert "scalar_loss_with_gradient_to_the_student_only" in failed
    assert "trains_end_to_end" in failed
    assert "builds_an_nn_module" not in failed


def test_a_non_deterministic_loss_fails_determinism(broken_host: kd.PluginHost) -> None:
    failed = failed_contracts(check_criterion, "random", **FAST)
    assert list(failed) == ["deterministic"]
    assert "under the same seeds gave" in failed["deterministic"]


def test_a_loss_that_trains_the_teacher_fails_with_the_contract_name(
    broken_host: kd.PluginHost,
) -> None:
    failed = failed_contracts(check_criterion, "teacher_gradient", **FAST)
    # Through kd.convert the teacher runs without autograd: only the unit contract can see it.
    assert list(failed) == ["scalar_loss_with_gradient_to_the_student_only"]
    assert "detach it" in failed["scalar_loss_with_gradient_to_the_student_only"]


def test_a_plain_value_error_for_a_bad_argument_fails(broken_host: kd.PluginHost) -> None:
    failed = failed_contracts(check_criterion, "plain_value_error", **FAST)
    assert list(failed) == ["bad_reduction_is_a_config_error", "reduction_none_is_unreduced"]
    assert (
        "should name the bad value 'no_such_reduction'"
        in (failed["bad_reduction_is_a_config_error"])
    )
    assert "ValueError: bad reduction" in failed["reduction_none_is_unreduced"]


def test_a_loss_counting_ignored_positions_fails(broken_host: kd.PluginHost) -> None:
    failed = failed_contracts(check_criterion, "ignores_no_labels", **FAST)
    assert list(failed) == ["ignored_labels_contribute_nothing"]
    assert "-100" in failed["ignored_labels_contribute_nothing"]


def test_a_loss_whose_instances_cannot_be_recorded_fails(broken_host: kd.PluginHost) -> None:
    failed = failed_contracts(check_criterion, "renamed_argument", kwargs={"scale": 2.0}, **FAST)
    assert list(failed) == ["an_instance_is_recordable"]
    assert "kdcore_config()" in failed["an_instance_is_recordable"]


def test_a_loss_registered_only_in_this_process_does_not_restore_elsewhere(
    broken_host: kd.PluginHost,
) -> None:
    skip = [c for c in CRITERION_CONTRACTS if c != "restores_in_a_fresh_process"]
    failed = failed_contracts(check_criterion, "ignores_no_labels", skip=skip)
    assert "fresh process failed" in failed["restores_in_a_fresh_process"]
    assert "ignores_no_labels" in failed["restores_in_a_fresh_process"]


def test_an_unregistered_class_cannot_be_recorded(broken_host: kd.PluginHost) -> None:
    class Unregistered(TeacherGradientLoss):
        def forward(self, student_output: Any, teacher_output: Any) -> torch.Tensor:
            return super().forward(student_output, teacher_output.detach())

    failed = failed_contracts(check_criterion, Unregistered)
    # A class defined in a function has no importable name either: it is not even recordable.
    assert list(failed) == ["an_instance_is_recordable", "restores_in_a_fresh_process"]
    assert "is not registered" in failed["restores_in_a_fresh_process"]


def test_a_balancer_with_parameters_that_changes_its_input_fails(
    broken_host: kd.PluginHost,
) -> None:
    failed = failed_contracts(check_balancer, "parameter", **FAST)
    assert {"has_no_parameters", "leaves_the_loss_dict_unchanged"} <= set(failed)
    assert "['weight']" in failed["has_no_parameters"]


def test_a_teacher_loader_without_fixed_weights_fails(broken_host: kd.PluginHost) -> None:
    failed = failed_contracts(check_teacher_loader, "unseeded", **FAST)
    assert list(failed) == ["loads_the_same_teacher_every_time"]


def test_a_passing_check_reports_what_it_ran(broken_host: kd.PluginHost) -> None:
    report = check_criterion("mse", skip=["restores_in_a_fresh_process"])
    assert "trains_end_to_end" in report.passed
    assert ("restores_in_a_fresh_process", "skipped by the caller") in report.skipped


def test_skipping_an_unknown_contract_is_refused(broken_host: kd.PluginHost) -> None:
    with pytest.raises(ValueError, match="no_such_contract"):
        check_criterion("mse", skip=["no_such_contract"])


def test_a_contract_that_raises_is_reported_with_where_it_raised() -> None:
    checker = Checker("plugin 'x'", frozenset())
    checker.run("explodes", lambda: 1 / 0)
    with pytest.raises(
        ContractFailure, match=r"explodes: raised ZeroDivisionError.*test_testing_kit"
    ):
        checker.report(("explodes",))


@pytest.mark.slow
def test_a_third_party_test_file_is_three_lines(tmp_path: Path) -> None:
    test_file = tmp_path / "test_my_plugin.py"
    test_file.write_text(
        textwrap.dedent(
            """\
            from kdcore.testing import check_criterion
            def test_mse_keeps_the_contracts(kd_plugin_host, kd_student, kd_teacher, kd_batch):
                check_criterion("mse", skip=["restores_in_a_fresh_process"])
            """
        )
    )
    installed = any(
        entry_point.value == "kdcore.testing.pytest_plugin"
        for entry_point in importlib.metadata.entry_points(group="pytest11")
    )
    # Installed, pytest loads the plugin itself (what a plugin author gets); in a checkout
    # whose metadata predates the entry point, name it.
    load = [] if installed else ["-p", "kdcore.testing.pytest_plugin"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *load, str(test_file)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
