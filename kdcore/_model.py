"""The distillation meta-model: the student, converted in place, carrying its teacher and losses.

A converted model's class is a subclass of both :class:`DistillationModel` and the student's own
class, made once per student class (so ``isinstance(model, StudentCls)`` holds and each class keeps
its own ``forward`` signature). The teacher, the loss modules and the balancer are child modules;
forward hooks capture the paired layers' outputs for :meth:`DistillationModel.compute_kd_loss`.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, overload

import attrs
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kdcore._balancer import STUDENT_LOSS_KEY, DistillationLossBalancer, StudentLossWeightWarning
from kdcore._errors import CriterionError, DistillationStateError, KDCoreError, did_you_mean
from kdcore._plan import WHOLE_MODEL, DistillationPlan, LossPair, loss_name, split_layer

if TYPE_CHECKING:
    from kdcore._record import ModeRecord

TEACHER = "_teacher_model"
LOSS_MODULES = "_loss_modules"
BALANCER = "_loss_balancer"
KD_CHILDREN = (TEACHER, LOSS_MODULES, BALANCER)


class DuplicateCaptureWarning(UserWarning):
    """A layer's output was captured again before compute_kd_loss consumed the previous one."""


@attrs.define(eq=False)
class DistillationState:
    """What a converted model adds, kept in one object that the hooks share.

    Hooks refer to this state rather than to the model, so no reference cycle keeps a model alive.
    """

    original_class: type[nn.Module]
    teacher: nn.Module
    pairs: tuple[LossPair, ...]
    balancer: DistillationLossBalancer | None
    expose_minimal_state_dict: bool
    training: bool
    student_outputs: dict[str, Any] = attrs.field(factory=dict)
    teacher_outputs: dict[str, Any] = attrs.field(factory=dict)
    handles: list[RemovableHandle] = attrs.field(factory=list)
    only_student: bool = False
    only_teacher: bool = False
    modes: list[ModeRecord] = attrs.field(factory=list)  # in order
    capturing: bool = False  # only outputs of the meta-model's own forward are captured
    warned_missing_student_loss: bool = False
    captures_whole_student: bool = attrs.field(init=False)

    captures_whole_teacher: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # The two whole-model outputs are stored by forward itself: a hook on the root would
        # cost a slower module call on every step.
        self.captures_whole_student = any(p.student_layer == WHOLE_MODEL for p in self.pairs)
        self.captures_whole_teacher = any(p.teacher_layer == WHOLE_MODEL for p in self.pairs)

    def clear_captures(self) -> None:
        self.student_outputs.clear()
        self.teacher_outputs.clear()

    def store(self, side: str, layer: str, output: Any) -> None:
        store = self.student_outputs if side == "student" else self.teacher_outputs
        if self.training and layer in store:
            warnings.warn(
                f"the output of {side} layer {layer or '<whole model>'!r} was captured again "
                "before compute_kd_loss consumed the previous one (the newer output is kept); "
                "call compute_kd_loss after each training forward",
                DuplicateCaptureWarning,
                stacklevel=4,
            )
        store[layer] = output


class _CaptureOutput:
    """Forward hook storing a layer's output until compute_kd_loss takes it."""

    def __init__(self, state: DistillationState, side: str, layer: str) -> None:
        self.state, self.side, self.layer = state, side, layer

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        # Calls outside the meta-model's forward (the user running model.teacher_model(x),
        # activation checkpointing recomputing a layer in backward) are not captured.
        if self.state.capturing:
            self.state.store(self.side, self.layer, output)


class _CaptureInput(_CaptureOutput):
    """Forward pre-hook storing a layer's first input (``"layer:input"``)."""

    def __call__(self, module: nn.Module, args: Any, kwargs: Any) -> None:  # type: ignore[override]
        if self.state.capturing:
            first = args[0] if args else next(iter(kwargs.values()), None)
            self.state.store(self.side, self.layer, first)


