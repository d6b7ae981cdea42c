"""What the folder backends (``safetensors-sharded``, ``torch-dcp``) share: one save at a time
per folder, reading a checkpoint as of one commit, and removing what no commit names any more.

A folder holds one checkpoint: saving either format into it removes the other format's files
once the new checkpoint is committed. Should a crash fall between the two, both commit files
(index, marker) are there and ``detect`` picks the newer one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol, TypeGuard, TypeVar

from kdcore.plugin import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    DuplicateKeyError,
    fsync_folder,
    no_duplicate_keys,
    open_regular,
)

INDEX_NAME = "model.safetensors.index.json"
MAX_JSON_BYTES = 256 * 1024 * 1024
_SHARD_NAME = re.compile(r"model-\d{5,}-of-\d{5,}(-[0-9a-f]{12})?\.safetensors")
_TEMPORARY_NAME = re.compile(r"\.(model[-.].*|kdcore-dcp\.json)\.[^.]+\.tmp")

DCP_MARKER = "kdcore-dcp.json"
_DCP_FOLDER = re.compile(r"dcp-[0-9a-f]{12}")
SAVE_LOCK = ".kdcore-save.lock"
OPEN_ATTEMPTS = 20  # a reader starts again this often when saves keep replacing the checkpoint


def prepare_folder(path: Path, backend: str) -> Path:
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


def write_failed(folder: Path, exc: BaseException) -> CheckpointWriteError:
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


def plain_name(name: object) -> TypeGuard[str]:
    """A file name inside the folder: no separators, not '.' or '..', nothing absolute."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not os.path.isabs(name)
    )


def read_json(path: Path, what: str, file: IO[bytes]) -> Any:
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


def peek_json(path: Path) -> Any:
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
def save_lock(folder: Path) -> Iterator[None]:
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


class _Closable(Protocol):
    def close(self) -> None: ...


_Reader = TypeVar("_Reader", bound=_Closable)


def open_consistently(commit: Path, read: Callable[[IO[bytes]], _Reader]) -> _Reader:
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


def dcp_is_newer(folder: Path) -> bool:
    """Both formats' commit files in one folder: a save of one format was interrupted after it
    committed and before it removed the other's. The newer commit is the checkpoint."""
    try:
        return (folder / DCP_MARKER).stat().st_mtime_ns >= (folder / INDEX_NAME).stat().st_mtime_ns
    except OSError:
        return False


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def remove_sharded_checkpoint(
    folder: Path, previous: list[str], keep: frozenset[str] = frozenset()
) -> None:
    """After a commit: the shards only the ``previous`` index named, stray shards from
    interrupted saves and temporary files; never a file in ``keep``."""
    stale = {name for name in previous if name.endswith(".safetensors")}
    for entry in _listdir(folder):
        if _SHARD_NAME.fullmatch(entry) or _TEMPORARY_NAME.fullmatch(entry):
            stale.add(entry)
    for name in sorted(stale - keep):
        remove_quietly(folder / name)
    fsync_folder(folder)


def remove_dcp_checkpoint(folder: Path, keep: str | None = None) -> None:
    for entry in _listdir(folder):
        if _DCP_FOLDER.fullmatch(entry) and entry != keep:
            remove_quietly(folder / entry)
    fsync_folder(folder)


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def index_files(index: Path) -> list[str]:
    """The shard names an index file refers to, leniently (for cleaning up only)."""
    content = peek_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        return []
    return [name for name in set(weight_map.values()) if plain_name(name)]
