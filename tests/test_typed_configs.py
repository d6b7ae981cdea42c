"""Configs are typed: the converter turns every accepted form into the same typed value."""

from __future__ import annotations

from typing import Any

import pytest
from torch import nn

import kdcore as kd
from kdcore.plugin import CriterionEntry, PluginRef, TeacherCall, structure
from tests.conftest import TinyNet, make_teacher

MSE = {"name": "mse", "reduction": "sum"}


def structured(criterion: Any = MSE, **more: Any) -> kd.KDLossConfig:
    data = {"teacher_model": make_teacher, "criterion": criterion, **more}
    return structure(data, kd.KDLossConfig, path="kd_loss")


@pytest.mark.parametrize(
    "criterion",
    [
        MSE,
        {("", ""): MSE},
        [{"student": "", "teacher": "", "loss": MSE}],
    ],
    ids=["single", "pairs", "entries"],
)
def test_every_criterion_form_becomes_one_list_of_entries(criterion: Any) -> None:
    assert structured(criterion).criterion == [
        CriterionEntry("", "", PluginRef("mse", {"reduction": "sum"}))
    ]


def test_a_loss_object_is_kept_as_it_is() -> None:
    loss = kd.MSELoss()
    assert structured({("fc1", "fc1"): loss}).criterion == [CriterionEntry("fc1", "fc1", loss)]


def test_a_balancer_mapping_becomes_a_plugin_reference() -> None:
    config = structured(MSE, loss_balancer={"name": "static", "kd_loss_weight": 0.5})
    assert config.loss_balancer == PluginRef("static", {"kd_loss_weight": 0.5})


@pytest.mark.parametrize(
    ("criterion", "message"),
    [
        (
            [{"student": "", "teacher": "", "los": MSE}],
            r"kd_loss\.criterion\[0\]\.los: unknown key; did you mean 'loss'\?",
        ),
        ([{"student": "", "loss": MSE}], r"kd_loss\.criterion\[0\]\.teacher: required key missing"),
        (
            [{"student": 3, "teacher": "", "loss": MSE}],
            r"kd_loss\.criterion\[0\]\.student: expected str",
        ),
        ({("", ""): nn.MSELoss}, r"kd_loss\.criterion\[0\]\.loss: got the class MSELoss"),
        ({"name": 5}, r"kd_loss\.criterion\.name: expected the name of a criterion, got int"),
        ({"fc1": MSE}, r"kd_loss\.criterion\[0\]: keys must be .*a plugin mapping needs a 'name'"),
        ([], r"kd_loss\.criterion: has no entries"),
        ("mse", r"kd_loss\.criterion: expected a loss or layer pairs, got str"),
    ],
)
def test_criterion_errors_name_the_path_the_user_wrote(criterion: Any, message: str) -> None:
    with pytest.raises(kd.ConfigError, match=message):
        structured(criterion)
    with pytest.raises(kd.ConfigError, match=message):  # a config object given in Python
        kd.convert(
            TinyNet(),
            [("kd_loss", kd.KDLossConfig(teacher_model=make_teacher, criterion=criterion))],
        )


def test_a_config_object_given_in_python_is_recorded_like_a_config_file(tmp_path: Any) -> None:
    config = kd.KDLossConfig(teacher_model=make_teacher, criterion={("fc2", "fc2"): MSE})
    model = kd.convert(TinyNet(), [("kd_loss", config)])
    (record,) = model.mode_records
    assert record.config["criterion"] == [{"student": "fc2", "teacher": "fc2", "loss": MSE}]


LOADER = {"name": "callable", "target": "tests.conftest:make_teacher"}
TEACHER = TinyNet(16)


@pytest.mark.parametrize(
    ("spec", "typed"),
    [
        (make_teacher, TeacherCall(make_teacher)),
        ((TinyNet,), TeacherCall(TinyNet)),
        ((TinyNet, [16]), TeacherCall(TinyNet, (16,))),
        ((TinyNet, (), {"width": 16}), TeacherCall(TinyNet, (), {"width": 16})),
        (LOADER, PluginRef("callable", {"target": "tests.conftest:make_teacher"})),
        (TEACHER, TEACHER),
        ({"big": make_teacher, "own": TEACHER}, {"big": TeacherCall(make_teacher), "own": TEACHER}),
    ],
    ids=["callable", "fn", "fn-args", "fn-args-kwargs", "loader", "instance", "several"],
)
def test_every_teacher_form_becomes_a_typed_spec(spec: Any, typed: Any) -> None:
    assert structured(teacher_model=spec).teacher_model == typed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"big": (TinyNet, 16)}, r"kd_loss\.teacher_model\.big: args must be a tuple or list"),
        (
            {"big": {"name": 3}},
            r"kd_loss\.teacher_model\.big\.name: expected the name of a teacher",
        ),
        ({"1x": make_teacher}, r"kd_loss\.teacher_model: teacher keys must be identifiers"),
        (None, r"kd_loss\.teacher_model: is required: an nn\.Module"),
    ],
)
def test_teacher_errors_name_the_path_the_user_wrote(spec: Any, message: str) -> None:
    with pytest.raises(kd.ConfigError, match=message):
        structured(teacher_model=spec)
    with pytest.raises(kd.ConfigError, match=message):
        kd.convert(TinyNet(), [("kd_loss", kd.KDLossConfig(teacher_model=spec, criterion=MSE))])
