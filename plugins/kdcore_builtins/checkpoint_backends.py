"""The built-in checkpoint backend: ``safetensors``, one file with the manifest in its metadata."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import kdcore
from kdcore.plugin import CheckpointFormatError, CheckpointNotFoundError, Registry, atomic_write
from kdcore_builtins import safetensors_format
from kdcore_builtins.dcp_backend import DcpBackend
from kdcore_builtins.sharded_safetensors import ShardedSafetensorsBackend

MANIFEST_KEY = "kdcore"


class SafetensorsBackend:
    """One ``.safetensors`` file; Hugging Face's loaders read its tensors as they are."""

    def detect(self, path: Path) -> bool:
        return safetensors_format.looks_like_safetensors(path)

    def write(
        self, path: Path, tensors: Mapping[str, torch.Tensor], manifest: str, **options: Any
    ) -> None:
        if options:
            raise TypeError(f"the safetensors backend takes no options, got {sorted(options)}")
        # "format": "pt" is what Hugging Face's loaders expect of a PyTorch safetensors file.
        metadata = {"format": "pt", MANIFEST_KEY: manifest}
        with atomic_write(path) as file:
            safetensors_format.write(file, tensors, metadata)

    def open(self, path: Path) -> SafetensorsCheckpoint:
        try:
            return SafetensorsCheckpoint(path)
        except FileNotFoundError:  # removed since detect() saw it
            raise CheckpointNotFoundError(path, "no such file or folder") from None


class SafetensorsCheckpoint(safetensors_format.SafetensorsFile):
    @property
    def manifest(self) -> str:
        if MANIFEST_KEY not in self.metadata:
            raise CheckpointFormatError(
                self.path,
                "is a safetensors file without a kdcore manifest (not written by kd.save)",
            )
        return self.metadata[MANIFEST_KEY]


@kdcore.hookimpl
def kdcore_register_checkpoint_backends(registry: Registry[Any]) -> None:
    registry.add("safetensors", SafetensorsBackend())
    registry.add("safetensors-sharded", ShardedSafetensorsBackend())
    registry.add("torch-dcp", DcpBackend())
