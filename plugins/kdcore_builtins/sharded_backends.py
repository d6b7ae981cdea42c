"""Folder checkpoint backends: ``safetensors-sharded`` and ``torch-dcp``.

``safetensors-sharded`` writes the Hugging Face layout::

    folder/model.safetensors.index.json        {"metadata": {"total_size": N, "kdcore": manifest},
                                                 "weight_map": {tensor name: shard file name}}
    folder/model-00001-of-00003.safetensors    safetensors, metadata {"format": "pt"}
    ...

so ``transformers``' sharded loading reads an exported student as it is. A save never touches
the files the current index names: shards get fresh names (the canonical ones when free, else the
canonical name plus a per-save id), each is written through :func:`atomic_write` (temporary file,
fsync, rename), then the index is replaced atomically, and only then are the shards no index
names any more deleted. A crash at any point leaves the previous checkpoint loadable.

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

A folder holds one checkpoint: saving either format into it removes the other format's files
once the new checkpoint is committed. Should a crash fall between the two, both commit files
(index, marker) are there and ``detect`` picks the newer one.

Reading DCP never unpickles. DCP's ``.metadata`` is a pickle that torch itself loads with plain
``pickle.load`` (arbitrary code runs on load), and each tensor in a ``.distcp`` file is a
``torch.save`` zip archive whose ``data.pkl`` is a pickle too. kdcore reads both with
:func:`_evaluate_pickle`, which walks the pickle's opcodes and builds an inert description of what
it would construct: it never imports a module, never looks up a global, never calls anything and
never instantiates a class; a reference to any global outside a short allow-list of DCP's own
metadata classes (or torch's tensor-rebuild functions, for ``data.pkl``) is refused on sight. The
description is then checked field by field, and tensor bytes are read straight from the zip
records whose offsets the checks established.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import pickletools
import re
import reprlib
import shutil
import struct
import sys
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeGuard, TypeVar, cast

import attrs
import torch

from kdcore.checkpoint import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    TensorInfo,
    atomic_write,
    fsync_folder,
    open_regular,
)
from kdcore.strict_json import DuplicateKeyError, no_duplicate_keys
from kdcore_builtins import safetensors_format

MANIFEST_KEY = "kdcore"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # what transformers' save_pretrained uses
MAX_JSON_BYTES = 256 * 1024 * 1024
_SHARD_NAME = re.compile(r"model-\d{5,}-of-\d{5,}(-[0-9a-f]{12})?\.safetensors")
_TEMPORARY_NAME = re.compile(r"\.(model[-.].*|kdcore-dcp\.json)\.[^.]+\.tmp")

DCP_MARKER = "kdcore-dcp.json"
DCP_FORMAT = "kdcore.torch-dcp"
DCP_FORMAT_VERSION = 1
DCP_METADATA = ".metadata"
_DCP_FOLDER = re.compile(r"dcp-[0-9a-f]{12}")
MAX_DCP_METADATA_BYTES = 1024 * 1024 * 1024
MAX_DATA_PKL_BYTES = 1024 * 1024
SAVE_LOCK = ".kdcore-save.lock"
OPEN_ATTEMPTS = 20  # a reader starts again this often when saves keep replacing the checkpoint


# ================================================================================ shared
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


def _prepare_folder(path: Path, backend: str) -> Path:
    if path.exists() and not path.is_dir():
        raise CheckpointWriteError(
            f"{path}: is a file, but the {backend!r} backend writes a folder; choose another "
            "path or remove the file"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointWriteError(f"{path}: cannot create the checkpoint folder ({exc})") from exc
    return path


def _write_failed(folder: Path, exc: BaseException) -> CheckpointWriteError:
    failures = getattr(exc, "failures", None)  # DCP's CheckpointException: one per rank
    if _is_disk_full(exc):
        reason = "the disk is full"
    elif isinstance(failures, dict) and failures:
        reason = "; ".join(
            f"rank {rank}: {failure[0] if isinstance(failure, tuple) else failure!r}"
            for rank, failure in failures.items()
        )
    else:
        reason = str(exc)
    return CheckpointWriteError(
        f"{folder}: writing the checkpoint failed ({reason}); the previous checkpoint in this "
        "folder, if any, is unchanged"
    )


def _is_disk_full(exc: BaseException) -> bool:
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        pending += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # DCP's CheckpointException, per rank
        if isinstance(failures, dict):
            pending += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


def _plain_name(name: object) -> TypeGuard[str]:
    """A file name inside the folder: no separators, not '.' or '..', nothing absolute."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not os.path.isabs(name)
    )


