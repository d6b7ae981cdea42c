"""The ``safetensors-sharded`` checkpoint backend, which writes the Hugging Face layout::

    folder/model.safetensors.index.json        {"metadata": {"total_size": N, "kdcore": manifest},
                                                 "weight_map": {tensor name: shard file name}}
    folder/model-00001-of-00003.safetensors    safetensors, metadata {"format": "pt"}
    ...

so ``transformers``' sharded loading reads an exported student as it is. A save never touches
the files the current index names: shards get fresh names (the canonical ones when free, else the
canonical name plus a per-save id), each is written through :func:`atomic_write` (temporary file,
fsync, rename), then the index is replaced atomically, and only then are the shards no index
names any more deleted. A crash at any point leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from kdcore.plugin import CheckpointFormatError, TensorInfo, atomic_write, fsync_folder
from kdcore_builtins import safetensors_format
from kdcore_builtins.checkpoint_folders import (
    DCP_MARKER,
    INDEX_NAME,
    dcp_is_newer,
    index_files,
    open_consistently,
    peek_json,
    plain_name,
    prepare_folder,
    read_json,
    remove_dcp_checkpoint,
    remove_quietly,
    remove_sharded_checkpoint,
    save_lock,
    write_failed,
)

MANIFEST_KEY = "kdcore"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # what transformers' save_pretrained uses


def parse_size(value: object) -> int:
    """Bytes from an int or a string like ``"500MB"``, ``"2GB"``, ``"1.5GiB"``."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    size: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).upper() in units:
            size = float(match.group(1)) * units[match.group(2).upper()]
    if size is None or size < 1 or not math.isfinite(size):
        raise ValueError(
            f"max_shard_size must be a positive number of bytes or a size such as '500MB' or "
            f"'2GB' (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {value!r}"
        )
    return int(size)


# ================================================================== safetensors-sharded
class ShardedSafetensorsBackend:
    """A folder of safetensors shards and a Hugging Face ``model.safetensors.index.json``."""

    name = "safetensors-sharded"

    def detect(self, path: Path) -> bool:
        if path.is_dir():  # a folder with an index, whatever it holds: open() says what is wrong
            return (path / INDEX_NAME).exists() and not dcp_is_newer(path)
        content = peek_json(path)  # the index file itself
        return isinstance(content, dict) and isinstance(content.get("weight_map"), dict)

    def write(
        self, path: Path, tensors: Mapping[str, torch.Tensor], manifest: str, **options: Any
    ) -> None:
        max_shard_size = parse_size(options.pop("max_shard_size", DEFAULT_MAX_SHARD_SIZE))
        if options:
            raise TypeError(
                f"the {self.name} backend takes only max_shard_size, got {sorted(options)}"
            )
        folder = prepare_folder(path, self.name)
        with save_lock(folder):
            self._write(folder, tensors, manifest, max_shard_size)

    def _write(
        self, folder: Path, tensors: Mapping[str, torch.Tensor], manifest: str, max_shard_size: int
    ) -> None:
        previous = index_files(folder / INDEX_NAME)
        groups = plan_shards(tensors, max_shard_size)
        names = _shard_names(folder, len(groups))
        weight_map: dict[str, str] = {}
        written: list[Path] = []
        try:
            for name, group in zip(names, groups, strict=True):
                with atomic_write(folder / name) as file:
                    written.append(folder / name)
                    safetensors_format.write(
                        file, {key: tensors[key] for key in group}, {"format": "pt"}
                    )
                weight_map.update(dict.fromkeys(group, name))
            index = {
                "metadata": {
                    "total_size": sum(_nbytes(tensor) for tensor in tensors.values()),
                    MANIFEST_KEY: manifest,
                },
                "weight_map": dict(sorted(weight_map.items())),
            }
            with atomic_write(folder / INDEX_NAME) as file:
                file.write(json.dumps(index, indent=2).encode())
        except BaseException as exc:
            for shard in written:
                with contextlib.suppress(FileNotFoundError):
                    shard.unlink()
            fsync_folder(folder)
            if isinstance(exc, OSError):  # CheckpointWriteError from atomic_write included
                raise write_failed(folder, exc) from exc
            raise
        # Committed: the index names the new shards. Now drop what nothing names any more.
        remove_sharded_checkpoint(folder, previous, keep=frozenset(names))
        remove_quietly(folder / DCP_MARKER)  # a folder holds one checkpoint: the newest
        remove_dcp_checkpoint(folder)

    def open(self, path: Path) -> ShardedSafetensorsCheckpoint:
        index = path / INDEX_NAME if path.is_dir() else path
        return open_consistently(index, lambda file: ShardedSafetensorsCheckpoint(index, file))


