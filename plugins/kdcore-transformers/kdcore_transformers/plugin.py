"""The module the ``kdcore`` entry point names: it registers, and imports no transformers code
(``import transformers`` waits until a teacher is loaded), so ``kdcore plugins`` stays fast."""

from __future__ import annotations

from typing import Any

import kdcore
from kdcore.plugin import Registry
from kdcore_transformers.teacher_loader import load_transformers_teacher


@kdcore.hookimpl
def kdcore_register_teacher_loaders(registry: Registry[Any]) -> None:
    registry.add("transformers", load_transformers_teacher)