def _read_json(path: Path, what: str, file: IO[bytes]) -> Any:
    """The JSON in ``file`` (opened from ``path``), its size taken from the handle."""
    size = os.fstat(file.fileno()).st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointFormatError(path, f"{what} is {size} bytes, more than {MAX_JSON_BYTES}")
    try:
        text = file.read(size)  # (read(MAX) would allocate MAX bytes up front)
        return json.loads(text, object_pairs_hook=no_duplicate_keys)
    except DuplicateKeyError as exc:
        raise CheckpointFormatError(path, f"duplicate key {exc.args[0]!r} in the {what}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointFormatError(path, f"{what} is not valid JSON ({exc})") from None
    except RecursionError:  # json's answer to deep nesting is not a ValueError
        raise CheckpointFormatError(path, f"{what} JSON nests too deeply") from None


def _peek_json(path: Path) -> Any:
    """The JSON in ``path`` if it is a small enough valid JSON file, else None (for detect)."""
    try:
        with open_regular(path) as file:
            if os.fstat(file.fileno()).st_size > MAX_JSON_BYTES:
                return None
            head = file.read(64)
            if head.lstrip()[:1] != b"{":  # don't read a big binary file in full
                return None
            return json.loads(head + file.read())
    except (OSError, CheckpointError, UnicodeDecodeError, ValueError, RecursionError):
        return None


@contextlib.contextmanager
def _save_lock(folder: Path) -> Iterator[None]:
    """One save at a time into ``folder``: a save removes the files of the checkpoints before
    it, which must not be another live save's new files.

    An exclusive ``flock`` on ``folder/.kdcore-save.lock``, which the holder removes when done
    (a waiter that then holds a removed file's lock tries again). Waits for the saves before
    it; a killed save's lock is released with its process. Where locks are not available
    (Windows, some network file systems), saves are not serialised.
    """
    if sys.platform == "win32":
        yield
        return
    import fcntl

    path = folder / SAVE_LOCK
    while True:
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            descriptor = os.open(path, flags, 0o666)
        except OSError as exc:  # a folder without write permission, say
            raise CheckpointWriteError(
                f"{folder}: cannot create the save lock {SAVE_LOCK} ({exc.strerror or exc}); the "
                "previous checkpoint in this folder, if any, is unchanged"
            ) from exc
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system
            os.close(descriptor)
            yield
            return
        if _is_file_at(path, descriptor):
            break
        os.close(descriptor)  # its holder removed it as we waited: lock the one there now
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(descriptor)


def _is_file_at(path: Path, descriptor: int) -> bool:
    """Whether ``path`` (following symlinks, as opening does) is the file open as
    ``descriptor``: not replaced or removed since it was opened."""
    try:
        there, opened = os.stat(path), os.fstat(descriptor)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (opened.st_dev, opened.st_ino)


_Reader = TypeVar("_Reader", "ShardedSafetensorsCheckpoint", "DcpCheckpoint")


def _open_consistently(commit: Path, read: Callable[[IO[bytes]], _Reader]) -> _Reader:
    """Open a folder checkpoint as of one commit: ``commit`` (the index or marker) is opened
    once and ``read`` opens every file it names; if a save replaced ``commit`` meanwhile (and
    may have removed the files the old one named), start again, at most OPEN_ATTEMPTS times.

    A committed checkpoint's files are never changed, only removed after the next commit, so
    a reader holding their handles reads one checkpoint to the end."""
    for _ in range(OPEN_ATTEMPTS):
        try:
            file = open_regular(commit)
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                commit, "does not exist (removed by a save of another format?)"
            ) from None
        with file:
            try:
                reader = read(file)
            except (OSError, CheckpointError):
                if _is_file_at(commit, file.fileno()):
                    raise  # the checkpoint itself is damaged
                continue
            if _is_file_at(commit, file.fileno()):
                return reader
            reader.close()
    raise CheckpointFormatError(
        commit,
        f"kept changing while being read ({OPEN_ATTEMPTS} attempts: other processes keep saving "
        "to it); try again",
    )


def _dcp_is_newer(folder: Path) -> bool:
    """Both formats' commit files in one folder: a save of one format was interrupted after it
    committed and before it removed the other's. The newer commit is the checkpoint."""
    try:
        return (folder / DCP_MARKER).stat().st_mtime_ns >= (folder / INDEX_NAME).stat().st_mtime_ns
    except OSError:
        return False


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _remove_sharded_checkpoint(
    folder: Path, previous: list[str], keep: frozenset[str] = frozenset()
) -> None:
    """After a commit: the shards only the ``previous`` index named, stray shards from
    interrupted saves and temporary files; never a file in ``keep``."""
    stale = {name for name in previous if name.endswith(".safetensors")}
    for entry in _listdir(folder):
        if _SHARD_NAME.fullmatch(entry) or _TEMPORARY_NAME.fullmatch(entry):
            stale.add(entry)
    for name in sorted(stale - keep):
        _remove_quietly(folder / name)
    fsync_folder(folder)


