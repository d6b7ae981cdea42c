"""Bad input to convert: a clear kdcore error naming the value and its path, model untouched."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import kdcore as kd
from tests.conftest import TinyNet, make_teacher


def snapshot(model: nn.Module) -> tuple[Any, ...]:
    return (
        type(model),
        dict(model.__dict__.get("_modules", {})),
        {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()},
        [dict(m._forward_hooks) for m in model.modules()],
        [dict(m._forward_pre_hooks) for m in model.modules()],
        set(model.__dict__),
    )


def assert_unchanged(model: nn.Module, before: tuple[Any, ...]) -> None:
    after = snapshot(model)
    assert after[0] is before[0]
    assert after[1] == before[1]
    assert after[2].keys() == before[2].keys()
    for name, (value, requires_grad) in before[2].items():
        assert torch.equal(after[2][name][0], value) and after[2][name][1] == requires_grad
    assert after[3:] == before[3:]


def convert_fails(
    error: type[Exception], match: str, config: dict[str, Any], mode: str = "kd_loss"
) -> None:
    student = TinyNet()
    before = snapshot(student)
    with pytest.raises(error, match=match):
        kd.convert(student, [(mode, config)])
    assert_unchanged(student, before)


def base(**overrides: Any) -> dict[str, Any]:
    return {"teacher_model": make_teacher(), "criterion": kd.LogitsDistillationLoss(), **overrides}


def test_missing_teacher() -> None:
    convert_fails(
        kd.ConfigError, r"kd_loss\.teacher_model: required key missing", {"criterion": kd.MSELoss()}
    )


def test_missing_criterion() -> None:
    convert_fails(kd.ConfigError, r"kd_loss\.criterion", {"teacher_model": make_teacher()})


def test_unknown_config_key_suggests_the_closest() -> None:
    convert_fails(
        kd.ConfigError,
        r"kd_loss\.loss_balancr: unknown key; did you mean 'loss_balancer'\?",
        base(loss_balancr=None),
    )


def test_unknown_layer_lists_close_names() -> None:
    convert_fails(
        kd.UnknownLayerError,
        r"kd_loss\.criterion\[0\]\.student: the student \(TinyNet\) has no layer 'fc3'.*did you mean",
        base(criterion={("fc3", "fc2"): kd.MSELoss()}),
    )


def test_unknown_teacher_layer() -> None:
    convert_fails(
        KeyError,
        r"criterion\[0\]\.teacher.*no layer 'fc_2'; did you mean 'fc2'",
        base(criterion={("fc2", "fc_2"): kd.MSELoss()}),
    )


def test_several_pairs_without_balancer() -> None:
    convert_fails(
        ValueError,
        r"2 KD losses need a loss_balancer",
        base(criterion={("fc1", "fc1"): kd.MSELoss(), ("fc2", "fc2"): kd.MSELoss()}),
    )


def test_balancer_with_parameters_is_refused() -> None:
    class Learned(kd.DistillationLossBalancer):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(()))

        def forward(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
            return sum(loss_dict.values()) * self.weight  # type: ignore[return-value]

    convert_fails(
        kd.ConfigError,
        r"loss_balancer.*Learned has parameters \(weight\)",
        base(loss_balancer=Learned()),
    )


def test_weights_not_matching_the_kd_losses() -> None:
    convert_fails(
        kd.ConfigError,
        r"kd_loss\.loss_balancer: .*2 weight\(s\) but there are 1 KD losses",
        base(loss_balancer=kd.StaticLossBalancer([0.3, 0.3])),
    )


def test_balancer_of_the_wrong_type() -> None:
    convert_fails(
        kd.ConfigTypeError,
        r"loss_balancer: expected a DistillationLossBalancer",
        base(loss_balancer=0.5),
    )


def test_teacher_spec_of_the_wrong_shape() -> None:
    convert_fails(
        kd.ConfigError, r"tuple spec has 1 to 3 items", base(teacher_model=(TinyNet, (), {}, 1))
    )
    convert_fails(TypeError, r"args must be a tuple or list", base(teacher_model=(TinyNet, 16)))
    convert_fails(TypeError, r"kwargs must be a dict", base(teacher_model=(TinyNet, (), [1])))
    convert_fails(TypeError, r"teacher_model: got int", base(teacher_model=3))
    convert_fails(
        TypeError, r"returned str, not an nn.Module", base(teacher_model=lambda: "teacher")
    )


def test_teacher_that_is_the_student() -> None:
    student = TinyNet()
    with pytest.raises(kd.ConfigError, match="the teacher is the student"):
        kd.convert(student, [("kd_loss", base(teacher_model=student))])


def test_loss_class_instead_of_instance() -> None:
    convert_fails(
        TypeError,
        r"got the class MSELoss; pass an instance",
        base(criterion={("fc1", "fc1"): kd.MSELoss}),
    )


def test_unknown_criterion_name_lists_registered_ones() -> None:
    convert_fails(
        kd.UnknownPluginError,
        r"kd_loss\.criterion\.name: unknown criterion 'logit'; registered: .*logits.*did you mean 'logits'",
        base(criterion={"name": "logit"}),
    )


def test_bad_criterion_argument_names_the_path() -> None:
    convert_fails(
        kd.ConfigError,
        r"kd_loss\.criterion\[1\]\.loss\.temprature: unknown key; did you mean 'temperature'\?",
        base(
            criterion=[
                {"student": "fc1", "teacher": "fc1", "loss": {"name": "mse"}},
                {"student": "fc2", "teacher": "fc2", "loss": {"name": "logits", "temprature": 2.0}},
            ],
            loss_balancer={"name": "static", "kd_loss_weight": [0.5, 0.5]},
        ),
    )


def test_bad_criterion_value_is_refused_with_it() -> None:
    convert_fails(
        kd.ConfigError,
        r"kd_loss\.criterion.*temperature must be finite and > 0, got -1",
        base(criterion={"name": "logits", "temperature": -1}),
    )


def test_unknown_mode_suggests_the_closest() -> None:
    convert_fails(
        kd.UnknownPluginError,
        r"mode\[0\]: unknown mode 'kd_los'.*did you mean 'kd_loss'",
        base(),
        mode="kd_los",
    )


def test_mode_of_the_wrong_shape() -> None:
    with pytest.raises(kd.ConfigTypeError, match="mode"):
        kd.convert(TinyNet(), [("kd_loss",)])  # type: ignore[list-item]
    with pytest.raises(kd.ConfigError, match="needs a config"):
        kd.convert(TinyNet(), "kd_loss")


def test_converting_a_distillation_model_again_is_refused() -> None:
    model = kd.convert(TinyNet(), [("kd_loss", base())])
    before = snapshot(model)
    with pytest.raises(kd.ConfigError, match="already a distillation model"):
        kd.convert(model, [("kd_loss", base())])
    assert_unchanged(model, before)


def test_layerwise_refuses_the_whole_model_pair() -> None:
    convert_fails(
        kd.ConfigError,
        r"layerwise_kd\.criterion: this mode pairs layers explicitly",
        base(),
        mode="layerwise_kd",
    )


def test_failure_in_a_later_step_undoes_the_earlier_ones() -> None:
    student = TinyNet()
    before = snapshot(student)
    with pytest.raises(kd.ConfigError):
        kd.convert(student, [("kd_loss", base()), ("kd_loss", base())])
    assert_unchanged(student, before)


def test_config_object_and_dict_forms_are_equivalent(batch: torch.Tensor) -> None:
    first = kd.convert(TinyNet(), [("kd_loss", kd.KDLossConfig(**base()))])
    second = kd.convert(copy.deepcopy(TinyNet()), [("kd_loss", base())])
    assert type(first) is type(second)


def test_errors_subclass_the_builtin_exceptions() -> None:
    assert issubclass(kd.ConfigError, ValueError)
    assert issubclass(kd.ConfigTypeError, TypeError)
    assert issubclass(kd.UnknownLayerError, KeyError)
    assert issubclass(kd.UnknownPluginError, KeyError)
    assert all(issubclass(e, kd.KDCoreError) for e in (kd.ConfigError, kd.UnknownLayerError))


def test_layerwise_refuses_input_captures() -> None:
    convert_fails(
        kd.ConfigError,
        r"layerwise_kd\.criterion\[0\]: this mode pairs layers explicitly.*no ':input'",
        base(criterion={("fc2:input", "fc2"): kd.MSELoss()}),
        mode="layerwise_kd",
    )