class DistillationModel(nn.Module):
    """A student converted for distillation; made by ``kd.convert``, never instantiated directly.

    Use it in place of the student: ``forward`` runs the frozen teacher first (eval mode,
    ``no_grad``) and returns the student's output; ``compute_kd_loss`` turns the captured outputs
    into the loss.
    """

    _kd: DistillationState
    #: Subclasses that keep more state subclass :class:`DistillationState` and name it here.
    kd_state_class: type[DistillationState] = DistillationState

    # ----------------------------------------------------------------- conversion
    @classmethod
    def convert(
        cls, student: nn.Module, plan: DistillationPlan, record: ModeRecord | None = None
    ) -> DistillationModel:
        """Turn ``student`` (in place) into an instance of ``cls`` following a checked plan.

        ``record`` is the mode's config as data (see :func:`kdcore._record.record_distillation`),
        what ``kd.save`` writes so that ``kd.restore`` can convert again.
        """
        original_class = type(student)
        student.__class__ = distillation_class(cls, original_class)
        model: DistillationModel = student  # type: ignore[assignment]
        try:
            model.kd_setup(plan, original_class)
        except BaseException:
            model.kd_teardown(original_class)
            raise
        if record is not None:
            model.record_mode(record)
        return model

    def kd_setup(self, plan: DistillationPlan, original_class: type[nn.Module]) -> None:
        """Subclass hook: make ``self`` (already of its converted class) distil by ``plan``.

        Adds the teacher, the loss modules and the balancer as children and the capture hooks.
        An override calls ``super().kd_setup(...)`` first; its own hook handles go in
        ``self.kd_state.handles`` so that :meth:`kd_teardown` removes them. If it raises,
        :meth:`kd_teardown` runs and the student is as it was.
        """
        teacher = plan.teacher
        teacher.requires_grad_(False)
        teacher.eval()
        self._kd = self.kd_state_class(
            original_class=original_class,
            teacher=teacher,
            pairs=plan.pairs,
            balancer=plan.balancer,
            expose_minimal_state_dict=plan.expose_minimal_state_dict,
            training=self.training,
        )
        self.add_module(TEACHER, teacher)
        self.add_module(
            LOSS_MODULES, nn.ModuleList(p.loss for p in plan.pairs if isinstance(p.loss, nn.Module))
        )
        if plan.balancer is not None:
            self.add_module(BALANCER, plan.balancer)
        self._register_capture_hooks()

    def _register_capture_hooks(self) -> None:
        state = self._kd
        for side, root, layers in (
            ("student", self, {p.student_layer for p in state.pairs} - {WHOLE_MODEL}),
            ("teacher", state.teacher, {p.teacher_layer for p in state.pairs} - {WHOLE_MODEL}),
        ):
            for layer in sorted(layers):
                name, capture = split_layer(layer)
                module = root.get_submodule(name)
                if capture == "input":
                    hook = _CaptureInput(state, side, layer)
                    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
                else:
                    handle = module.register_forward_hook(_CaptureOutput(state, side, layer))
                state.handles.append(handle)

    def kd_teardown(self, original_class: type[nn.Module]) -> None:
        """Subclass hook: undo :meth:`kd_setup`, also when it stopped half-way (so the state may
        be missing: ``getattr(self, "kd_state", None)``), and restore ``original_class``.

        An override undoes its own changes, then calls ``super().kd_teardown(...)``.
        """
        state = self.__dict__.pop("_kd", None)
        for name in KD_CHILDREN:
            self._modules.pop(name, None)
        if state is not None:
            for handle in state.handles:
                handle.remove()
            state.clear_captures()
        self.__class__ = original_class  # type: ignore[assignment]  # back to the student's own

    @property
    def kd_state(self) -> DistillationState:
        """The state the capture hooks share (an instance of :attr:`kd_state_class`), for
        subclass hooks: a hook that refers to it rather than to the model keeps no cycle."""
        return self._kd

    def record_mode(self, record: ModeRecord) -> None:
        """Add the record of a mode applied to this model, for ``kd.save`` to write.

        ``kd.convert`` records every step applied to a distillation model; the mode that makes
        one records itself (:meth:`convert`'s ``record``)."""
        self._kd.modes.append(record)

    @property
    def mode_records(self) -> tuple[ModeRecord, ...]:
        """The records of the modes applied to this model, in order."""
        return tuple(self._kd.modes)

    def export_student(self) -> nn.Module:
        """Give back the student: hooks, teacher and losses removed, its own class restored.

        What ``kd.export`` does once wrappers are unwrapped; runs :meth:`kd_teardown`."""
        self.kd_teardown(self._kd.original_class)
        return self

    # ----------------------------------------------------------------- forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Plain try/finally rather than context managers: this runs on every training step.
        state = self._kd
        state.capturing = True
        try:
            if state.only_student:
                return self._student_forward(args, kwargs)
            if state.teacher.training:  # a stray teacher.train() must not unfreeze batch norm
                state.teacher.eval()
            with torch.no_grad():
                teacher_output = state.teacher(*args, **kwargs)
            if state.captures_whole_teacher:
                state.store("teacher", WHOLE_MODEL, teacher_output)
            if state.only_teacher:
                return teacher_output
            return self._student_forward(args, kwargs)
        finally:
            state.capturing = False

    def _student_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Containers such as nn.Sequential iterate their children in forward: the teacher and
        # the losses must not be among them. Our children are last, so popping them and putting
        # them back keeps the order.
        modules = self._modules
        hidden = [(name, modules.pop(name)) for name in KD_CHILDREN if name in modules]
        try:
            output = super().forward(*args, **kwargs)
        finally:
            modules.update(hidden)
        if self._kd.captures_whole_student:
            self._kd.store("student", WHOLE_MODEL, output)
        return output

    def train(self, mode: bool = True) -> DistillationModel:
        switched = mode != self.training
        super().train(mode)
        self._kd.teacher.eval()
        self._kd.training = mode
        if switched:
            self._kd.clear_captures()
        return self

    # ----------------------------------------------------------------- loss
    @overload
    def compute_kd_loss(
        self,
        student_loss: torch.Tensor | None = None,
        loss_reduction_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        skip_balancer: Literal[False] = False,
        *,
        return_terms: Literal[True],
        **loss_fn_kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    @overload
    def compute_kd_loss(
        self,
        student_loss: torch.Tensor | None = None,
        loss_reduction_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        skip_balancer: bool = False,
        *,
        return_terms: Literal[False] = False,
        **loss_fn_kwargs: Any,
    ) -> torch.Tensor | dict[str, torch.Tensor]: ...

    def compute_kd_loss(
        self,
        student_loss: torch.Tensor | None = None,
        loss_reduction_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        skip_balancer: bool = False,
        *,
        return_terms: bool = False,
        **loss_fn_kwargs: Any,
    ) -> torch.Tensor | dict[str, torch.Tensor] | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the distillation loss from the outputs captured in the last forward.

        Returns ``{"student_loss": ..., "<Loss>_<i>": ...}`` with ``skip_balancer=True``; the single
        KD loss when there is no balancer; else the balancer's total. With ``return_terms=True``,
        ``(total, terms)``: the total as without it and that dict, to log the parts of the loss
        that is trained. ``loss_reduction_fn`` is applied to each KD loss (not to
        ``student_loss``). Extra keyword arguments go to each loss whose ``forward`` accepts them
        (``labels=`` for ``MFTLoss``, say).
        """
        state = self._kd
        balancer = None if skip_balancer else state.balancer
        if student_loss is not None and state.balancer is None and not skip_balancer:
            raise DistillationStateError(
                "compute_kd_loss got student_loss but the model has no loss_balancer to combine "
                "it with the KD loss; configure one (e.g. {'name': 'static'}) or add the losses "
                "yourself with skip_balancer=True"
            )
        if return_terms and skip_balancer:
            raise TypeError("compute_kd_loss: skip_balancer=True returns the terms alone")
        if student_loss is None and balancer is not None:
            self._warn_missing_student_loss(balancer)
        self._check_loss_kwargs(loss_fn_kwargs)
        losses: dict[str, torch.Tensor] = {}
        if student_loss is not None:
            losses[STUDENT_LOSS_KEY] = student_loss
        for pair in state.pairs:
            student_out = self._captured(state.student_outputs, "student", pair.student_layer)
            teacher_out = self._captured(state.teacher_outputs, "teacher", pair.teacher_layer)
            kwargs = (
                loss_fn_kwargs
                if pair.accepted_kwargs is None
                else {k: v for k, v in loss_fn_kwargs.items() if k in pair.accepted_kwargs}
            )
            try:  # free when nothing is raised
                loss = pair.loss(student_out, teacher_out, **kwargs)
            except (ValueError, RuntimeError) as exc:
                # Not the outputs' fault. (torch.OutOfMemoryError is new in torch 2.5.)
                if isinstance(exc, KDCoreError | torch.cuda.OutOfMemoryError):
                    raise
                raise _criterion_error(pair, exc, student_out, teacher_out) from exc
            losses[pair.key] = loss_reduction_fn(loss) if loss_reduction_fn is not None else loss
        state.clear_captures()
        if skip_balancer:
            return losses
        total = losses[state.pairs[0].key] if balancer is None else balancer(losses)
        return (total, losses) if return_terms else total

    def _warn_missing_student_loss(self, balancer: DistillationLossBalancer) -> None:
        # Once per model, here rather than at construction: only a call without student_loss
        # can drop the balancer's student-loss term.
        if self._kd.warned_missing_student_loss or not balancer.needs_student_loss:
            return
        self._kd.warned_missing_student_loss = True
        warnings.warn(
            f"compute_kd_loss got no student_loss but the loss balancer "
            f"({type(balancer).__name__}({balancer.extra_repr()})) weighs it: pass "
            "compute_kd_loss(student_loss=...)",
            StudentLossWeightWarning,
            stacklevel=3,
        )

    def accepts_loss_kwarg(self, name: str) -> bool:
        """Whether some loss takes the keyword ``name`` (so ``compute_kd_loss`` may be given it).

        For training loops that serve any criterion: pass ``labels=`` only when a loss wants it.
        """
        return any(p.accepted_kwargs is None or name in p.accepted_kwargs for p in self._kd.pairs)

    def _check_loss_kwargs(self, loss_fn_kwargs: dict[str, Any]) -> None:
        pairs = self._kd.pairs
        if not loss_fn_kwargs or any(p.accepted_kwargs is None for p in pairs):
            return
        accepted = set().union(*(p.accepted_kwargs or () for p in pairs))
        for key in loss_fn_kwargs:
            if key not in accepted:
                raise TypeError(
                    f"compute_kd_loss got the keyword {key!r}, which no loss accepts"
                    f"{did_you_mean(key, accepted)} (losses: {', '.join(p.key for p in pairs)})"
                )

    @staticmethod
    def _captured(store: dict[str, Any], side: str, layer: str) -> Any:
        if layer not in store:
            raise DistillationStateError(
                f"no output of {side} layer {layer or '<whole model>'!r} was captured since the "
                "last compute_kd_loss: run a forward pass first"
                + (" outside only_student_forward()" if side == "teacher" else "")
            )
        return store[layer]

    # ----------------------------------------------------------------- context managers
    @contextlib.contextmanager
    def only_student_forward(self, enable: bool = True) -> Iterator[None]:
        """Inside the block, forward runs the student alone (no teacher, e.g. for inference)."""
        with self._flag("only_student", enable):
            yield

    @contextlib.contextmanager
    def only_teacher_forward(self, enable: bool = True) -> Iterator[None]:
        """Inside the block, forward runs the teacher alone and returns its output."""
        with self._flag("only_teacher", enable):
            yield

    @contextlib.contextmanager
    def hide_teacher_model(self, enable: bool = True) -> Iterator[None]:
        """Inside the block the teacher is not a child (absent from ``state_dict``, ``modules``)."""
        with self.kd_hidden_children((TEACHER,) if enable else ()):
            yield

    @contextlib.contextmanager
    def hide_loss_modules(self, enable: bool = True) -> Iterator[None]:
        """Inside the block the loss modules are not children."""
        with self.kd_hidden_children((LOSS_MODULES,) if enable else ()):
            yield

    @contextlib.contextmanager
    def _flag(self, name: str, enable: bool) -> Iterator[None]:
        state = self._kd
        other = "only_teacher" if name == "only_student" else "only_student"
        if enable and getattr(state, other):
            raise DistillationStateError(
                f"{name}_forward() inside {other}_forward(): at most one side can run alone"
            )
        previous = getattr(state, name)
        setattr(state, name, enable or previous)
        try:
            yield
        finally:
            setattr(state, name, previous)

    @contextlib.contextmanager
    def kd_hidden_children(self, names: tuple[str, ...] = KD_CHILDREN) -> Iterator[None]:
        """Inside the block the children ``names`` are not children (by default the teacher,
        the loss modules and the balancer: ``named_parameters()`` then lists the student's)."""
        modules = self._modules
        order = list(modules)
        hidden = {name: modules.pop(name) for name in names if name in modules}
        if not hidden:
            yield
            return
        try:
            yield
        finally:
            modules.update(hidden)
            if list(modules)[: len(order)] != order:  # only when a hidden child was not last
                reordered = {name: modules[name] for name in order if name in modules}
                reordered.update(modules)
                modules.clear()
                modules.update(reordered)

    # ----------------------------------------------------------------- properties
    @property
    def teacher_model(self) -> nn.Module:
        return self._kd.teacher

    @property
    def loss_modules(self) -> nn.ModuleList:
        return self._modules[LOSS_MODULES]  # type: ignore[return-value]

    @property
    def loss_balancer(self) -> DistillationLossBalancer | None:
        return self._kd.balancer

    # ----------------------------------------------------------------- state dict
    def kd_state_dict(self) -> dict[str, torch.Tensor]:
        """The distillation state: the loss modules' and the balancer's tensors (learnable loss
        weights, a schedule's step), keyed as in ``state_dict()``: ``_loss_modules.<i>.…`` and
        ``_loss_balancer.…``. With :meth:`student_state_dict`, what resuming needs (the teacher
        is frozen). Load it back with :meth:`load_kd_state_dict`."""
        return {
            key: value
            for name, module in self._modules.items()
            if name in (LOSS_MODULES, BALANCER) and module is not None
            for key, value in module.state_dict(prefix=f"{name}.").items()
        }

    def load_kd_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`kd_state_dict` returned, strictly: a missing or extra key, or a
        shape that differs, raises :class:`kdcore.DistillationStateError` naming it."""
        expected = self.kd_state_dict()
        missing = [key for key in expected if key not in state_dict]
        unexpected = [key for key in state_dict if key not in expected]
        if missing or unexpected:
            raise DistillationStateError(
                "the distillation state does not fit this model's loss modules and balancer: "
                + "; ".join(
                    f"{what}: {', '.join(keys)}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected))
                    if keys
                )
            )
        for name in (LOSS_MODULES, BALANCER):
            module, prefix = self._modules.get(name), f"{name}."
            if module is None:
                continue
            part = {
                k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)
            }
            try:
                module.load_state_dict(part)
            except RuntimeError as exc:  # a shape that differs
                raise DistillationStateError(
                    f"the distillation state does not fit this model's {name}: {exc}"
                ) from None

    def student_state_dict(self) -> dict[str, Any]:
        """The student's own entries of the state dict (no teacher, loss modules or balancer),
        keyed as in the exported student: what its ``load_state_dict`` or ``from_pretrained``
        takes."""
        kd_prefixes = tuple(f"{name}." for name in KD_CHILDREN)
        return {
            key: value
            for key, value in super().state_dict().items()
            if not key.startswith(kd_prefixes)
        }

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        with self.hide_teacher_model(self._kd.expose_minimal_state_dict):
            return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a meta-model state dict, or a plain student one (loss modules and balancer are
        then left as they are)."""
        hidden = tuple(
            name
            for name in KD_CHILDREN
            if not any(key.startswith(name + ".") for key in state_dict)
            or (name == TEACHER and self._kd.expose_minimal_state_dict)
        )
        with self.kd_hidden_children(hidden):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _criterion_error(
    pair: LossPair, error: Exception, student_out: Any, teacher_out: Any
) -> CriterionError:
    """``error``, raised by ``pair``'s loss, naming the pair and its outputs' shapes."""
    name = loss_name(pair.loss)
    message = str(error).removeprefix(f"{name}: ")  # a kdcore criterion names itself
    shapes = [
        str(tuple(o.shape)) for o in (student_out, teacher_out) if isinstance(o, torch.Tensor)
    ]
    if len(shapes) == 2 and not all(shape in message for shape in shapes):
        message = f"student output {shapes[0]} and teacher output {shapes[1]}: {message}"
    note = getattr(teacher_out, "criterion_note", None)  # e.g. a cached teacher's sparse output
    if isinstance(note, str) and "cache" not in message:
        message = f"{note}; {name}: {message}"
    layers = tuple(layer or "<output>" for layer in (pair.student_layer, pair.teacher_layer))
    return CriterionError(f"{name} on {layers}: {message}", path=pair.path)


def _forward_with_signature(wrapper_forward: Any, student_forward: Any) -> Any:
    """A copy of ``wrapper_forward`` (same code, no extra call frame) that shows the student's
    signature, which frameworks such as Hugging Face inspect."""
    forward = types.FunctionType(
        wrapper_forward.__code__,
        wrapper_forward.__globals__,
        "forward",
        wrapper_forward.__defaults__,
        wrapper_forward.__closure__,
    )
    forward.__doc__ = student_forward.__doc__
    forward.__qualname__ = wrapper_forward.__qualname__
    forward.__signature__ = inspect.signature(student_forward)  # type: ignore[attr-defined]
    return forward


class _StudentSequence:
    """Container methods for ``nn.Sequential`` students, seeing the student's layers only."""

    def __len__(self: Any) -> int:
        with self.kd_hidden_children(KD_CHILDREN):
            return len(self._modules)

    def __iter__(self: Any) -> Iterator[nn.Module]:
        with self.kd_hidden_children(KD_CHILDREN):
            return iter(list(self._modules.values()))

    def __getitem__(self: Any, index: Any) -> Any:
        with self.kd_hidden_children(KD_CHILDREN):
            items = list(self._modules.items())
        if isinstance(index, slice):
            return nn.Sequential(OrderedDict(items[index]))
        return items[index][1]


_classes: dict[tuple[type, type], type] = {}


def distillation_class(wrapper: type[DistillationModel], student_class: type[nn.Module]) -> type:
    """The class of ``student_class`` converted by ``wrapper``; made once per pair."""
    key = (wrapper, student_class)
    if key not in _classes:
        namespace: dict[str, Any] = {
            "forward": _forward_with_signature(wrapper.forward, student_class.forward),
            "__module__": student_class.__module__,
            "__qualname__": student_class.__qualname__,
            "__doc__": student_class.__doc__,
        }
        bases: tuple[type, ...] = (wrapper, student_class)
        if issubclass(student_class, nn.Sequential):
            bases = (wrapper, _StudentSequence, student_class)
        _classes[key] = type(student_class.__name__, bases, namespace)
    return _classes[key]


def gather_fsdp2(modules: Iterable[nn.Module]) -> None:
    """Undo FSDP2's ``fully_shard`` on ``modules``: whole tensors in place of DTensor shards,
    FSDP's forward hooks and state removed, the class before ``fully_shard`` restored.

    Collective: every rank calls it (``kd.export`` does, for the student). Modules that are not
    sharded are left as they are. Example, a plain model trained under FSDP2::

        gather_fsdp2(model.modules())
    """
    modules = list(modules)
    sharded = [m for m in modules if _is_fsdp2(m)]
    if not sharded:
        return
    from torch.distributed._composable_state import _get_module_state, _module_state_mapping

    for module in sharded:
        module.reshard()  # type: ignore[operator]  # back to DTensor shards if unsharded
    for module in modules:
        for name, tensor in list(module._parameters.items()):
            if tensor is not None and hasattr(tensor, "full_tensor"):
                whole = tensor.full_tensor().detach()
                module._parameters[name] = nn.Parameter(whole, tensor.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and hasattr(buffer, "full_tensor"):
                module._buffers[name] = buffer.full_tensor().detach()
    for module in sharded:
        state: Any = _get_module_state(module)
        if state is not None:
            state._pre_forward_hook_handle.remove()
            state._post_forward_hook_handle.remove()
        _module_state_mapping.pop(module, None)
        module.__class__ = type(module).__bases__[1]  # fully_shard made (FSDPModule, cls)


def _is_fsdp2(module: nn.Module) -> bool:
    return any(cls.__name__ == "FSDPModule" for cls in type(module).__mro__)


def is_distillation_model(model: object) -> TypeGuard[DistillationModel]:
    return isinstance(model, DistillationModel) and "_kd" in model.__dict__