def _remove_dcp_checkpoint(folder: Path, keep: str | None = None) -> None:
    for entry in _listdir(folder):
        if _DCP_FOLDER.fullmatch(entry) and entry != keep:
            _remove_quietly(folder / entry)
    fsync_folder(folder)


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _index_files(index: Path) -> list[str]:
    """The shard names an index file refers to, leniently (for cleaning up only)."""
    content = _peek_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        return []
    return [name for name in set(weight_map.values()) if _plain_name(name)]


# ================================================================== safetensors-sharded
class ShardedSafetensorsBackend:
    """A folder of safetensors shards and a Hugging Face ``model.safetensors.index.json``."""

    name = "safetensors-sharded"

    def detect(self, path: Path) -> bool:
        if path.is_dir():  # a folder with an index, whatever it holds: open() says what is wrong
            return (path / INDEX_NAME).exists() and not _dcp_is_newer(path)
        content = _peek_json(path)  # the index file itself
        return isinstance(content, dict) and isinstance(content.get("weight_map"), dict)

    def write(
        self, path: Path, tensors: Mapping[str, torch.Tensor], manifest: str, **options: Any
    ) -> None:
        max_shard_size = parse_size(options.pop("max_shard_size", DEFAULT_MAX_SHARD_SIZE))
        if options:
            raise TypeError(
                f"the {self.name} backend takes only max_shard_size, got {sorted(options)}"
            )
        folder = _prepare_folder(path, self.name)
        with _save_lock(folder):
            self._write(folder, tensors, manifest, max_shard_size)

    def _write(
        self, folder: Path, tensors: Mapping[str, torch.Tensor], manifest: str, max_shard_size: int
    ) -> None:
        previous = _index_files(folder / INDEX_NAME)
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
                raise _write_failed(folder, exc) from exc
            raise
        # Committed: the index names the new shards. Now drop what nothing names any more.
        _remove_sharded_checkpoint(folder, previous, keep=frozenset(names))
        _remove_quietly(folder / DCP_MARKER)  # a folder holds one checkpoint: the newest
        _remove_dcp_checkpoint(folder)

    def open(self, path: Path) -> ShardedSafetensorsCheckpoint:
        index = path / INDEX_NAME if path.is_dir() else path
        return _open_consistently(index, lambda file: ShardedSafetensorsCheckpoint(index, file))


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

    ``file`` is the index, open; each shard is opened once, here (see :func:`_open_consistently`).
    """

    def __init__(self, index: Path, file: IO[bytes]) -> None:
        self.path = index
        self.folder = index.parent
        content = _read_json(index, "index", file)
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
            if not _plain_name(shard):
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
        folder = _prepare_folder(path, self.name) if coordinator else path
        # Rank 0 removes older checkpoints: it holds the folder's save lock for the whole save.
        with _save_lock(folder) if coordinator else contextlib.nullcontext():
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
                _remove_quietly(folder / subfolder)
                fsync_folder(folder)
            if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            raise _write_failed(folder, exc) from exc  # DCP raises CheckpointException
        if coordinator:  # committed: the marker names the new checkpoint
            _remove_dcp_checkpoint(folder, keep=subfolder)
            previous = _index_files(folder / INDEX_NAME)
            with contextlib.suppress(OSError):
                (folder / INDEX_NAME).unlink()  # a folder holds one checkpoint: the newest
            _remove_sharded_checkpoint(folder, previous)
        if distributed:
            dist.barrier()  # no rank returns before the checkpoint is complete

    def open(self, path: Path) -> DcpCheckpoint:
        if not (path / DCP_MARKER).exists():  # a bare DCP checkpoint, which no save changes
            return DcpCheckpoint(path, None)
        return _open_consistently(path / DCP_MARKER, lambda file: DcpCheckpoint(path, file))


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


class _Chunk(NamedTuple):
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@attrs.frozen
class _DcpTensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[_Chunk, ...]


class DcpCheckpoint:
    """An open DCP checkpoint: its metadata read without unpickling and checked in full.

    ``marker`` is kdcore's marker, open (None for a bare DCP checkpoint); the metadata and every
    data file are opened once, here (see :func:`_open_consistently`).
    """

    def __init__(self, folder: Path, marker_file: IO[bytes] | None) -> None:
        self.path = folder
        self._manifest: str | None = None
        self._files: dict[str, IO[bytes]] = {}
        marker_path = folder / DCP_MARKER
        if marker_file is not None:
            marker = _read_json(marker_path, "kdcore-dcp marker", marker_file)
            checkpoint = marker.get("checkpoint") if isinstance(marker, dict) else None
            if not isinstance(marker, dict) or marker.get("format") != DCP_FORMAT:
                raise CheckpointFormatError(marker_path, f"is not a {DCP_FORMAT} marker")
            version = marker.get("format_version")
            if version != DCP_FORMAT_VERSION:
                raise CheckpointFormatError(
                    marker_path, f"format_version {version!r} is not {DCP_FORMAT_VERSION}"
                )
            if not _plain_name(checkpoint):
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

    def _read_metadata(self) -> dict[str, _DcpTensor]:
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
            value = _evaluate_pickle(data, _METADATA_GLOBALS)
        except _PickleRefusedError as exc:
            raise self._fail(f"{exc}; refused without running anything") from None
        try:
            entries = _dcp_entries(value)
        except _ShapeError as exc:
            raise self._fail(f"is not DCP metadata kdcore reads: {exc}") from None
        for name, entry in entries.items():
            for chunk in entry.chunks:
                self._check_chunk_file(name, chunk)
        return entries

    def _check_chunk_file(self, name: str, chunk: _Chunk) -> None:
        if not _plain_name(chunk.file):
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
        entry: _DcpTensor,
        chunk: _Chunk,
        target: torch.Tensor,
        box: tuple[tuple[int, ...], tuple[int, ...]],
    ) -> None:
        # The part of the chunk that falls into the target box, in both coordinate systems.
        starts = [max(c, b) for c, b in zip(chunk.offsets, box[0], strict=True)]
        ends = [
            min(c + s, b + t)
            for c, s, b, t in zip(chunk.offsets, chunk.sizes, box[0], box[1], strict=True)
        ]
        if _numel(box[1]) == 0 or any(s >= e for s, e in zip(starts, ends, strict=True)):
            return  # nothing of this chunk is wanted here
        record = self._records[(name, chunk)]
        whole = chunk.offsets == box[0] and chunk.sizes == box[1]
        if whole and record.contiguous:
            record.read_into(target)  # one copy, straight into the parameter
            return
        data = record.read()
        source = data[_window(starts, ends, chunk.offsets)]
        target[_window(starts, ends, box[0])].copy_(source)

    def _record(self, name: str, entry: _DcpTensor, chunk: _Chunk) -> _TensorRecord:
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
    out: torch.Tensor | None, entry: _DcpTensor
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
            and self.storage_numel == _numel(self.size)
            and self.stride == _contiguous_stride(self.size)
        )

    @classmethod
    def find(cls, file: IO[bytes], path: Path, chunk: _Chunk, name: str) -> _TensorRecord:
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
            value = _evaluate_pickle(
                cls._read_small(archive, data_pkl, fail), _TENSOR_GLOBALS, persistent=True
            )
            rebuilt = _rebuilt_tensor(value)
        except _PickleRefusedError as exc:
            raise fail(f"data.pkl {exc}; refused without running anything") from None
        except _ShapeError as exc:
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
        if size and _numel(size):
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


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _contiguous_stride(size: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for n in reversed(size):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


# ===================================================== reading pickles without unpickling
class _PickleRefusedError(Exception):
    pass


class _ShapeError(Exception):
    pass


class _Global(NamedTuple):
    module: str
    name: str


@attrs.define(eq=False, repr=False)
class _Instance:
    """What REDUCE or NEWOBJ would have built: ``cls(*args)``, plus BUILD's state. Inert."""

    cls: _Global
    args: tuple[Any, ...]
    state: Any = None
    built: bool = False

    def __repr__(self) -> str:  # shallow: a crafted pickle can nest without end
        return f"{self.cls.module}.{self.cls.name}(...)"


