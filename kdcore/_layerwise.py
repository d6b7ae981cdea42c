"""``layerwise_kd``: train replacement layers one by one on their teacher layers' inputs."""

from __future__ import annotations

import warnings
from typing import Any, cast

import attrs
from torch import nn

from kdcore._model import DistillationModel, DistillationState
from kdcore._plan import DistillationPlan

LM_HEAD = "lm_head"


@attrs.define(eq=False)
class LayerwiseState(DistillationState):
    teacher_inputs: dict[str, tuple[Any, dict[str, Any]]] = attrs.field(factory=dict)
    saved_requires_grad: dict[str, bool] = attrs.field(factory=dict)
    bypassed_lm_heads: list[nn.Module] = attrs.field(factory=list)

    def clear_captures(self) -> None:
        super().clear_captures()
        self.teacher_inputs.clear()


class _CaptureInput:
    """Teacher pre-hook: keeps the layer's input for the paired student layer."""

    def __init__(self, state: LayerwiseState, layer: str) -> None:
        self.state, self.layer = state, layer

    def __call__(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.state.teacher_inputs[self.layer] = (args, kwargs)


class _FeedTeacherInput:
    """Student pre-hook: replaces the layer's input with its teacher layer's captured input."""

    def __init__(self, state: LayerwiseState, student_layer: str, teacher_layer: str) -> None:
        self.state, self.student_layer, self.teacher_layer = state, student_layer, teacher_layer

    def __call__(self, module: nn.Module, args: Any, kwargs: Any) -> Any:
        captured = self.state.teacher_inputs.pop(self.teacher_layer, None)
        if captured is None:
            if self.state.only_student:
                warnings.warn(
                    f"layerwise_kd under only_student_forward(): student layer "
                    f"{self.student_layer!r} runs on its own input, not teacher layer "
                    f"{self.teacher_layer!r}'s",
                    UserWarning,
                    stacklevel=2,
                )
            return None
        return captured


class LayerwiseDistillationModel(DistillationModel):
    """A distillation model whose paired student layers learn on their teacher layers' inputs.

    Everything in the student but the paired layers is frozen; an unpaired ``lm_head`` (on the
    student or the teacher) passes its input through while training (its weights stay in the
    state dict). ``kd.export`` restores the heads and the original ``requires_grad`` flags.
    """

    kd_state_class = LayerwiseState

    def kd_setup(self, plan: DistillationPlan, original_class: type[nn.Module]) -> None:
        super().kd_setup(plan, original_class)
        state = cast(LayerwiseState, self.kd_state)
        student_layers = {p.student_layer for p in plan.pairs}
        with self.kd_hidden_children():
            student_parameters = dict(self.named_parameters())
        state.saved_requires_grad = {n: p.requires_grad for n, p in student_parameters.items()}
        for name, parameter in student_parameters.items():
            parameter.requires_grad_(any(_within(name, layer) for layer in student_layers))
        for pair in plan.pairs:
            teacher_layer = state.teacher.get_submodule(pair.teacher_layer)
            student_layer = self.get_submodule(pair.student_layer)
            state.handles.append(
                teacher_layer.register_forward_pre_hook(
                    _CaptureInput(state, pair.teacher_layer), with_kwargs=True
                )
            )
            state.handles.append(
                student_layer.register_forward_pre_hook(
                    _FeedTeacherInput(state, pair.student_layer, pair.teacher_layer),
                    with_kwargs=True,
                )
            )
        teacher_layers = {p.teacher_layer for p in plan.pairs}
        for owner, paired in ((self, student_layers), (state.teacher, teacher_layers)):
            head = owner._modules.get(LM_HEAD)
            if head is not None and not any(_within(LM_HEAD, layer) for layer in paired):
                # Bypassed rather than replaced: its weights stay in state_dict and checkpoints.
                head.forward = _pass_through  # type: ignore[method-assign]
                state.bypassed_lm_heads.append(head)

    def kd_teardown(self, original_class: type[nn.Module]) -> None:
        state = getattr(self, "kd_state", None)  # None when kd_setup stopped early
        if isinstance(state, LayerwiseState):
            for head in state.bypassed_lm_heads:
                del head.__dict__["forward"]  # the class's forward shows through again
            with self.kd_hidden_children():
                for name, parameter in self.named_parameters():
                    if name in state.saved_requires_grad:
                        parameter.requires_grad_(state.saved_requires_grad[name])
        super().kd_teardown(original_class)


def _pass_through(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
    return hidden_states


def _within(name: str, layer: str) -> bool:
    """Whether the parameter or module ``name`` lies inside ``layer``."""
    return name == layer or name.startswith(layer + ".")
