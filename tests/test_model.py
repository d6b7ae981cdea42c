"""The meta-model's behaviours: REFERENCE.md section 1, minus the defects of section 2."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdcore as kd
from tests.conftest import TinyNet, make_teacher


def kd_model(student: nn.Module, teacher: nn.Module | None = None, **config: object) -> nn.Module:
    config.setdefault("teacher_model", teacher if teacher is not None else make_teacher())
    config.setdefault("criterion", kd.LogitsDistillationLoss())
    return kd.convert(student, [("kd_loss", config)])


# ------------------------------------------------------------------ class and signature
def test_convert_is_in_place_and_isinstance_holds_while_type_differs(student: TinyNet) -> None:
    model = kd_model(student)
    assert model is student
    assert isinstance(model, TinyNet)
    assert isinstance(model, kd.DistillationModel)
    assert type(model) is not TinyNet


def test_converted_class_keeps_the_student_forward_signature(student: TinyNet) -> None:
    model = kd_model(student)
    assert inspect.signature(model.forward) == inspect.signature(TinyNet().forward)
    assert list(inspect.signature(type(model).forward).parameters) == ["self", "x", "scale"]


def test_each_converted_class_keeps_its_own_signature() -> None:
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.fc(inputs)

    first = kd_model(TinyNet())
    second = kd_model(Other(), teacher=nn.Linear(4, 3))
    assert list(inspect.signature(first.forward).parameters) == ["x", "scale"]
    assert list(inspect.signature(second.forward).parameters) == ["inputs", "mask"]


def test_same_student_class_reuses_one_converted_class() -> None:
    assert type(kd_model(TinyNet())) is type(kd_model(TinyNet()))


# ------------------------------------------------------------------ forward
def test_forward_returns_the_student_output(student: TinyNet, batch: torch.Tensor) -> None:
    expected = TinyNet()
    expected.load_state_dict(student.state_dict())
    model = kd_model(student)
    assert torch.equal(model(batch, scale=2.0), expected(batch, scale=2.0))


def test_teacher_runs_first_in_eval_mode_without_grad_with_the_same_arguments(
    student: TinyNet, batch: torch.Tensor
) -> None:
    calls: list[tuple[str, bool, bool, object]] = []

    class Recorder(TinyNet):
        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            calls.append(("teacher", self.training, torch.is_grad_enabled(), scale))
            return super().forward(x, scale)

    student.fc1.register_forward_pre_hook(
        lambda m, a: calls.append(("student", m.training, True, 0))
    )
    model = kd_model(student, teacher=Recorder(16)).train()
    model(batch, scale=3.0)
    assert calls[0] == ("teacher", False, False, 3.0)
    assert calls[1][0] == "student"


def test_teacher_is_frozen_and_stays_in_eval_mode(student: TinyNet) -> None:
    model = kd_model(student)
    teacher = model.teacher_model
    assert all(not p.requires_grad for p in teacher.parameters())
    model.train()
    assert not teacher.training and model.training
    teacher.train()  # a stray call cannot make the teacher run in training mode
    model(torch.randn(2, 4))
    assert not teacher.training


def test_train_and_eval_return_the_model(student: TinyNet) -> None:
    model = kd_model(student)
    assert model.train() is model
    assert model.eval() is model


def test_sequential_student_works(batch: torch.Tensor) -> None:
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = [layer for layer in seq]
    model = kd_model(seq)
    output = model(batch)
    assert output.shape == (5, 3)
    assert len(model) == 3
    assert list(model) == reference
    assert model[-1] is reference[-1]
    assert isinstance(model[0:2], nn.Sequential) and len(model[0:2]) == 2
    loss = model.compute_kd_loss()
    loss.backward()
    assert reference[0].weight.grad is not None


def test_student_that_iterates_its_children_does_not_run_the_teacher_twice(
    batch: torch.Tensor,
) -> None:
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for child in self.children():
                x = child(x)
            return x

    model = kd_model(Chain(), teacher=nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)))
    assert model(batch).shape == (5, 3)


# ------------------------------------------------------------------ registration
def test_teacher_and_parametrised_losses_are_child_modules(student: TinyNet) -> None:
    def loss_fn(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(s, t)

    class Learnable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(self.proj(s), t)

    learnable = Learnable()
    model = kd_model(
        student,
        criterion={("fc2", "fc2"): learnable, ("", ""): loss_fn},
        loss_balancer=kd.StaticLossBalancer([0.5, 0.5]),
    )
    parameter_ids = {id(p) for p in model.parameters()}
    assert id(learnable.proj.weight) in parameter_ids
    assert any(id(p) in parameter_ids for p in model.teacher_model.parameters())
    assert list(model.loss_modules) == [learnable]
    assert "_loss_modules.0.proj.weight" in model.state_dict()


def test_loss_module_order_follows_the_criterion() -> None:
    losses = [kd.MSELoss() for _ in range(5)]
    criterion = {(f"fc{1 + i % 2}", f"fc{1 + i % 2}"): loss for i, loss in enumerate(losses[:2])}
    model = kd_model(
        TinyNet(),
        teacher=TinyNet(),
        criterion=criterion,
        loss_balancer=kd.StaticLossBalancer([0.5, 0.5]),
    )
    assert list(model.loss_modules) == losses[:2]
    assert [p.key for p in model.kd_state.pairs] == ["MSELoss_0", "MSELoss_1"]


# ------------------------------------------------------------------ compute_kd_loss
def test_compute_kd_loss_keys_and_values(student: TinyNet, batch: torch.Tensor) -> None:
    model = kd_model(
        student,
        criterion={("fc2", "fc2"): kd.LogitsDistillationLoss(), ("fc1", "fc1"): nn.L1Loss()},
        teacher=TinyNet(width=8),
        loss_balancer=kd.StaticLossBalancer([0.25, 0.25]),
    )
    output = model(batch)
    teacher_logits = model.teacher_model(batch)
    student_loss = output.sum()
    losses = model.compute_kd_loss(student_loss=student_loss, skip_balancer=True)
    assert list(losses) == ["student_loss", "LogitsDistillationLoss_0", "L1Loss_1"]
    expected = F.kl_div(
        F.log_softmax(output, -1), F.softmax(teacher_logits, -1), reduction="none"
    ).mean()
    assert torch.allclose(losses["LogitsDistillationLoss_0"], expected)


def test_balanced_total_is_the_weighted_sum(student: TinyNet, batch: torch.Tensor) -> None:
    model = kd_model(student, loss_balancer=kd.StaticLossBalancer(0.7))
    output = model(batch)
    ce = F.cross_entropy(output, torch.tensor([0, 1, 2, 0, 1]))
    kd_only = kd.LogitsDistillationLoss()(output, model.teacher_model(batch))
    total = model.compute_kd_loss(student_loss=ce)
    assert torch.allclose(total, 0.7 * kd_only + 0.3 * ce)


def test_without_balancer_the_single_loss_is_returned(
    student: TinyNet, batch: torch.Tensor
) -> None:
    model = kd_model(student)
    loss = model.compute_kd_loss() if model(batch) is not None else None
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0


def test_loss_reduction_fn_applies_to_kd_losses_only(student: TinyNet, batch: torch.Tensor) -> None:
    model = kd_model(
        student,
        criterion=kd.LogitsDistillationLoss(reduction="none"),
        loss_balancer=kd.StaticLossBalancer(0.5),
    )
    model(batch)
    losses = model.compute_kd_loss(
        student_loss=torch.tensor([1.0, 3.0]), loss_reduction_fn=torch.mean, skip_balancer=True
    )
    assert losses["LogitsDistillationLoss_0"].dim() == 0
    assert losses["student_loss"].shape == (2,)


def test_loss_kwargs_reach_only_the_losses_that_take_them(batch: torch.Tensor) -> None:
    model = kd_model(
        TinyNet(),
        teacher=TinyNet(),
        criterion={("", ""): kd.MFTLoss(), ("fc1", "fc1"): kd.MSELoss()},
        loss_balancer=kd.StaticLossBalancer([0.5, 0.5]),
    )
    model(batch)
    losses = model.compute_kd_loss(labels=torch.tensor([0, 1, 2, 0, -100]), skip_balancer=True)
    assert set(losses) == {"MFTLoss_0", "MSELoss_1"}


def test_a_loss_kwarg_no_loss_takes_is_refused_with_a_hint(batch: torch.Tensor) -> None:
    model = kd_model(TinyNet(), criterion=kd.MFTLoss())
    model(batch)
    with pytest.raises(TypeError, match="'lables'.*did you mean 'labels'"):
        model.compute_kd_loss(lables=torch.zeros(5, dtype=torch.long))


def test_accepts_loss_kwarg_says_whether_some_loss_takes_the_keyword() -> None:
    only_mse = kd_model(TinyNet(), criterion=kd.MSELoss())
    mixed = kd_model(
        TinyNet(),
        teacher=TinyNet(),
        criterion={("", ""): kd.MFTLoss(), ("fc1", "fc1"): kd.MSELoss()},
        loss_balancer=kd.StaticLossBalancer([0.5, 0.5]),
    )
    takes_all = kd_model(TinyNet(), criterion=lambda s, t, **kwargs: (s - t).abs().mean())
    assert not only_mse.accepts_loss_kwarg("labels")
    assert mixed.accepts_loss_kwarg("labels") and not mixed.accepts_loss_kwarg("lables")
    assert takes_all.accepts_loss_kwarg("anything")


def test_captures_are_consumed_by_compute_kd_loss(student: TinyNet, batch: torch.Tensor) -> None:
    model = kd_model(student)
    model(batch)
    model.compute_kd_loss()
    with pytest.raises(kd.DistillationStateError, match="run a forward pass first"):
        model.compute_kd_loss()


def test_student_loss_without_balancer_is_refused(student: TinyNet, batch: torch.Tensor) -> None:
    model = kd_model(student)
    model(batch)
    with pytest.raises(kd.DistillationStateError, match="no loss_balancer"):
        model.compute_kd_loss(student_loss=torch.tensor(1.0))


def test_skip_balancer_keeps_student_loss_even_without_balancer(
    student: TinyNet, batch: torch.Tensor
) -> None:
    model = kd_model(student)
    model(batch)
    losses = model.compute_kd_loss(student_loss=torch.tensor(2.0), skip_balancer=True)
    assert list(losses) == ["student_loss", "LogitsDistillationLoss_0"]


def test_switching_train_and_eval_clears_captures(student: TinyNet, batch: torch.Tensor) -> None:
    model = kd_model(student).train()
    model(batch)
    model.eval()
    with pytest.raises(kd.DistillationStateError):
        model.compute_kd_loss()
    model(batch)  # eval captures work too: a validation KD loss
    assert model.compute_kd_loss().dim() == 0


def test_unconsumed_capture_on_next_training_forward_warns(
    student: TinyNet, batch: torch.Tensor
) -> None:
    model = kd_model(student).train()
    model(batch)
    with pytest.warns(kd.DuplicateCaptureWarning, match="captured again"):
        model(batch)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(batch)
        model(batch)  # in eval mode a repeated forward is normal (validation without KD loss)


# ------------------------------------------------------------------ context managers
def test_only_student_forward_skips_the_teacher(student: TinyNet, batch: torch.Tensor) -> None:
    model = kd_model(student).eval()
    calls: list[int] = []
    model.teacher_model.register_forward_hook(lambda *a: calls.append(1))
    with model.only_student_forward():
        model(batch)
    assert calls == []
    with model.only_student_forward(enable=False):
        model(batch)
    assert calls == [1]


def test_only_teacher_forward_returns_the_teacher_output(
    student: TinyNet, batch: torch.Tensor
) -> None:
    model = kd_model(student)
    with model.only_teacher_forward():
        output = model(batch)
    assert torch.equal(output, model.teacher_model(batch))
    # the teacher output is not taken for the student's
    assert "" not in model.kd_state.student_outputs


def test_only_student_and_only_teacher_together_are_refused(student: TinyNet) -> None:
    model = kd_model(student)
    with (
        model.only_teacher_forward(),
        pytest.raises(kd.DistillationStateError),
        model.only_student_forward(),
    ):
        pass


def test_hide_teacher_model_and_hide_loss_modules(student: TinyNet) -> None:
    model = kd_model(student, criterion=kd.MSELoss())
    names = [name for name, _ in model.named_children()]
    assert {"_teacher_model", "_loss_modules"} <= set(names)
    with model.hide_teacher_model():
        assert "_teacher_model" not in {n for n, _ in model.named_children()}
    with model.hide_loss_modules():
        assert "_loss_modules" not in {n for n, _ in model.named_children()}
    with model.hide_teacher_model(enable=False):
        assert "_teacher_model" in {n for n, _ in model.named_children()}
    assert [n for n, _ in model.named_children()] == names  # order kept


def test_properties(student: TinyNet) -> None:
    teacher = make_teacher()
    balancer = kd.StaticLossBalancer(1.0)
    model = kd_model(student, teacher=teacher, loss_balancer=balancer)
    assert model.teacher_model is teacher
    assert model.loss_balancer is balancer
    assert isinstance(model.loss_modules, nn.ModuleList)


# ------------------------------------------------------------------ state dict
def test_minimal_state_dict_hides_the_teacher(student: TinyNet) -> None:
    keys = set(kd_model(student).state_dict())
    assert keys == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_full_state_dict_when_not_minimal(student: TinyNet) -> None:
    keys = set(kd_model(student, expose_minimal_state_dict=False).state_dict())
    assert "_teacher_model.fc1.weight" in keys


def test_load_state_dict_accepts_a_plain_student_state_dict() -> None:
    source = TinyNet()
    model = kd_model(TinyNet(), expose_minimal_state_dict=False)
    model.load_state_dict(source.state_dict())
    assert torch.equal(model.fc1.weight, source.fc1.weight)


def test_meta_model_state_dict_round_trips(batch: torch.Tensor) -> None:
    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 16)

        def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(self.proj(s), t)

    first = kd_model(TinyNet(), criterion={("fc1", "fc1"): Projected()})
    second = kd_model(TinyNet(), criterion={("fc1", "fc1"): Projected()})
    second.load_state_dict(first.state_dict())
    assert torch.equal(second.loss_modules[0].proj.weight, first.loss_modules[0].proj.weight)


def test_teacher_and_loss_modules_follow_to(student: TinyNet) -> None:
    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 16)

        def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(self.proj(s), t)

    model = kd_model(student, criterion={("fc1", "fc1"): Projected()})
    model.to(torch.float64)
    assert model.fc1.weight.dtype == torch.float64
    assert model.teacher_model.fc1.weight.dtype == torch.float64
    assert model.loss_modules[0].proj.weight.dtype == torch.float64


# ------------------------------------------------------------------ export
def test_export_gives_back_the_student_of_its_original_class(
    student: TinyNet, batch: torch.Tensor
) -> None:
    hooks_before = (dict(student._forward_hooks), dict(student.fc1._forward_hooks))
    model = kd_model(student, criterion={("fc1", "fc1"): kd.MSELoss()}, teacher=TinyNet())
    exported = kd.export(model)
    assert exported is student and type(exported) is TinyNet
    assert (dict(exported._forward_hooks), dict(exported.fc1._forward_hooks)) == hooks_before
    assert set(exported.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert not hasattr(exported, "_kd")
    exported(batch)  # runs without capturing anything


def test_export_of_a_plain_model_warns_and_returns_it(student: TinyNet) -> None:
    with pytest.warns(kd.NotADistillationModelWarning):
        assert kd.export(student) is student


def test_export_unwraps_data_parallel(student: TinyNet) -> None:
    model = kd_model(student)
    wrapped = nn.DataParallel(model)
    assert type(kd.export(wrapped)) is TinyNet


def test_a_student_can_be_converted_again_after_export(
    student: TinyNet, batch: torch.Tensor
) -> None:
    kd.export(kd_model(student))
    model = kd_model(student)
    model(batch)
    assert model.compute_kd_loss().dim() == 0


# ------------------------------------------------------------------ training
def test_a_training_step_updates_student_and_learnable_loss_not_teacher(
    batch: torch.Tensor,
) -> None:
    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 16)

        def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(self.proj(s), t)

    model = kd_model(
        TinyNet(),
        criterion={("fc1", "fc1"): Projected(), ("", ""): kd.LogitsDistillationLoss()},
        loss_balancer=kd.StaticLossBalancer([0.3, 0.3]),
    ).train()
    teacher_before = [p.clone() for p in model.teacher_model.parameters()]
    student_before = model.fc1.weight.clone()
    projection_before = model.loss_modules[0].proj.weight.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    output = model(batch)
    loss = model.compute_kd_loss(
        student_loss=F.cross_entropy(output, torch.tensor([0, 1, 2, 0, 1]))
    )
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.fc1.weight, student_before)
    assert not torch.equal(model.loss_modules[0].proj.weight, projection_before)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.teacher_model.parameters(), teacher_before, strict=True)
    )


# ------------------------------------------------------------------ capture syntax
def test_layer_input_capture_feeds_the_layers_first_input(batch: torch.Tensor) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((s, t))
        return (s.sum() - t.sum()) ** 2

    teacher = make_teacher()
    student = TinyNet()
    model = kd_model(student, teacher=teacher, criterion={("fc2:input", "fc2:input"): record})
    model(batch)
    model.compute_kd_loss()
    with torch.no_grad():
        assert torch.equal(seen[0][0], torch.relu(student.fc1(batch)))
        assert torch.equal(seen[0][1], torch.relu(teacher.fc1(batch)))


def test_output_suffix_is_the_same_as_a_bare_name(batch: torch.Tensor) -> None:
    model = kd_model(TinyNet(), criterion={(":output", "fc2:output"): kd.LogitsDistillationLoss()})
    assert [(p.student_layer, p.teacher_layer) for p in model.kd_state.pairs] == [("", "fc2")]
    model(batch)
    assert model.compute_kd_loss().dim() == 0


def test_unknown_capture_suffix_and_whole_model_input_are_refused() -> None:
    with pytest.raises(
        kd.ConfigError,
        match=r"criterion\[0\]\.student: 'fc2:inptu': unknown capture 'inptu'; did you mean 'input'",
    ):
        kd_model(TinyNet(), criterion={("fc2:inptu", "fc2"): kd.MSELoss()})
    with pytest.raises(kd.ConfigError, match="whole model's input"):
        kd_model(TinyNet(), criterion={(":input", "fc2"): kd.MSELoss()})


def test_losses_with_bind_layers_receive_the_paired_modules() -> None:
    class Fused(nn.Module):
        def bind_layers(self, student_layer: nn.Module, teacher_layer: nn.Module) -> None:
            self.bound = (student_layer, teacher_layer)

        def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(self.bound[0](s), self.bound[1](t))

    loss = Fused()
    teacher = TinyNet()
    model = kd_model(TinyNet(), teacher=teacher, criterion={("fc2:input", "fc2:input"): loss})
    assert loss.bound[0] is model.fc2 and loss.bound[1] is teacher.fc2


def test_split_forward_teacher_pass_then_student_pass(
    student: TinyNet, batch: torch.Tensor
) -> None:
    """Pipeline stages run the two sides separately; the captures of both passes combine."""
    model = kd_model(student).train()
    with model.only_teacher_forward():
        model(batch)
    with model.only_student_forward():
        output = model(batch)
    expected = kd.LogitsDistillationLoss()(output, model.teacher_model(batch))
    assert torch.allclose(model.compute_kd_loss(), expected)


def test_load_state_dict_of_a_plain_student_leaves_balancer_buffers() -> None:
    model = kd_model(
        TinyNet(),
        loss_balancer={"name": "scheduled", "steps": 10, "start": 0.0, "end": 0.5},
    )
    model.load_state_dict(TinyNet().state_dict())  # no _loss_balancer.* keys: left as they are


def test_class_instead_of_loss_instance_at_top_level() -> None:
    with pytest.raises(kd.ConfigTypeError, match="got the class MSELoss; pass an instance"):
        kd_model(TinyNet(), criterion=kd.MSELoss)


def test_plugin_provided_names_follow_the_attribute_protocol() -> None:
    with kd.use_host(kd.PluginHost(blocked=["criteria"])):
        assert not hasattr(kd, "MSELoss")
        assert hasattr(kd, "StaticLossBalancer")