class _BoundedRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # repr() of an integer of more than 4,300 digits raises ValueError; a pickle can hold one
        if x.bit_length() > 64:
            return f"<a {x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def _short(value: Any) -> str:
    """A bounded repr for error messages (values from a crafted file can be huge or deep)."""
    return _REPR.repr(value)


class _Persistent(NamedTuple):
    pid: Any


_DCP = "torch.distributed.checkpoint.metadata"
_DTYPE_NAMES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
# torch.save's legacy typed storages (dtypes without one use UntypedStorage + _rebuild_tensor_v3)
_STORAGE_NAMES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_TORCH_DTYPES = frozenset(("torch", name) for name in _DTYPE_NAMES)
_METADATA_GLOBALS = frozenset(
    {
        (_DCP, "Metadata"),
        (_DCP, "TensorStorageMetadata"),
        (_DCP, "BytesStorageMetadata"),
        (_DCP, "ChunkStorageMetadata"),
        (_DCP, "TensorProperties"),
        (_DCP, "_MEM_FORMAT_ENCODING"),
        (_DCP, "MetadataIndex"),
        (_DCP, "StorageMeta"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch", "strided"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        *_TORCH_DTYPES,
    }
)
_TENSOR_GLOBALS = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch.storage", "UntypedStorage"),
        ("collections", "OrderedDict"),
        *(("torch", name) for name in _STORAGE_NAMES),
        *_TORCH_DTYPES,
    }
)
_PUSH_ARGUMENT = frozenset(
    {
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "LONG4",
        "BINFLOAT",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "SHORT_BINBYTES",
        "BINBYTES",
        "BINBYTES8",
    }
)


