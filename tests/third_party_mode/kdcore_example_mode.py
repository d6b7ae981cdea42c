"""An example third-party mode: ``example_kd``, a copy of kdcore's ``kd_loss`` made from the
names a plugin may use (``kdcore`` and :mod:`kdcore.plugin`).

``kd.convert(student, [("example_kd", {"teacher_model": teacher, "criterion": ...})])`` then
distils exactly as ``kd_loss`` does; ``kd.save`` records it and ``kd.restore`` rebuilds it by name.
"""

from __future__ import annotations

from typing import Any

from torch import nn

import kdcore as kd
from kdcore.plugin import describe_distillation, plan_distillation, record_distillation


class ExampleKDMode:
    config_class = kd.KDLossConfig

    def convert(self, model: nn.Module, config: kd.KDLossConfig, *, path: str) -> nn.Module:
        if isinstance(model, kd.DistillationModel):
            raise kd.ConfigError(
                "the model is already a distillation model; kd.export(model) it first", path=path
            )
        plan = plan_distillation(model, config, path=path)  # checks everything, changes nothing
        record = record_distillation(config, plan, path=path)  # what kd.save will write
        return kd.DistillationModel.convert(model, plan, record)

    def describe(
        self, config: kd.KDLossConfig, *, path: str, student: nn.Module | None
    ) -> list[str]:
        return describe_distillation(config, path=path, student=student)


@kd.hookimpl
def kdcore_register_modes(registry: Any) -> None:
    registry.add("example_kd", ExampleKDMode())
