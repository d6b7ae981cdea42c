"""The core's modes, ``kd_loss``, ``layerwise_kd`` and ``export_student``: a plugin that the
plugin host always registers, through the same hook and public names a third-party mode uses."""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from kdcore._config import KDLossConfig, LayerwiseKDConfig
from kdcore._errors import ConfigError
from kdcore._hookspecs import hookimpl
from kdcore._layerwise import LayerwiseDistillationModel
from kdcore._model import DistillationModel
from kdcore._plan import describe_distillation, plan_distillation
from kdcore._record import record_distillation
from kdcore._registry import Registry


@attrs.frozen
class DistillationMode:
    """Converts a student into ``model_class`` following a :class:`~kdcore.KDLossConfig`."""

    config_class: type[KDLossConfig]
    model_class: type[DistillationModel]
    whole_model_allowed: bool

    def convert(self, model: nn.Module, config: KDLossConfig, *, path: str) -> nn.Module:
        if isinstance(model, DistillationModel):
            raise ConfigError(
                "the model is already a distillation model; kd.export(model) it first", path=path
            )
        plan = plan_distillation(
            model, config, path=path, whole_model_allowed=self.whole_model_allowed
        )
        return self.model_class.convert(model, plan, record_distillation(config, plan, path=path))

    def describe(self, config: KDLossConfig, *, path: str, student: nn.Module | None) -> list[str]:
        return describe_distillation(
            config, path=path, whole_model_allowed=self.whole_model_allowed, student=student
        )


class ExportStudentMode:
    """Gives the student back (``kd.export`` without unwrapping): see
    :meth:`~kdcore.DistillationModel.export_student`."""

    config_class = None

    def convert(self, model: nn.Module, config: Any, *, path: str) -> nn.Module:
        if not isinstance(model, DistillationModel):
            raise ConfigError(f"{type(model).__name__} is not a distillation model", path=path)
        return model.export_student()

    def describe(self, config: Any, *, path: str, student: nn.Module | None) -> list[str]:
        return [f"{path}: give back the student"]


@hookimpl
def kdcore_register_modes(registry: Registry[Any]) -> None:
    registry.add("kd_loss", DistillationMode(KDLossConfig, DistillationModel, True))
    registry.add(
        "layerwise_kd", DistillationMode(LayerwiseKDConfig, LayerwiseDistillationModel, False)
    )
    registry.add("export_student", ExportStudentMode())