def plan_shards(tensors: Mapping[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Tensor names per shard, in order; a shard grows until the next tensor would overflow it
    (a tensor larger than ``max_shard_size`` gets a shard of its own)."""
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, tensor in tensors.items():
        nbytes = _nbytes(tensor)
        if current and size + nbytes > max_shard_size:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        groups.append(current)
    return groups


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _shard_names(folder: Path, count: int) -> list[str]:
    """The canonical ``model-0000i-of-0000N.safetensors`` names if no file has them yet; else
    the same names with a fresh save id, so that no file the current index names is touched."""
    canonical = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    if not any((folder / name).exists() for name in canonical):
        return canonical
    save_id = uuid.uuid4().hex[:12]
    return [name.replace(".safetensors", f"-{save_id}.safetensors") for name in canonical]


class ShardedSafetensorsCheckpoint:
    """An open sharded checkpoint: the index checked, every shard's header checked against it.

    ``file`` is the index, open; each shard is opened once, here (see :func:`open_consistently`).
    """

    def __init__(self, index: Path, file: IO[bytes]) -> None:
        self.path = index
        self.folder = index.parent
        content = read_json(index, "index", file)
        if not isinstance(content, dict):
            raise self._fail("the index is not a JSON object")
        metadata = content.get("metadata", {})
        if not isinstance(metadata, dict):
            raise self._fail("index 'metadata' must be a JSON object")
        self.metadata = metadata
        weight_map = content.get("weight_map")
        if not isinstance(weight_map, dict):
            raise self._fail("the index has no 'weight_map' object")
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise self._fail(f"weight_map entry for tensor {name!r} is not a file name")
            if not plain_name(shard):
                raise self._fail(
                    f"weight_map puts tensor {name!r} in {shard!r}, which is not a file in the "
                    "checkpoint folder (paths outside the folder are refused)"
                )
        self._shards: dict[str, safetensors_format.SafetensorsFile] = {}
        try:
            for shard in dict.fromkeys(weight_map.values()):
                self._shards[shard] = self._open_shard(shard, weight_map)
            self._check(weight_map, metadata)
        except BaseException:
            self.close()
            raise
        self._where = {name: self._shards[shard] for name, shard in weight_map.items()}

    def _fail(self, problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(self.path, problem)

    def _open_shard(self, shard: str, weight_map: dict[str, str]) -> Any:
        try:
            return safetensors_format.SafetensorsFile(self.folder / shard)
        except FileNotFoundError:
            first = next(name for name, file in weight_map.items() if file == shard)
            raise self._fail(
                f"weight_map puts tensor {first!r} in shard {shard!r}, which does not exist"
            ) from None

    @property
    def files(self) -> list[Path]:
        """The files read, for kdcore inspect."""
        return [self.path, *(file.path for file in self._shards.values())]

    def _check(self, weight_map: dict[str, str], metadata: dict[str, Any]) -> None:
        for name, shard in weight_map.items():
            if name not in self._shards[shard].entries:
                raise self._fail(f"weight_map puts tensor {name!r} in {shard!r}, which lacks it")
        holder: dict[str, str] = {}
        for shard, file in self._shards.items():
            for name in file.entries:
                if name in holder:
                    raise self._fail(
                        f"tensor {name!r} is stored twice, in {holder[name]!r} and {shard!r}"
                    )
                holder[name] = shard
        for shard, file in self._shards.items():
            for name in file.entries:
                if weight_map.get(name) != shard:
                    raise self._fail(
                        f"shard {shard!r} holds tensor {name!r}, which the weight_map does not "
                        "list for it"
                    )
        total = metadata.get("total_size")
        if total is not None:
            actual = sum(
                end - begin for f in self._shards.values() for *_, begin, end in f.entries.values()
            )
            if isinstance(total, bool) or not isinstance(total, int) or total != actual:
                raise self._fail(
                    f"index total_size {total!r} does not match the {actual} bytes of its shards"
                )

    @property
    def manifest(self) -> str:
        manifest = self.metadata.get(MANIFEST_KEY)
        if not isinstance(manifest, str):
            raise self._fail(
                "is a safetensors index without a kdcore manifest (not written by kd.save)"
            )
        return manifest

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {
            name: TensorInfo(dtype, shape)
            for name, file in self._where.items()
            for dtype, shape, _, _ in [file.entries[name]]
        }

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._where[name].load(name, out)  # type: ignore[no-any-return]

    def close(self) -> None:
        for file in self._shards.values():
            file.close()
