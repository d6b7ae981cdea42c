"""Writing a file atomically and reading one safely: ``atomic_write`` (temporary file, fsync,
rename, with locks so that a writer never removes another live writer's temporary file),
``open_regular`` and ``fsync_folder``. Public through :mod:`kdcore._checkpoint`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

from kdcore._checkpoint_backend import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointWriteError,
)
from kdcore._errors import KDCoreError


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[IO[bytes]]:
    """Write ``path`` through a temporary file in the same folder, fsync, then rename.

    Readers see the old file or the new one, never a mix; on any error the temporary file is
    removed and the old file is untouched. A process killed mid-write cannot remove its
    temporary file, so a later successful write removes the ones no live writer holds. The new
    file keeps the permission bits of the file it replaces; a new file gets ``0o666`` less the
    umask, as ``open`` gives.
    """
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CheckpointWriteError(f"{path}: folder {str(folder)!r} does not exist")
    descriptor, temporary, lock = _locked_temporary(path, folder)
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(exc, OSError) and not isinstance(exc, KDCoreError):
            raise _write_error(path, exc) from exc
        raise
    finally:
        if lock is not None:
            os.close(lock)
    fsync_folder(folder)
    _remove_stale_temporaries(folder, path.name)


def _write_error(path: Path, exc: OSError) -> CheckpointWriteError:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
    return CheckpointWriteError(
        f"{path}: writing the checkpoint failed ({reason}); the previous file at this path, if "
        "any, is unchanged"
    )


_TEMPORARY_ATTEMPTS = 100


def _locked_temporary(path: Path, folder: Path) -> tuple[int, Path, int | None]:
    """A new temporary file for ``path``, locked (see :func:`_hold_lock`), with the mode the
    checkpoint keeps: ``(descriptor, its path, the lock's descriptor)``."""
    try:
        existing = os.stat(path).st_mode
    except OSError:
        existing = 0
    # A new file gets 0o666 less the umask (os.open applies it); a replaced one keeps its mode.
    mode = stat.S_IMODE(existing) if stat.S_ISREG(existing) else None
    for _ in range(_TEMPORARY_ATTEMPTS):
        temporary = folder / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            descriptor = os.open(temporary, flags | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as exc:  # a folder without write permission, say
            raise _write_error(path, exc) from exc
        lock = _hold_lock(descriptor, temporary)
        if lock is not False:
            if mode is not None and hasattr(os, "fchmod"):
                with contextlib.suppress(OSError):  # some file systems have no modes
                    os.fchmod(descriptor, mode)
            return descriptor, temporary, lock
        os.close(descriptor)  # another writer took it for a stale one before we locked it
    raise CheckpointWriteError(
        f"{path}: could not create a temporary file in {str(folder)!r} in "
        f"{_TEMPORARY_ATTEMPTS} attempts (other writers removed each); the previous file at "
        "this path, if any, is unchanged"
    )


def _hold_lock(descriptor: int, temporary: Path) -> int | Literal[False] | None:
    """Lock the temporary file until it is renamed (a second descriptor: closing the file
    object must not release it), so that no other writer takes it for a stale one.

    The file is visible before it is locked, and in between another writer's cleanup may lock
    and remove it; so once locked, check that the name still is this file. The lock's
    descriptor, None where locks are not available, False when the file was taken."""
    if sys.platform == "win32":
        return None
    import fcntl

    lock = os.dup(descriptor)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits only for a cleanup that holds it to remove it
    except OSError:  # a file system without flock: no writer can lock, none removes
        os.close(lock)
        return None
    if _names_file(temporary, lock):
        return lock
    os.close(lock)
    return False


def _names_file(path: Path, descriptor: int) -> bool:
    """Whether ``path`` (not following a symlink) is the file open as ``descriptor``."""
    try:
        named, opened = os.lstat(path), os.fstat(descriptor)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _remove_stale_temporaries(folder: Path, name: str) -> None:
    """Remove the temporary files of ``folder / name`` that killed writers left; never a live
    writer's (it holds a lock, or will check that it still has its file once it does). Nothing
    is removed where locks are not available (Windows)."""
    if sys.platform == "win32":
        return
    import fcntl

    pattern = re.compile(re.escape(f".{name}.") + r"[A-Za-z0-9_]+\.tmp")
    try:
        entries = [entry for entry in os.listdir(folder) if pattern.fullmatch(entry)]
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
            descriptor = os.open(folder / entry, flags)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a live writer
                # Renamed by its writer meanwhile, the name may since be another file's.
                if _names_file(folder / entry, descriptor):
                    os.unlink(folder / entry)
            finally:
                os.close(descriptor)


def open_regular(path: Path) -> io.BufferedReader:
    """Open a checkpoint file for reading, if it is a regular file (symlinks are followed).

    A FIFO would block the open until some process writes to it and a device may never end, so
    the file is opened without blocking and its handle, not its path, is checked. Raises
    ``FileNotFoundError`` when nothing is there, :class:`CheckpointFormatError` for anything
    but a regular file and :class:`CheckpointError` when it cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(path, f"cannot be opened ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
            raise CheckpointFormatError(path, f"is {kind}, not a regular file")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
