"""The contract between kdcore and a checkpoint backend: what a backend plugin registers, what
an open checkpoint offers, and the errors either raises. Public through :mod:`kdcore._checkpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch

from kdcore._errors import KDCoreError


class CheckpointError(KDCoreError, ValueError):
    """A checkpoint cannot be restored; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class CheckpointFormatError(CheckpointError):
    """The file is damaged, truncated, or not a kdcore checkpoint at all."""


class CheckpointVersionError(CheckpointError):
    """The checkpoint was written in a newer format than this kdcore reads."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model (missing, unexpected or of another shape)."""


class CheckpointWriteError(KDCoreError, OSError):
    """Writing a checkpoint failed; whatever was at the path before is still there."""


@attrs.frozen
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]


class CheckpointReader(Protocol):
    """An open checkpoint: its manifest and its tensors, read on demand."""

    manifest: str
    tensors: Mapping[str, TensorInfo]

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``; read into ``out`` when given (same dtype and shape)."""
        ...

    def close(self) -> None: ...


class CheckpointBackend(Protocol):
    """What a checkpoint-backend plugin registers."""

    def detect(self, path: Path) -> bool:
        """Whether ``path`` holds this backend's format, judged by content, not by name."""
        ...

    def write(
        self, path: Path, tensors: Mapping[str, torch.Tensor], manifest: str, **options: Any
    ) -> None:
        """Write atomically: a crash leaves the previous checkpoint at ``path`` intact."""
        ...

    def open(self, path: Path) -> CheckpointReader:
        """Open for reading; raise :class:`CheckpointFormatError` for a damaged file."""
        ...


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Nothing at the path."""


def dtype_kind(dtype: torch.dtype) -> str:
    """Precision may differ between a file and a model (loading casts); the kind may not."""
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating point"
    return "bool" if dtype == torch.bool else "integer"
