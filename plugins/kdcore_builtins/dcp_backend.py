"""The ``torch-dcp`` checkpoint backend.

``torch-dcp`` writes with :func:`torch.distributed.checkpoint.save` (``FileSystemWriter``), so
every rank of an FSDP2 job writes its own shards::

    folder/kdcore-dcp.json          {"format": "kdcore.torch-dcp", "format_version": 1,
                                     "checkpoint": "dcp-<save id>", "manifest": manifest}
    folder/dcp-<save id>/.metadata  DCP's metadata (a pickle)
    folder/dcp-<save id>/__0_0.distcp ...

Each save goes to a fresh ``dcp-<save id>`` folder (a plain DCP checkpoint that ``dcp.load``
reads); ``kdcore-dcp.json`` is replaced atomically last, so it always names a complete checkpoint,
and older ``dcp-*`` folders are removed after that. In a multi-process job every rank calls
``kd.save``; rank 0 creates the folder, picks the save id (broadcast as a tensor), writes the
marker and cleans up, and no rank returns before the marker is written. (torch's multi-rank
``dcp.save`` gathers plans with ``gather_object``, which needs NumPy; one process does not.)

Reading DCP never unpickles. DCP's ``.metadata`` is a pickle that torch itself loads with plain
``pickle.load`` (arbitrary code runs on load), and each tensor in a ``.distcp`` file is a
``torch.save`` zip archive whose ``data.pkl`` is a pickle too. kdcore reads both with
:mod:`kdcore_builtins.restricted_pickle`, which walks the pickle's opcodes and builds an inert
description of what it would construct: it never imports a module, never looks up a global, never
calls anything and never instantiates a class; a reference to any global outside a short
allow-list of DCP's own metadata classes (or torch's tensor-rebuild functions, for ``data.pkl``)
is refused on sight. The description is then checked field by field
(:mod:`kdcore_builtins.dcp_metadata`), and tensor bytes are read straight from the zip records
whose offsets the checks established.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import uuid
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import attrs
import torch

from kdcore.plugin import (
    CheckpointError,
    CheckpointFormatError,
    TensorInfo,
    atomic_write,
    fsync_folder,
    open_regular,
)
from kdcore_builtins import safetensors_format
from kdcore_builtins.checkpoint_folders import (
    DCP_MARKER,
    INDEX_NAME,
    index_files,
    open_consistently,
    plain_name,
    prepare_folder,
    read_json,
    remove_dcp_checkpoint,
    remove_quietly,
    remove_sharded_checkpoint,
    save_lock,
    write_failed,
)
from kdcore_builtins.dcp_metadata import (
    METADATA_GLOBALS,
    TENSOR_GLOBALS,
    Chunk,
    DcpTensor,
    ShapeError,
    dcp_entries,
    element_count,
    rebuilt_tensor,
)
from kdcore_builtins.restricted_pickle import PickleRefusedError, evaluate_pickle

DCP_FORMAT = "kdcore.torch-dcp"
DCP_FORMAT_VERSION = 1
DCP_METADATA = ".metadata"
MAX_DCP_METADATA_BYTES = 1024 * 1024 * 1024
MAX_DATA_PKL_BYTES = 1024 * 1024


# ============================================================================ torch-dcp
class DcpBackend:
    """``torch.distributed.checkpoint`` on disk, read back without unpickling."""

    name = "torch-dcp"

    def detect(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        if (path / DCP_MARKER).exists():  # kdcore's own marker, damaged or not: open() checks it
            return True
        metadata = path / DCP_METADATA  # a bare DCP checkpoint: open() says what it lacks
        with contextlib.suppress(OSError, CheckpointError), open_regular(metadata) as file:
            return file.read(1) == b"\x80"
        return False

    def write(
        self, path: Path, tensors: Mapping[str, torch.Tensor], manifest: str, **options: Any
    ) -> None:
        if options:
            raise TypeError(f"the {self.name} backend takes no options, got {sorted(options)}")
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        coordinator = not distributed or dist.get_rank() == 0
        folder = prepare_folder(path, self.name) if coordinator else path
        # Rank 0 removes older checkpoints: it holds the folder's save lock for the whole save.
        with save_lock(folder) if coordinator else contextlib.nullcontext():
            self._write(folder, tensors, manifest, distributed, coordinator)

    def _write(
        self,
        folder: Path,
        tensors: Mapping[str, torch.Tensor],
        manifest: str,
        distributed: bool,
        coordinator: bool,
    ) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        save_id = uuid.uuid4().hex[:12]
        if distributed:
            save_id = _broadcast_save_id(save_id)
            dist.barrier()  # the folder exists before any rank writes into it
        subfolder = f"dcp-{save_id}"
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", "torch.distributed is disabled", category=UserWarning
                )
                dcp.save(
                    dict(tensors),
                    storage_writer=dcp.FileSystemWriter(folder / subfolder, sync_files=True),
                    no_dist=not distributed,
                )
            if coordinator:
                fsync_folder(folder / subfolder)
                marker = {
                    "format": DCP_FORMAT,
                    "format_version": DCP_FORMAT_VERSION,
                    "checkpoint": subfolder,
                    "manifest": manifest,
                }
                with atomic_write(folder / DCP_MARKER) as file:
                    file.write(json.dumps(marker, indent=2).encode())
        except BaseException as exc:
            if coordinator:
                remove_quietly(folder / subfolder)
                fsync_folder(folder)
            if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            raise write_failed(folder, exc) from exc  # DCP raises CheckpointException
        if coordinator:  # committed: the marker names the new checkpoint
            remove_dcp_checkpoint(folder, keep=subfolder)
            previous = index_files(folder / INDEX_NAME)
            with contextlib.suppress(OSError):
                (folder / INDEX_NAME).unlink()  # a folder holds one checkpoint: the newest
            remove_sharded_checkpoint(folder, previous)
        if distributed:
            dist.barrier()  # no rank returns before the checkpoint is complete

    def open(self, path: Path) -> DcpCheckpoint:
        if not (path / DCP_MARKER).exists():  # a bare DCP checkpoint, which no save changes
            return DcpCheckpoint(path, None)
        return open_consistently(path / DCP_MARKER, lambda file: DcpCheckpoint(path, file))


def _broadcast_save_id(save_id: str) -> str:
    """Rank 0's save id on every rank (a tensor broadcast: no pickle, no NumPy)."""
    import torch.distributed as dist

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    buffer = torch.tensor(list(save_id.encode()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist()).decode()


class DcpCheckpoint:
    """An open DCP checkpoint: its metadata read without unpickling and checked in full.

    ``marker`` is kdcore's marker, open (None for a bare DCP checkpoint); the metadata and every
    data file are opened once, here (see :func:`open_consistently`).
    """

    def __init__(self, folder: Path, marker_file: IO[bytes] | None) -> None:
        self.path = folder
        self._manifest: str | None = None
        self._files: dict[str, IO[bytes]] = {}
        marker_path = folder / DCP_MARKER
        if marker_file is not None:
            marker = read_json(marker_path, "kdcore-dcp marker", marker_file)
            checkpoint = marker.get("checkpoint") if isinstance(marker, dict) else None
            if not isinstance(marker, dict) or marker.get("format") != DCP_FORMAT:
                raise CheckpointFormatError(marker_path, f"is not a {DCP_FORMAT} marker")
            version = marker.get("format_version")
            if version != DCP_FORMAT_VERSION:
                raise CheckpointFormatError(
                    marker_path, f"format_version {version!r} is not {DCP_FORMAT_VERSION}"
                )
            if not plain_name(checkpoint):
                raise CheckpointFormatError(
                    marker_path,
                    f"names checkpoint folder {checkpoint!r}, which is not a folder inside "
                    f"{folder} (paths outside the folder are refused)",
                )
            if not isinstance(marker.get("manifest"), str):
                raise CheckpointFormatError(marker_path, "'manifest' must be a string")
            self._manifest = marker["manifest"]
            self.checkpoint = folder / checkpoint
            if not self.checkpoint.is_dir():
                raise CheckpointFormatError(
                    marker_path, f"names checkpoint folder {checkpoint!r}, which does not exist"
                )
        else:
            self.checkpoint = folder
        self.metadata_path = self.checkpoint / DCP_METADATA
        try:  # every tensor record is checked now, before restore changes the model
            self._entries = self._read_metadata()
            self._records = {
                (name, chunk): self._record(name, entry, chunk)
                for name, entry in self._entries.items()
                for chunk in entry.chunks
            }
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- metadata
    def _fail(self, problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(self.metadata_path, problem)

    def _read_metadata(self) -> dict[str, DcpTensor]:
        try:
            file = open_regular(self.metadata_path)
        except FileNotFoundError:
            raise CheckpointFormatError(self.metadata_path, "does not exist") from None
        with file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_DCP_METADATA_BYTES:
                raise self._fail(f"is {size} bytes, more than {MAX_DCP_METADATA_BYTES}")
            data = file.read(size)
        try:
            value = evaluate_pickle(data, METADATA_GLOBALS)
        except PickleRefusedError as exc:
            raise self._fail(f"{exc}; refused without running anything") from None
        try:
            entries = dcp_entries(value)
        except ShapeError as exc:
            raise self._fail(f"is not DCP metadata kdcore reads: {exc}") from None
        for name, entry in entries.items():
            for chunk in entry.chunks:
                self._check_chunk_file(name, chunk)
        return entries

    def _check_chunk_file(self, name: str, chunk: Chunk) -> None:
        if not plain_name(chunk.file):
            raise self._fail(
                f"tensor {name!r} is stored in {chunk.file!r}, which is not a file in the "
                "checkpoint folder (paths outside the folder are refused)"
            )
        path = self.checkpoint / chunk.file
        try:
            file = self._file(chunk.file)
        except FileNotFoundError:
            raise self._fail(
                f"tensor {name!r} is stored in {chunk.file!r}, which does not exist"
            ) from None
        size = os.fstat(file.fileno()).st_size  # of the file opened, which later reads use
        if chunk.offset + chunk.length > size:
            raise CheckpointFormatError(
                path,
                f"tensor {name!r} is stored at bytes {chunk.offset}..{chunk.offset + chunk.length}"
                f" but the file holds {size}: truncated",
            )

    @property
    def manifest(self) -> str:
        if self._manifest is None:
            raise CheckpointFormatError(
                self.path,
                "is a torch.distributed.checkpoint folder without a kdcore manifest "
                f"({DCP_MARKER}; not written by kd.save)",
            )
        return self._manifest

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {name: TensorInfo(entry.dtype, entry.shape) for name, entry in self._entries.items()}

    # -------------------------------------------------------------- tensors
    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        entry = self._entries[name]
        local, box = _local_target(out, entry)
        fits = (
            local is not None
            and local.dtype == entry.dtype
            and tuple(local.shape) == box[1]
            and local.device.type == "cpu"
            and local.is_contiguous()
        )
        target = local if local is not None and fits else torch.empty(box[1], dtype=entry.dtype)
        for chunk in entry.chunks:
            self._read_chunk(name, entry, chunk, target, box)
        if local is not None and not fits:
            local.copy_(target)
        return out if out is not None else target

    def _read_chunk(
        self,
        name: str,
        entry: DcpTensor,
        chunk: Chunk,
        target: torch.Tensor,
        box: tuple[tuple[int, ...], tuple[int, ...]],
    ) -> None:
        # The part of the chunk that falls into the target box, in both coordinate systems.
        starts = [max(c, b) for c, b in zip(chunk.offsets, box[0], strict=True)]
        ends = [
            min(c + s, b + t)
            for c, s, b, t in zip(chunk.offsets, chunk.sizes, box[0], box[1], strict=True)
        ]
        if element_count(box[1]) == 0 or any(s >= e for s, e in zip(starts, ends, strict=True)):
            return  # nothing of this chunk is wanted here
        record = self._records[(name, chunk)]
        whole = chunk.offsets == box[0] and chunk.sizes == box[1]
        if whole and record.contiguous:
            record.read_into(target)  # one copy, straight into the parameter
            return
        data = record.read()
        source = data[_window(starts, ends, chunk.offsets)]
        target[_window(starts, ends, box[0])].copy_(source)

    def _record(self, name: str, entry: DcpTensor, chunk: Chunk) -> _TensorRecord:
        path = self.checkpoint / chunk.file
        record = _TensorRecord.find(self._file(chunk.file), path, chunk, name)
        if record.dtype != entry.dtype or record.size != chunk.sizes:
            raise CheckpointFormatError(
                path,
                f"tensor {name!r}: the stored chunk is {record.dtype} of shape "
                f"{list(record.size)}, the metadata says {entry.dtype} of {list(chunk.sizes)}",
            )
        return record

    def _file(self, name: str) -> IO[bytes]:
        if name not in self._files:
            self._files[name] = open_regular(self.checkpoint / name)
        return self._files[name]

    @property
    def files(self) -> list[Path]:
        """The files read, for kdcore inspect."""
        marker = [self.path / DCP_MARKER] if self._manifest is not None else []
        return [*marker, self.metadata_path, *(self.checkpoint / name for name in self._files)]

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


def _local_target(
    out: torch.Tensor | None, entry: DcpTensor
) -> tuple[torch.Tensor | None, tuple[tuple[int, ...], tuple[int, ...]]]:
    """What ``load`` fills: the whole tensor, or a DTensor's local shard and where it sits."""
    full = ((0,) * len(entry.shape), entry.shape)
    if out is None:
        return None, full
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return out, full
    if not isinstance(out, DTensor):
        return out, full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(
        out.shape, out.device_mesh, out.placements
    )
    return out.to_local(), (tuple(offsets), tuple(shape))


class _FileSlice:
    """A read-only, seekable window onto ``file`` (what ``zipfile`` needs)."""

    def __init__(self, file: IO[bytes], start: int, length: int) -> None:
        self._file, self._start, self._length, self._position = file, start, length, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._length}[whence]
        self._position = min(max(base + offset, 0), self._length)
        return self._position

    def read(self, size: int = -1) -> bytes:
        remaining = self._length - self._position
        size = remaining if size is None or size < 0 else min(size, remaining)
        self._file.seek(self._start + self._position)
        data = self._file.read(size)
        self._position += len(data)
        return data


@attrs.frozen
class _TensorRecord:
    """One ``torch.save`` archive inside a ``.distcp`` file, described without unpickling."""

    file: IO[bytes]
    path: Path
    data_start: int  # absolute file offset of the storage bytes
    storage_numel: int  # in elements of dtype
    dtype: torch.dtype
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def contiguous(self) -> bool:
        return (
            self.storage_offset == 0
            and self.storage_numel == element_count(self.size)
            and self.stride == _contiguous_stride(self.size)
        )

    @classmethod
    def find(cls, file: IO[bytes], path: Path, chunk: Chunk, name: str) -> _TensorRecord:
        def fail(problem: str) -> CheckpointFormatError:
            return CheckpointFormatError(
                path,
                f"tensor {name!r} (bytes {chunk.offset}..{chunk.offset + chunk.length}): {problem}",
            )

        window = _FileSlice(file, chunk.offset, chunk.length)
        try:
            archive = zipfile.ZipFile(window)  # type: ignore[arg-type]
            infos = {info.filename: info for info in archive.infolist()}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise fail(f"is not a torch.save archive ({exc})") from None
        pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise fail("is not a torch.save archive (no single <archive>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = infos.get(prefix + "byteorder")
        if byteorder is None or cls._read_small(archive, byteorder, fail) != b"little":
            raise fail("was not written little-endian")
        data_pkl = infos[pickles[0]]
        if data_pkl.file_size > MAX_DATA_PKL_BYTES:
            raise fail(f"data.pkl is {data_pkl.file_size} bytes, more than {MAX_DATA_PKL_BYTES}")
        try:
            value = evaluate_pickle(
                cls._read_small(archive, data_pkl, fail), TENSOR_GLOBALS, persistent=True
            )
            rebuilt = rebuilt_tensor(value)
        except PickleRefusedError as exc:
            raise fail(f"data.pkl {exc}; refused without running anything") from None
        except ShapeError as exc:
            raise fail(f"data.pkl is not a plain tensor: {exc}") from None
        storage_dtype, key, numel, dtype, storage_offset, size, stride = rebuilt
        record = infos.get(f"{prefix}data/{key}")
        if record is None:
            raise fail(f"the archive lacks the storage record data/{key}")
        element = torch.empty((), dtype=storage_dtype).element_size()
        if record.compress_type != zipfile.ZIP_STORED or record.file_size != numel * element:
            raise fail(
                f"storage record data/{key} holds {record.file_size} bytes "
                f"({'stored' if record.compress_type == zipfile.ZIP_STORED else 'compressed'}),"
                f" {numel * element} expected"
            )
        window.seek(record.header_offset)
        header = window.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise fail(f"storage record data/{key} has no local zip header")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        begin = record.header_offset + 30 + name_length + extra_length
        if begin + record.file_size > chunk.length:
            raise fail(f"storage record data/{key} runs past the end of the archive")
        if (numel * element) % dtype.itemsize:
            raise fail(f"its storage of {numel * element} bytes does not hold whole {dtype}s")
        elements = numel * element // dtype.itemsize
        if size and element_count(size):
            if storage_offset < 0 or any(s < 0 for s in stride):
                raise fail("has a negative storage offset or stride")
            last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
            if last >= elements:
                raise fail(f"shape {list(size)} / stride {list(stride)} run past its storage")
        elif not size and storage_offset >= elements:
            raise fail("its scalar lies past its storage")
        return cls(file, path, chunk.offset + begin, elements, dtype, storage_offset, size, stride)

    @staticmethod
    def _read_small(archive: zipfile.ZipFile, info: zipfile.ZipInfo, fail: Any) -> bytes:
        if info.compress_type != zipfile.ZIP_STORED:
            raise fail(f"{info.filename} is compressed (torch.save never compresses)")
        try:
            return archive.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise fail(f"{info.filename} cannot be read ({exc})") from None

    def read_into(self, target: torch.Tensor) -> None:
        nbytes = self.storage_numel * self.dtype.itemsize
        self.file.seek(self.data_start)
        if self.file.readinto(safetensors_format.byte_view(target)) != nbytes:  # type: ignore[attr-defined]
            raise CheckpointFormatError(self.path, "truncated while reading")

    def read(self) -> torch.Tensor:
        storage = torch.empty(self.storage_numel, dtype=self.dtype)
        self.read_into(storage)
        return storage.as_strided(self.size, self.stride, self.storage_offset)


def _window(starts: list[int], ends: list[int], origin: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s - o, e - o) for s, e, o in zip(starts, ends, origin, strict=True))


def _contiguous_stride(size: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(size):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))
