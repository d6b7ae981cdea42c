"""kdcore: knowledge distillation for PyTorch on a small plugin core.

::

    import kdcore as kd

    model = kd.convert(student, [("kd_loss", {"teacher_model": teacher,
                                              "criterion": kd.LogitsDistillationLoss()})])
    loss = model.compute_kd_loss()
    student = kd.export(model)

Criteria, balancers, teacher loaders and checkpoint backends are plugins; the classes below that
name one (``kd.LogitsDistillationLoss``...) are looked up in the registries on first access, so
``import kdcore`` loads no plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdcore._balancer import DistillationLossBalancer, StudentLossWeightWarning
from kdcore._checkpoint import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointVersionError,
    CheckpointWriteError,
    restore,
    save,
)
from kdcore._config import KDLossConfig, LayerwiseKDConfig
from kdcore._config_files import load_config
from kdcore._errors import (
    ConfigError,
    ConfigTypeError,
    CriterionError,
    DistillationStateError,
    KDCoreError,
    PluginConflictError,
    PluginError,
    UnknownLayerError,
    UnknownNameError,
    UnknownPluginError,
)
from kdcore._hookspecs import hookimpl
from kdcore._layerwise import LayerwiseDistillationModel
from kdcore._model import DistillationModel, DuplicateCaptureWarning
from kdcore._modes import NotADistillationModelWarning, check, convert, export
from kdcore._plugin_manager import PluginHost, PluginWarning, registries, use_host
from kdcore._record import NotRecordableWarning
from kdcore._references import UntrustedReferenceError, teacher_factory
from kdcore._teacher_cache import TeacherCacheError, cache_teacher

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the registries answer
    from kdcore_builtins.balancers import StaticLossBalancer
    from kdcore_builtins.criteria import LogitsDistillationLoss, MFTLoss, MGDLoss, MSELoss

# Public names provided by the built-in plugins: (registry, registered name).
_PLUGIN_PROVIDED = {
    "LogitsDistillationLoss": ("criteria", "logits"),
    "MFTLoss": ("criteria", "mft"),
    "MGDLoss": ("criteria", "mgd"),
    "MSELoss": ("criteria", "mse"),
    "StaticLossBalancer": ("balancers", "static"),
}


def __getattr__(name: str) -> Any:
    if name not in _PLUGIN_PROVIDED:
        raise AttributeError(f"module 'kdcore' has no attribute {name!r}")
    registry_name, registered = _PLUGIN_PROVIDED[name]
    try:
        return getattr(registries(), registry_name).get(registered)
    except KDCoreError as exc:  # hasattr() and getattr(kd, name, default) expect AttributeError
        raise AttributeError(f"kdcore.{name} is not available: {exc}") from exc


def __dir__() -> list[str]:
    return sorted([*globals(), *_PLUGIN_PROVIDED])


__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "CheckpointVersionError",
    "CheckpointWriteError",
    "ConfigError",
    "ConfigTypeError",
    "CriterionError",
    "DistillationLossBalancer",
    "DistillationModel",
    "DistillationStateError",
    "DuplicateCaptureWarning",
    "KDCoreError",
    "KDLossConfig",
    "LayerwiseDistillationModel",
    "LayerwiseKDConfig",
    "LogitsDistillationLoss",
    "MFTLoss",
    "MGDLoss",
    "MSELoss",
    "NotADistillationModelWarning",
    "NotRecordableWarning",
    "PluginConflictError",
    "PluginError",
    "PluginHost",
    "PluginWarning",
    "StaticLossBalancer",
    "StudentLossWeightWarning",
    "TeacherCacheError",
    "UnknownLayerError",
    "UnknownNameError",
    "UnknownPluginError",
    "UntrustedReferenceError",
    "__version__",
    "cache_teacher",
    "check",
    "convert",
    "export",
    "hookimpl",
    "load_config",
    "registries",
    "restore",
    "save",
    "teacher_factory",
    "use_host",
]