def _evaluate_pickle(
    data: bytes, allowed: frozenset[tuple[str, str]], *, persistent: bool = False
) -> Any:
    """Run a pickle's opcodes on inert stand-ins: globals become :class:`_Global` names,
    REDUCE/NEWOBJ become :class:`_Instance` records, BUILD only stores the state. Nothing is
    imported, looked up, called or constructed; unknown opcodes and globals are refused."""
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        nonlocal stack
        if not marks:
            raise _PickleRefusedError("is a malformed pickle (no MARK)")
        items, stack = stack, marks.pop()
        return items

    def global_(module: object, name: object) -> _Global:
        if not isinstance(module, str) or not isinstance(name, str):
            raise _PickleRefusedError("is a malformed pickle (a global named by non-strings)")
        if (module, name) == _ENUM_LOOKUP:  # only as getattr(allowed enum class, member name)
            return _Global(module, name)
        if (module, name) not in allowed:
            raise _PickleRefusedError(
                f"refers to {module}.{name}, which is not one of the classes this format uses"
            )
        return _Global(module, name)

    try:
        for opcode, argument, _ in pickletools.genops(data):
            op = opcode.name
            if op in ("PROTO", "FRAME"):
                continue
            if op == "STOP":
                if len(stack) != 1 or marks:
                    raise _PickleRefusedError("is a malformed pickle (stack at STOP)")
                return stack[0]
            if op in _PUSH_ARGUMENT:
                stack.append(argument)
            elif op == "NONE":
                stack.append(None)
            elif op in ("NEWTRUE", "NEWFALSE"):
                stack.append(op == "NEWTRUE")
            elif op == "MARK":
                marks.append(stack)
                stack = []
            elif op == "POP":
                stack.pop()
            elif op == "POP_MARK":
                pop_mark()
            elif op == "DUP":
                stack.append(stack[-1])
            elif op == "EMPTY_TUPLE":
                stack.append(())
            elif op in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(op[-1])
                if len(stack) < count:
                    raise _PickleRefusedError("is a malformed pickle (stack underflow)")
                items = stack[-count:]
                del stack[-count:]
                stack.append(tuple(items))
            elif op == "TUPLE":
                items = pop_mark()
                stack.append(tuple(items))
            elif op == "EMPTY_LIST":
                stack.append([])
            elif op == "LIST":
                items = pop_mark()
                stack.append(items)
            elif op == "APPEND":
                value = stack.pop()
                _expect_list(stack[-1]).append(value)
            elif op == "APPENDS":
                items = pop_mark()
                _expect_list(stack[-1]).extend(items)
            elif op == "EMPTY_DICT":
                stack.append({})
            elif op == "DICT":
                items = pop_mark()
                stack.append(_set_items({}, items))
            elif op == "SETITEM":
                value = stack.pop()
                key = stack.pop()
                _set_items(stack[-1], [key, value])
            elif op == "SETITEMS":
                items = pop_mark()
                _set_items(stack[-1], items)
            elif op in ("BINPUT", "LONG_BINPUT"):
                memo[cast(int, argument)] = stack[-1]
            elif op == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif op in ("BINGET", "LONG_BINGET"):
                if argument not in memo:
                    raise _PickleRefusedError(f"is a malformed pickle (memo {argument} unset)")
                stack.append(memo[argument])
            elif op == "GLOBAL":
                module, _, name = str(argument).partition(" ")
                stack.append(global_(module, name))
            elif op == "STACK_GLOBAL":
                name = stack.pop()
                module = stack.pop()
                stack.append(global_(module, name))
            elif op in ("REDUCE", "NEWOBJ"):
                args = stack.pop()
                callable_ = stack.pop()
                if not isinstance(callable_, _Global) or not isinstance(args, tuple):
                    raise _PickleRefusedError(f"is a malformed pickle ({op} on a non-global)")
                if callable_ == _ENUM_LOOKUP:
                    stack.append(_enum_member(args, allowed))
                else:
                    stack.append(_Instance(callable_, args))
            elif op == "BUILD":
                state = stack.pop()
                target = stack[-1]
                if not isinstance(target, _Instance) or target.built:
                    raise _PickleRefusedError("is a malformed pickle (BUILD on a non-object)")
                target.state, target.built = state, True
            elif op == "BINPERSID" and persistent:
                stack.append(_Persistent(stack.pop()))
            else:
                raise _PickleRefusedError(
                    f"uses the pickle opcode {op}, which this format does not"
                )
    except IndexError:
        raise _PickleRefusedError("is a malformed pickle (stack underflow)") from None
    except _PickleRefusedError:
        raise
    except Exception as exc:  # genops' own complaints: truncated, bad opcode, bad argument
        raise _PickleRefusedError(f"is not a valid pickle ({exc})") from None
    raise _PickleRefusedError("is a truncated pickle (no STOP)")


