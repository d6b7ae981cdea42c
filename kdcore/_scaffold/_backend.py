"""The backend template: human-readable JSON checkpoints, for inspecting tiny models."""

MODULE = '''\
"""kdcore checkpoint backend ``$name``: the whole checkpoint as one JSON document.

Readable in an editor and diffable, for tiny models; never unpickled. The rules a backend keeps:
``detect`` judges by content, ``write`` is atomic, a damaged file is a CheckpointFormatError.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import kdcore
from kdcore.plugin import CheckpointFormatError, Registry, TensorInfo, atomic_write

MAGIC = b'{"kdcore-json": 1'


class ${Name}Backend:
    """Checkpoints as one human-readable JSON document (for tiny models)."""

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        with open(path, "rb") as file:
            return file.read(len(MAGIC)) == MAGIC

    def write(
        self, path: Path, tensors: Mapping[str, torch.Tensor], manifest: str, **options: Any
    ) -> None:
        if options:
            raise TypeError(f"the $name backend takes no options, got {sorted(options)}")
        document = {
            "kdcore-json": 1,
            "manifest": manifest,
            "tensors": {
                name: {
                    "dtype": str(tensor.dtype).removeprefix("torch."),
                    "shape": list(tensor.shape),
                    "data": tensor.detach().cpu().flatten().tolist(),
                }
                for name, tensor in tensors.items()
            },
        }
        with atomic_write(path) as file:  # a crash leaves the previous checkpoint intact
            file.write(json.dumps(document).encode())

    def open(self, path: Path) -> ${Name}Reader:
        return ${Name}Reader(path)


class ${Name}Reader:
    def __init__(self, path: Path) -> None:
        try:
            document = json.loads(path.read_text())
            self.manifest = document["manifest"]
            self._entries = document["tensors"]
            self.tensors = {
                name: TensorInfo(_dtype(entry["dtype"], path), tuple(entry["shape"]))
                for name, entry in self._entries.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointFormatError(path, f"is not a $name checkpoint ({exc!r})") from None

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        info, entry = self.tensors[name], self._entries[name]
        tensor = torch.tensor(entry["data"], dtype=info.dtype).reshape(info.shape)
        if out is None:
            return tensor
        return out.copy_(tensor)

    def close(self) -> None:
        pass


def _dtype(name: str, path: Path) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointFormatError(path, f"unknown dtype {name!r}")
    return dtype


@kdcore.hookimpl
def kdcore_register_checkpoint_backends(registry: Registry[Any]) -> None:
    registry.add("$name", ${Name}Backend())
'''

TESTS = """\
from kdcore.testing import check_backend


def test_${name}_keeps_the_contracts_of_kdcores_backends(kd_plugin_host):
    check_backend("$name")
"""

USAGE = """\
Save with it by name, `kd.save(model, "run.json", backend="$name")`; `kd.restore` finds it by
the file's content.
"""
