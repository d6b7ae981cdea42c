"""The built-in modes: ``kd_loss``, ``layerwise_kd`` and ``export_student``."""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

import kdcore
from kdcore.config import KDLossConfig, LayerwiseKDConfig
from kdcore.errors import ConfigError
from kdcore.model import DistillationModel, is_distillation_model
from kdcore.plan import describe_distillation, plan_distillation
from kdcore.record import record_distillation
from kdcore.registry import Registry
from kdcore_builtins.layerwise import LayerwiseDistillationModel


@attrs.frozen
class DistillationMode:
    """Converts a student into ``model_class`` following a :class:`~kdcore.KDLossConfig`."""

    config_class: type[KDLossConfig]
    model_class: type[DistillationModel]
    whole_model_allowed: bool

    def convert(self, model: nn.Module, config: KDLossConfig, *, path: str) -> nn.Module:
        if is_distillation_model(model):
            raise ConfigError(
                "the model is already a distillation model; kd.export(model) it first", path=path
            )
        plan = plan_distillation(
            model, config, path=path, whole_model_allowed=self.whole_model_allowed
        )
        record = record_distillation(config, plan, path=path)  # warns now, not at save
        distillation_model = self.model_class.convert(model, plan)
        distillation_model._kd.modes.append(record)
        return distillation_model

    def describe(self, config: KDLossConfig, *, path: str, student: nn.Module | None) -> list[str]:
        return describe_distillation(
            config, path=path, whole_model_allowed=self.whole_model_allowed, student=student
        )


class ExportStudentMode:
    """Gives the student back: hooks, teacher and losses removed, its own class restored."""

    config_class = None

    def convert(self, model: nn.Module, config: Any, *, path: str) -> nn.Module:
        if not is_distillation_model(model):
            raise ConfigError(f"{type(model).__name__} is not a distillation model", path=path)
        model._kd_teardown(model._kd.original_class)  # type: ignore[attr-defined]
        return model

    def describe(self, config: Any, *, path: str, student: nn.Module | None) -> list[str]:
        return [f"{path}: give back the student"]


@kdcore.hookimpl
def kdcore_register_modes(registry: Registry[Any]) -> None:
    registry.add("kd_loss", DistillationMode(KDLossConfig, DistillationModel, True))
    registry.add(
        "layerwise_kd", DistillationMode(LayerwiseKDConfig, LayerwiseDistillationModel, False)
    )
    registry.add("export_student", ExportStudentMode())
