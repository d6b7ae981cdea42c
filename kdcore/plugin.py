"""The extension surface: what a plugin imports from kdcore, besides :mod:`kdcore` itself and
the public modules :mod:`kdcore.llm` and :mod:`kdcore.validation`.

::

    import kdcore as kd
    from kdcore.plugin import Registry, atomic_write, plan_distillation

kdcore's own plugins (``kdcore_builtins``, ``kdcore-transformers``) and its application layer
(``kdcore.training``) import nothing else, so a third party can do whatever they do; an
import-linter contract (``lint-imports``) keeps it so. What ``kdcore`` exports (the errors, the
configs, ``DistillationLossBalancer``, ``DistillationModel`` and its subclass hooks ``kd_setup``,
``kd_teardown``, ``kd_hidden_children``) is not repeated here.

The names below keep their meaning and signatures within a major version; kdcore's other modules
are internal and may change in any release. This module only re-exports: each name is documented
where it is defined.
"""

from __future__ import annotations

from kdcore._checkpoint import (
    CheckpointBackend,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointReader,
    CheckpointVersionError,
    CheckpointWriteError,
    TensorInfo,
    atomic_write,
    fsync_folder,
    inspect_checkpoint,
    open_regular,
)
from kdcore._config import CriterionEntry, PluginRef, TeacherCall
from kdcore._config_files import read_config_file
from kdcore._converter import instantiate, structure
from kdcore._errors import did_you_mean, shown
from kdcore._hookspecs import hookimpl
from kdcore._model import DistillationState, gather_fsdp2, is_distillation_model
from kdcore._modes import Mode
from kdcore._plan import DistillationPlan, LossPair, describe_distillation, plan_distillation
from kdcore._plugin_manager import PluginWarning
from kdcore._record import ModeRecord, Recordable, record_distillation
from kdcore._references import UntrustedReferenceError, reference_of, resolve, teacher_factory
from kdcore._registry import Provider, Registry
from kdcore._run_logger import RunLogger
from kdcore._strict_json import DuplicateKeyError, no_duplicate_keys
from kdcore._teacher_cache import SparseTeacherOutput, TeacherCache, model_inputs

__all__ = [
    "CheckpointBackend",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointVersionError",
    "CheckpointWriteError",
    "CriterionEntry",
    "DistillationPlan",
    "DistillationState",
    "DuplicateKeyError",
    "LossPair",
    "Mode",
    "ModeRecord",
    "PluginRef",
    "PluginWarning",
    "Provider",
    "Recordable",
    "Registry",
    "RunLogger",
    "SparseTeacherOutput",
    "TeacherCache",
    "TeacherCall",
    "TensorInfo",
    "UntrustedReferenceError",
    "atomic_write",
    "describe_distillation",
    "did_you_mean",
    "fsync_folder",
    "gather_fsdp2",
    "hookimpl",
    "inspect_checkpoint",
    "instantiate",
    "is_distillation_model",
    "model_inputs",
    "no_duplicate_keys",
    "open_regular",
    "plan_distillation",
    "read_config_file",
    "record_distillation",
    "reference_of",
    "resolve",
    "shown",
    "structure",
    "teacher_factory",
]