# Some Python 3.11 releases pickle an enum member as getattr(EnumClass, "MEMBER"), others as
# EnumClass(value); the first is accepted only in exactly that shape.
_ENUM_LOOKUP = ("builtins", "getattr")


def _enum_member(args: tuple[Any, ...], allowed: frozenset[tuple[str, str]]) -> _Instance:
    valid = (
        len(args) == 2
        and isinstance(args[0], _Global)
        and tuple(args[0]) in allowed
        and isinstance(args[1], str)
        and args[1].isidentifier()
        and not args[1].startswith("_")
    )
    if not valid:
        raise _PickleRefusedError(
            f"uses builtins.getattr on {_short(args)}, not as an enum member lookup; "
            "refused without running anything"
        )
    return _Instance(args[0], (args[1],))


def _expect_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _PickleRefusedError("is a malformed pickle (APPEND to a non-list)")
    return value


_KEY_TYPES = (str, int, type(None), _Instance, _Global)


def _set_items(target: Any, items: list[Any]) -> dict[Any, Any]:
    if not isinstance(target, dict) or len(items) % 2:
        raise _PickleRefusedError("is a malformed pickle (SETITEMS on a non-dict)")
    for key, value in zip(items[::2], items[1::2], strict=True):
        # Flat keys only: hashing a deeply nested tuple would recurse in C without a guard.
        if not isinstance(key, _KEY_TYPES):
            raise _PickleRefusedError(f"has a dict key of type {type(key).__name__}")
        target[key] = value
    return target  # type: ignore[no-any-return]


# ---------------------------------------------------- checking what the pickles describe
def _object_state(value: Any, module: str, name: str, what: str) -> dict[str, Any]:
    """The attribute dict of a dataclass pickled as NEWOBJ(cls, ()) + BUILD(dict)."""
    if not (
        isinstance(value, _Instance)
        and value.cls == (module, name)
        and value.args == ()
        and isinstance(value.state, dict)
        and all(isinstance(key, str) for key in value.state)
    ):
        raise _ShapeError(f"{what} is not a {name}")
    return value.state  # type: ignore[no-any-return]


def _called(value: Any, module: str, name: str, what: str) -> tuple[Any, ...]:
    if not (isinstance(value, _Instance) and value.cls == (module, name) and not value.built):
        raise _ShapeError(f"{what} is not {module}.{name}(...)")
    return value.args


_MAX_INT = 2**63 - 1  # torch's sizes, strides and offsets are int64


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
        raise _ShapeError(f"{what} must be a non-negative 64-bit integer, got {_short(value)}")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise _ShapeError(f"{what} must be a sequence of integers")
    return tuple(_int(item, what) for item in value)


def _size(value: Any, what: str) -> tuple[int, ...]:
    args = _called(value, "torch", "Size", what)
    if len(args) != 1:
        raise _ShapeError(f"{what} is a malformed torch.Size")
    return _ints(args[0], what)


def _dtype(value: Any, what: str) -> torch.dtype:
    if not (isinstance(value, _Global) and value.module == "torch" and value.name in _DTYPE_NAMES):
        raise _ShapeError(f"{what} is not a dtype kdcore reads")
    return _DTYPE_NAMES[value.name]


def _properties_dtype(value: Any, what: str) -> torch.dtype:
    state = value.state if isinstance(value, _Instance) else None
    if (
        isinstance(value, _Instance)
        and value.cls == (_DCP, "TensorProperties")
        and value.args == ()
    ):
        if isinstance(state, tuple) and len(state) == 5:  # TensorProperties.__getstate__
            dtype, layout = state[0], state[1]
        elif isinstance(state, dict):  # older torch: the plain attribute dict
            dtype, layout = state.get("dtype"), state.get("layout")
        else:
            raise _ShapeError(f"{what} is malformed")
        strided = layout == _Global("torch", "strided") or (
            isinstance(layout, _Instance)
            and layout.cls == ("torch.serialization", "_get_layout")
            and layout.args == ("torch.strided",)
        )
        if not strided:
            raise _ShapeError(f"{what}: only strided (dense) tensors are read")
        return _dtype(dtype, f"{what}.dtype")
    raise _ShapeError(f"{what} is not a TensorProperties")


def _dcp_entries(value: Any) -> dict[str, _DcpTensor]:
    metadata = _object_state(value, _DCP, "Metadata", "the pickled object")
    version = metadata.get("version")
    if version is not None and not (isinstance(version, str) and version.startswith("1.")):
        raise _ShapeError(f"DCP format version {_short(version)} (kdcore reads 1.x)")
    tensors = metadata.get("state_dict_metadata")
    storage = metadata.get("storage_data")
    if not isinstance(tensors, dict) or not isinstance(storage, dict):
        raise _ShapeError("state_dict_metadata and storage_data must be dicts")
    locations: dict[tuple[str, tuple[int, ...]], tuple[str, int, int]] = {}
    for key, info in storage.items():
        index = _object_state(key, _DCP, "MetadataIndex", "a storage_data key")
        fqn = index.get("fqn")
        if not isinstance(fqn, str):
            raise _ShapeError("a storage_data key has no fqn")
        offset = _size(index.get("offset"), f"storage_data[{fqn!r}].offset")
        where = _object_state(
            info, "torch.distributed.checkpoint.filesystem", "_StorageInfo", f"storage of {fqn!r}"
        )
        if where.get("transform_descriptors"):
            raise _ShapeError(
                f"{fqn!r} is stored through stream transforms "
                f"{_short(where['transform_descriptors'])}, which kdcore does not read"
            )
        relative_path = where.get("relative_path")
        if not isinstance(relative_path, str):
            raise _ShapeError(f"storage of {fqn!r} has no relative_path")
        if (fqn, offset) in locations:
            raise _ShapeError(f"chunk {list(offset)} of {fqn!r} is stored twice")
        locations[(fqn, offset)] = (
            relative_path,
            _int(where.get("offset"), f"storage of {fqn!r}: offset"),
            _int(where.get("length"), f"storage of {fqn!r}: length"),
        )
    entries: dict[str, _DcpTensor] = {}
    for fqn, item in tensors.items():
        if not isinstance(fqn, str):
            raise _ShapeError("a state_dict_metadata key is not a string")
        if isinstance(item, _Instance) and item.cls == (_DCP, "BytesStorageMetadata"):
            raise _ShapeError(f"entry {fqn!r} is pickled bytes, not a tensor")
        state = _object_state(item, _DCP, "TensorStorageMetadata", f"entry {fqn!r}")
        dtype = _properties_dtype(state.get("properties"), f"entry {fqn!r}.properties")
        shape = _size(state.get("size"), f"entry {fqn!r}.size")
        raw_chunks = state.get("chunks")
        if not isinstance(raw_chunks, list):
            raise _ShapeError(f"entry {fqn!r}.chunks is not a list")
        chunks = []
        for number, raw in enumerate(raw_chunks):
            what = f"entry {fqn!r}.chunks[{number}]"
            chunk = _object_state(raw, _DCP, "ChunkStorageMetadata", what)
            offsets = _size(chunk.get("offsets"), f"{what}.offsets")
            sizes = _size(chunk.get("sizes"), f"{what}.sizes")
            if len(offsets) != len(shape) or len(sizes) != len(shape):
                raise _ShapeError(f"{what} has another rank than the tensor")
            if any(o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
                raise _ShapeError(f"{what} lies outside the tensor's shape {list(shape)}")
            if (fqn, offsets) not in locations:
                raise _ShapeError(f"{what} has no storage_data entry")
            chunks.append(_Chunk(offsets, sizes, *locations[(fqn, offsets)]))
        _check_cover(fqn, shape, chunks)
        entries[fqn] = _DcpTensor(dtype, shape, tuple(chunks))
    return entries


_MAX_COVER_CORNERS = 2**20  # a 2-D split into 250,000 chunks; a second or two


def _check_cover(fqn: str, shape: tuple[int, ...], chunks: list[_Chunk]) -> None:
    """The chunks tile the tensor: no overlaps, and together exactly its size.

    In linear time, by corners rather than by comparing every pair: a box's indicator is the
    signed sum of the orthants at its corners (+ where an even number of coordinates are upper
    bounds, - where odd), and that sum is unique, so the chunks (all inside the tensor, checked
    before) tile it exactly when their signed corners add up to the tensor's own. Dimensions that
    every chunk spans in full factor out, so a chunk has 2**(split dimensions) corners.
    """
    if sum(_numel(chunk.sizes) for chunk in chunks) != _numel(shape) or (
        not chunks and _numel(shape)
    ):
        raise _ShapeError(f"the chunks of {fqn!r} do not cover its shape {list(shape)}")
    if not _numel(shape):
        return  # and so every chunk is empty
    nonempty = [chunk for chunk in chunks if _numel(chunk.sizes)]
    split = [d for d in range(len(shape)) if any(c.sizes[d] != shape[d] for c in nonempty)]
    if len(nonempty) << len(split) > _MAX_COVER_CORNERS:
        raise _ShapeError(
            f"{fqn!r} is split along {len(split)} dimensions into {len(nonempty)} chunks, more "
            f"than kdcore checks ({_MAX_COVER_CORNERS} chunk corners)"
        )
    whole = _Chunk((0,) * len(shape), shape, "", 0, 0)
    counts: dict[tuple[int, ...], int] = {}
    for box, sign in [(whole, -1), *((chunk, 1) for chunk in nonempty)]:
        bounds = [((box.offsets[d], 1), (box.offsets[d] + box.sizes[d], -1)) for d in split]
        for corner in itertools.product(*bounds):
            point = tuple(x for x, _ in corner)
            counts[point] = counts.get(point, 0) + sign * math.prod(s for _, s in corner)
    if any(counts.values()):
        raise _ShapeError(
            f"the chunks of {fqn!r} overlap (their sizes add up to its shape {list(shape)}, so "
            "they also leave part of it uncovered)"
        )


def _rebuilt_tensor(
    value: Any,
) -> tuple[torch.dtype, str, int, torch.dtype, int, tuple[int, ...], tuple[int, ...]]:
    """(storage dtype, storage key, storage numel, dtype, storage offset, size, stride)."""
    if not isinstance(value, _Instance) or value.built:
        raise _ShapeError("the archive does not hold one tensor")
    if value.cls == ("torch._utils", "_rebuild_tensor_v2") and len(value.args) in (6, 7):
        storage, offset, size, stride, _, hooks, *rest = value.args
        dtype = None
    elif value.cls == ("torch._utils", "_rebuild_tensor_v3") and len(value.args) in (7, 8):
        storage, offset, size, stride, _, hooks, dtype_value, *rest = value.args
        dtype = _dtype(dtype_value, "the tensor's dtype")
    else:
        raise _ShapeError("the archive does not hold one tensor")
    if _called(hooks, "collections", "OrderedDict", "backward hooks") != () or rest not in (
        [],
        [None],
        [{}],
    ):
        raise _ShapeError("the tensor carries hooks or metadata")
    if not (
        isinstance(storage, _Persistent)
        and isinstance(storage.pid, tuple)
        and len(storage.pid) == 5
        and storage.pid[0] == "storage"
        and isinstance(storage.pid[1], _Global)
        and isinstance(storage.pid[2], str)
        and re.fullmatch(r"\d+", storage.pid[2])
    ):
        raise _ShapeError("the tensor's storage reference is malformed")
    storage_class = storage.pid[1]
    if storage_class == ("torch.storage", "UntypedStorage") and dtype is not None:
        storage_dtype = torch.uint8
    elif storage_class.module == "torch" and storage_class.name in _STORAGE_NAMES and dtype is None:
        storage_dtype = dtype = _STORAGE_NAMES[storage_class.name]
    else:
        raise _ShapeError(f"unexpected storage {storage_class.module}.{storage_class.name}")
    numel = _int(storage.pid[4], "the storage size")
    size, stride = _ints(size, "the tensor's size"), _ints(stride, "the tensor's stride")
    if len(size) != len(stride):
        raise _ShapeError("size and stride differ in length")
    return storage_dtype, storage.pid[2], numel, dtype, _int(offset, "storage offset"), size, stride
