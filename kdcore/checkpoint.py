"""``kd.save`` and ``kd.restore``: what a checkpoint holds and how a model comes back from one.

A checkpoint is a set of named tensors plus a JSON manifest (format version, kdcore version,
the applied modes recorded as data, optimizer scalars). Backends (plugins) decide how they are
laid out on disk; this module decides what goes in and rebuilds the model, and never unpickles.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import reprlib
import secrets
import stat
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import attrs
import torch
from torch import nn

from kdcore.errors import KDCoreError
from kdcore.model import BALANCER, LOSS_MODULES, TEACHER, is_distillation_model
from kdcore.modes import convert, export, unwrap
from kdcore.plugin_manager import BUILTIN_DISTRIBUTION, PluginWarning, registries
from kdcore.record import ModeRecord, NotRecordableWarning
from kdcore.references import TrustPolicy, reference_of, restoring
from kdcore.registry import Provider
from kdcore.strict_json import DuplicateKeyError, no_duplicate_keys

FORMAT = "kdcore.checkpoint"
FORMAT_VERSION = 1
DEFAULT_BACKEND = "safetensors"
OPTIMIZER_PREFIX = "__optimizer__."


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


# ---------------------------------------------------------------------------------- save
def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    backend: str = DEFAULT_BACKEND,
    **backend_options: Any,
) -> Path:
    """Save a distillation model (or a plain or exported student) to ``path``.

    The student's tensors, the learnable loss modules and balancer state, the teacher when its
    spec cannot rebuild it, and ``optimizer``'s state when given. Returns the path written.
    """
    path = Path(path)
    model = unwrap(model)
    writer: CheckpointBackend = registries().checkpoint_backends.get(backend, where="backend")
    tensors, aliases = _deduplicated(_model_tensors(model))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kdcore_version": _kdcore_version(),
        "student_class": reference_of(
            model._kd.original_class if is_distillation_model(model) else type(model)
        ),
        "modes": [attrs.asdict(record) for record in _records(model)],
        "aliases": aliases,
        "optimizer": None,
    }
    if optimizer is not None:
        manifest["optimizer"] = _optimizer_manifest(optimizer, tensors)
    try:
        text = json.dumps(manifest, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointWriteError(f"{path}: the manifest is not plain data: {exc}") from exc
    writer.write(path, tensors, text, **backend_options)
    return path


def _records(model: nn.Module) -> list[ModeRecord]:
    return list(model._kd.modes) if is_distillation_model(model) else []


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    if not is_distillation_model(model):
        return dict(model.state_dict())
    keep_teacher = any(record.teacher_weights for record in model._kd.modes)
    with model.hide_teacher_model(not keep_teacher):
        return dict(nn.Module.state_dict(model))


def _deduplicated(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors once: ``{alias: stored name}`` for the others."""
    stored: dict[tuple[Any, ...], str] = {}
    unique, aliases = {}, {}
    for name, tensor in tensors.items():
        # Sharded DTensors (FSDP2) have no local storage pointer to compare; backends that
        # take them (torch-dcp) store each by name.
        if tensor.numel() == 0 or hasattr(tensor, "placements"):
            unique[name] = tensor
            continue
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.device,
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if key in stored:
            aliases[name] = stored[key]
        else:
            stored[key] = name
            unique[name] = tensor
    return unique, aliases


def _optimizer_manifest(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIMIZER_PREFIX}state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {
        "class": reference_of(type(optimizer)),
        "param_groups": state["param_groups"],
        "scalars": scalars,
    }


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


# ---------------------------------------------------------------------------------- restore
def restore(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    teacher_model: nn.Module | None = None,
    trust: Iterable[Any] = (),
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """Return ``model`` as it was saved at ``path``.

    ``model`` is a fresh student (a saved distillation model is rebuilt around it: teacher from
    its recorded spec or ``teacher_model=``, criteria and balancer from the registries) or a model
    already converted with the same config. Code the file names runs only if trusted (see
    :mod:`kdcore.references`); ``trust`` adds ``"module:qualname"`` strings or objects.
    Every check runs before the model changes; on error the model is left as it was.
    """
    path = Path(path)
    policy = TrustPolicy(trust, registered=_registered_anywhere)
    model = unwrap(model)
    with contextlib.closing(open_checkpoint(path)) as reader:
        manifest = parse_manifest(reader.manifest, path)
        available = _model_tensors_in(reader.tensors, manifest["aliases"], path)
        if optimizer is not None:
            _check_optimizer(optimizer, manifest, path)
        saved_modes = manifest["modes"]
        converted_here = False
        if saved_modes and not is_distillation_model(model):
            _check_tensors(_student_shapes(model), available, path, partial=True)
            modes = _modes_to_rebuild(saved_modes, teacher_model, path)
            with restoring(policy), warnings.catch_warnings():
                # Said at the original convert; the checkpoint answers it.
                warnings.simplefilter("ignore", NotRecordableWarning)
                try:
                    model = convert(model, modes)
                except KDCoreError as exc:
                    exc.args = (f"{path}: {exc.args[0]}", *exc.args[1:])
                    raise
                except Exception as exc:
                    # Trusted code (a teacher class, a loss) failed on arguments the file gave it.
                    raise CheckpointError(
                        path,
                        f"rebuilding the model from its recorded config failed: {exc!r}; the file "
                        "is damaged or was written for other code",
                    ) from exc
            converted_here = True
        elif not saved_modes and is_distillation_model(model):
            raise CheckpointMismatchError(
                path,
                "holds a plain student but the model is a distillation model; "
                "pass the student (kd.export(model)) instead",
            )
        try:
            targets = _load_targets(model, saved_modes)
            _check_tensors(
                {name: TensorInfo(t.dtype, tuple(t.shape)) for name, t in targets.items()},
                available,
                path,
                partial=False,
            )
            if optimizer is not None:  # before the model's tensors: a refusal changes nothing
                state = _optimizer_state(optimizer, manifest, reader, path)
                _load_optimizer_state(optimizer, state, path)
        except BaseException:
            if converted_here:
                export(model)
            raise
        with torch.no_grad():
            for name, target in targets.items():
                source = manifest["aliases"].get(name, name)
                reader.load(source, out=target)
    return model


def open_checkpoint(path: Path) -> CheckpointReader:
    """Find the backend whose format ``path`` holds and open it.

    kdcore's own backends are asked first, then the others by name: a plugin cannot take over
    the built-in formats, and one whose ``detect`` raises is skipped with a :class:`PluginWarning`
    naming it, so it cannot break every restore.
    """
    if not path.exists():
        raise CheckpointNotFoundError(path, "no such file or folder")
    backends = registries().checkpoint_backends
    ordered = sorted(
        backends.items(), key=lambda item: item[2].distribution != BUILTIN_DISTRIBUTION
    )
    for name, backend, provider in ordered:
        if provider.distribution == BUILTIN_DISTRIBUTION:
            if backend.detect(path):
                return backend.open(path)  # type: ignore[no-any-return]
            continue
        try:
            claimed = backend.detect(path)
        except Exception as exc:
            warnings.warn(
                f"{_backend_of(name, provider)} raised in detect({str(path)!r}): {exc!r}; it is "
                "skipped",
                PluginWarning,
                stacklevel=3,
            )
            continue
        if claimed:
            try:
                return backend.open(path)  # type: ignore[no-any-return]
            except KDCoreError:
                raise
            except Exception as exc:  # the backend claimed the file: its failure is the answer
                raise CheckpointFormatError(
                    path, f"{_backend_of(name, provider)} failed to open it: {exc!r}"
                ) from exc
    raise CheckpointFormatError(path, _describe_unknown(path, backends.names()))


def _backend_of(name: str, provider: Provider) -> str:
    return f"checkpoint backend {name!r} of {provider}"


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Nothing at the path."""


def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the checkpoint at ``path``, a summary of its tensors by group, and the
    problems for which ``kd.restore`` would refuse the manifest.

    Reads the header only (no tensor data) and runs nothing the file names. Raises a kdcore
    error only when ``path`` is not a checkpoint (no backend reads it, or it holds no kdcore
    manifest); a damaged manifest is returned as far as it parses, its problems under
    ``"problems"``.
    """
    path = Path(path)
    with contextlib.closing(open_checkpoint(path)) as reader:
        text = reader.manifest
        groups: dict[str, dict[str, int]] = {}
        for name, info in reader.tensors.items():
            group = _tensor_group(name)
            entry = groups.setdefault(group, {"tensors": 0, "parameters": 0, "bytes": 0})
            count = math.prod(info.shape)
            entry["tensors"] += 1
            entry["parameters"] += count
            entry["bytes"] += count * info.dtype.itemsize
        files = _file_locations(path, getattr(reader, "files", None) or [path])
    try:
        manifest = _manifest_json(text, path)
    except CheckpointFormatError as exc:
        return {
            "path": str(path),
            "manifest": None,
            "problems": [exc.problem],
            "tensor_groups": groups,
            "files": files,
        }
    problems = [problem for _, problem in _manifest_problems(manifest)]
    if not problems:
        problems = _recorded_config_problems(manifest)
    return {
        "path": str(path),
        "manifest": manifest,
        "problems": problems,
        "tensor_groups": groups,
        "files": files,
    }


def _recorded_config_problems(manifest: dict[str, Any]) -> list[str]:
    """What ``inspect`` shows of each mode's config, in the form ``kd.save`` records it; the
    rest of a config is checked by ``kd.restore`` when it rebuilds the model."""
    problems = []
    for index, mode in enumerate(manifest["modes"]):
        config = mode["config"] or {}
        criterion = config.get("criterion")
        pairs_ok = isinstance(criterion, list) and all(
            isinstance(pair, dict)
            and set(pair) == {"student", "teacher", "loss"}
            and isinstance(pair["student"], str)
            and isinstance(pair["teacher"], str)
            for pair in criterion
        )
        if "criterion" in config and criterion is not None and not pairs_ok:
            problems.append(
                f"manifest modes[{index}].config.criterion is {reprlib.repr(criterion)}, not a "
                "list of {student, teacher, loss} pairs"
            )
    optimizer = manifest.get("optimizer")  # a manifest may leave it out
    if optimizer is not None and not isinstance(optimizer.get("class"), str):
        problems.append("manifest 'optimizer' names no class")
    return problems


def _file_locations(path: Path, files: list[Path]) -> list[dict[str, Any]]:
    """Each file of the checkpoint: its name in it, where it really is (symlinks resolved), and
    whether that is outside the checkpoint's folder. Reading follows symlinks (Hugging Face
    caches link shards into a blob store); this shows where they lead."""
    root = path if path.is_dir() else path.parent
    real_root = os.path.realpath(root)
    locations = []
    for file in files:
        location = os.path.realpath(file)
        try:
            outside = os.path.commonpath([real_root, location]) != real_root
        except ValueError:  # another drive (Windows)
            outside = True
        name = os.path.relpath(file, root)
        locations.append({"name": name, "location": location, "outside": outside})
    return locations


def _tensor_group(name: str) -> str:
    for prefix, group in (
        (OPTIMIZER_PREFIX, "optimizer"),
        (f"{TEACHER}.", "teacher"),
        (f"{LOSS_MODULES}.", "loss modules"),
        (f"{BALANCER}.", "balancer"),
    ):
        if name.startswith(prefix):
            return group
    return "student"


def _describe_unknown(path: Path, backends: list[str]) -> str:
    if path.is_file():
        with open_regular(path) as file:
            head = file.read(4)
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            return "is a pickle file; kdcore never unpickles (re-save it with kd.save)"
        if head == b"PK\x03\x04":
            return "is a zip archive (torch.save output?); kdcore never unpickles"
    return f"is not a checkpoint any installed backend reads ({', '.join(backends)})"


def parse_manifest(text: str, path: Path) -> dict[str, Any]:
    """Check the manifest's shape and version; return it as a dict."""
    manifest = _manifest_json(text, path)
    for error, problem in _manifest_problems(manifest):
        raise error(path, problem)
    return manifest  # type: ignore[no-any-return]


def _manifest_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys)
    except DuplicateKeyError as exc:
        raise CheckpointFormatError(
            path, f"duplicate key {exc.args[0]!r} in the manifest"
        ) from None
    except (TypeError, ValueError) as exc:
        raise CheckpointFormatError(path, f"the manifest is not valid JSON ({exc})") from None
    except RecursionError:  # json gives up on deep nesting with RecursionError, not ValueError
        raise CheckpointFormatError(path, "the manifest nests too deeply") from None


def _manifest_problems(manifest: Any) -> list[tuple[type[CheckpointError], str]]:
    """Each problem of a parsed manifest, in the order ``parse_manifest`` reports the first."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return [(CheckpointFormatError, "has no kdcore manifest (not written by kd.save)")]
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        return [(CheckpointFormatError, f"format_version must be an integer, got {version!r}")]
    if version > FORMAT_VERSION:  # the rest may mean something else in that format
        problem = (
            f"was written by kdcore {manifest.get('kdcore_version')!r} in checkpoint format "
            f"{version}; this kdcore ({_kdcore_version()}) reads up to format {FORMAT_VERSION}: "
            "upgrade kdcore"
        )
        return [(CheckpointVersionError, problem)]
    problems: list[tuple[type[CheckpointError], str]] = []

    def bad(problem: str) -> None:
        problems.append((CheckpointFormatError, problem))

    expected_types: dict[str, type | tuple[type, ...]] = {
        "modes": list,
        "aliases": dict,
        "optimizer": (dict, type(None)),
    }
    for key, types in expected_types.items():
        if not isinstance(manifest.get(key), types):
            bad(f"manifest {key!r} has the wrong type")
    modes = manifest.get("modes")
    for index, mode in enumerate(modes if isinstance(modes, list) else []):
        valid = (
            isinstance(mode, dict)
            and isinstance(mode.get("name"), str)
            and isinstance(mode.get("config"), (dict, type(None)))
            and isinstance(mode.get("missing"), list)
            and isinstance(mode.get("teacher_weights"), bool)
        )
        if not valid:
            bad(f"manifest modes[{index}] is malformed")
            continue
        for entry in mode["missing"]:
            if not (
                isinstance(entry, list)
                and len(entry) == 2
                and all(isinstance(e, str) for e in entry)
            ):
                bad(
                    f"manifest modes[{index}].missing holds {reprlib.repr(entry)}; expected "
                    "[config path, reason] pairs of strings"
                )
                break
    aliases = manifest.get("aliases")
    if isinstance(aliases, dict) and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        bad("manifest 'aliases' must map names to names")
    return problems


def _modes_to_rebuild(
    saved_modes: list[dict[str, Any]], teacher_model: nn.Module | None, path: Path
) -> list[tuple[str, Any]]:
    modes = []
    for mode in saved_modes:
        config = dict(mode["config"] or {})
        for where, why in mode["missing"]:
            if where.endswith(".teacher_model") and teacher_model is not None:
                continue
            hint = (
                "pass teacher_model= to kd.restore"
                if where.endswith(".teacher_model")
                else ("convert the model with the same config yourself, then call kd.restore on it")
            )
            raise CheckpointError(path, f"{where} could not be recorded ({why}); {hint}")
        if teacher_model is not None and "teacher_model" in config:
            config["teacher_model"] = teacher_model
        modes.append((mode["name"], config))
    return modes


def _student_shapes(model: nn.Module) -> dict[str, TensorInfo]:
    return {n: TensorInfo(t.dtype, tuple(t.shape)) for n, t in model.state_dict().items()}


def _load_targets(model: nn.Module, saved_modes: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The model's tensors the checkpoint fills (parameters and buffers, by state-dict name)."""
    if not is_distillation_model(model):
        return dict(model.state_dict(keep_vars=True))
    keep_teacher = any(mode["teacher_weights"] for mode in saved_modes)
    with model.hide_teacher_model(not keep_teacher):
        return dict(nn.Module.state_dict(model, keep_vars=True))


def _model_tensors_in(
    stored: Mapping[str, TensorInfo], aliases: dict[str, str], path: Path
) -> dict[str, TensorInfo]:
    """The model's tensors the file holds: those stored, and the aliases of tied ones.

    An alias names a stored tensor directly, as ``kd.save`` writes them: a chain (an alias of an
    alias) or a cycle is refused rather than followed, and so is an alias that is also stored.
    """
    available = {
        name: info for name, info in stored.items() if not name.startswith(OPTIMIZER_PREFIX)
    }
    for alias, target in aliases.items():
        if target in aliases:
            raise CheckpointFormatError(
                path,
                f"alias {alias!r} names {target!r}, which is itself an alias; an alias must name "
                "a stored tensor",
            )
        if target not in available:
            raise CheckpointFormatError(path, f"alias {alias!r} names missing tensor {target!r}")
        if alias in stored:
            raise CheckpointFormatError(path, f"alias {alias!r} is also a stored tensor")
    return available | {alias: available[target] for alias, target in aliases.items()}


def _check_tensors(
    expected: Mapping[str, TensorInfo],
    available: Mapping[str, TensorInfo],
    path: Path,
    *,
    partial: bool,
) -> None:
    """Every expected tensor is in the file with its shape; ``partial``: ignore kdcore's own."""
    kd_prefixes = tuple(f"{name}." for name in (TEACHER, LOSS_MODULES, BALANCER))
    for name, info in expected.items():
        if name not in available:
            raise CheckpointMismatchError(path, f"has no tensor {name!r}, which the model needs")
        if tuple(available[name].shape) != info.shape:
            raise CheckpointMismatchError(
                path,
                f"tensor {name!r} has shape {list(available[name].shape)} in the file but "
                f"{list(info.shape)} in the model",
            )
        if _dtype_kind(available[name].dtype) != _dtype_kind(info.dtype):
            # Precision may differ (loading copies with a cast), but a bool or integer tensor
            # read into a float one, or the reverse, is a damaged or foreign file.
            raise CheckpointMismatchError(
                path,
                f"tensor {name!r} is {available[name].dtype} in the file but {info.dtype} in the "
                "model",
            )
    for name in available:
        if name not in expected and not (partial and name.startswith(kd_prefixes)):
            raise CheckpointMismatchError(path, f"holds tensor {name!r}, which the model lacks")


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating point"
    return "bool" if dtype == torch.bool else "integer"


def _check_optimizer(
    optimizer: torch.optim.Optimizer, manifest: dict[str, Any], path: Path
) -> None:
    saved = manifest.get("optimizer")  # left out: none saved
    if saved is None:
        raise CheckpointMismatchError(path, "holds no optimizer state (save with optimizer=)")
    groups, scalars = saved.get("param_groups"), saved.get("scalars")
    if not isinstance(groups, list) or not isinstance(scalars, dict):
        raise CheckpointFormatError(path, "manifest 'optimizer' is malformed")
    seen: set[int] = set()
    for index, group in enumerate(groups):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(_is_index(p) for p in params):
            raise CheckpointFormatError(
                path, f"manifest optimizer param_groups[{index}] has no 'params' list of indices"
            )
        for parameter in params:
            if parameter in seen:  # torch would map both to one parameter, the other stateless
                raise CheckpointFormatError(
                    path, f"manifest optimizer param_groups list parameter index {parameter} twice"
                )
            seen.add(parameter)
    for index, values in scalars.items():
        if not (_is_index_text(index) and isinstance(values, dict)):
            raise CheckpointFormatError(
                path, f"manifest optimizer scalars[{index!r}] must map a parameter index to a dict"
            )
    ours = [len(group["params"]) for group in optimizer.param_groups]
    theirs = [len(group["params"]) for group in groups]
    if ours != theirs:
        raise CheckpointMismatchError(
            path, f"optimizer parameter groups hold {theirs} parameters, the given optimizer {ours}"
        )
    for index, (group, given) in enumerate(zip(groups, optimizer.param_groups, strict=True)):
        for key, value in group.items():
            if key != "params" and key in given and not _same_kind(value, given[key]):
                raise CheckpointFormatError(
                    path,
                    f"manifest optimizer param_groups[{index}].{key} is {reprlib.repr(value)}, "
                    f"where the given optimizer holds {reprlib.repr(given[key])}",
                )


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_index_text(value: Any) -> bool:
    return isinstance(value, str) and value.isdecimal() and value.isascii()


def _same_kind(saved: Any, given: Any) -> bool:
    """A saved hyperparameter has the JSON type of the optimizer's own (None matches any)."""
    if saved is None or given is None:
        return True
    if isinstance(given, bool) or isinstance(saved, bool):
        return isinstance(given, bool) and isinstance(saved, bool)
    if isinstance(given, (int, float, torch.Tensor)):
        return isinstance(saved, (int, float))
    if isinstance(given, (list, tuple)):
        return (
            isinstance(saved, list)
            and len(saved) == len(given)
            and all(_same_kind(s, g) for s, g in zip(saved, given, strict=True))
        )
    return isinstance(saved, type(given))


def _optimizer_state(
    optimizer: torch.optim.Optimizer, manifest: dict[str, Any], reader: CheckpointReader, path: Path
) -> dict[str, Any]:
    """The saved state as ``optimizer.load_state_dict`` takes it, every tensor checked against
    its parameter before any is read (torch checks only what it uses, at the next ``step()``)."""
    saved = manifest["optimizer"]
    # load_state_dict maps the saved indices to the given parameters by position in the groups
    parameters = {
        str(index): parameter
        for index, parameter in zip(
            chain.from_iterable(group["params"] for group in saved["param_groups"]),
            chain.from_iterable(group["params"] for group in optimizer.param_groups),
            strict=True,
        )
    }
    state: dict[int, dict[str, Any]] = {}
    for index, values in saved["scalars"].items():
        if index not in parameters:
            raise CheckpointFormatError(path, _unheld(f"optimizer scalars[{index!r}]", index))
        state.setdefault(int(index), {}).update(values)
    tensors: dict[str, tuple[str, str]] = {}
    for name, info in reader.tensors.items():
        if not name.startswith(OPTIMIZER_PREFIX):
            continue
        parts = name[len(OPTIMIZER_PREFIX) :].split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not _is_index_text(parts[1]):
            raise CheckpointFormatError(
                path,
                f"tensor {name!r} is not named {OPTIMIZER_PREFIX}state.<parameter index>.<key>",
            )
        if parts[1] not in parameters:
            raise CheckpointFormatError(path, _unheld(f"tensor {name!r}", parts[1]))
        _check_state_tensor(name, info, parts[1], parameters[parts[1]], path)
        tensors[name] = (parts[1], parts[2])
    for name, (index, key) in tensors.items():
        state.setdefault(int(index), {})[key] = reader.load(name)
    return {"state": state, "param_groups": saved["param_groups"]}


def _unheld(what: str, index: str) -> str:
    return f"{what} names parameter index {index}, which no optimizer param_groups entry holds"


def _check_state_tensor(
    name: str, info: TensorInfo, index: str, parameter: torch.Tensor, path: Path
) -> None:
    """A state tensor has its parameter's shape, is a scalar (Adam's ``step``), or holds
    factored statistics (Adafactor's row and column variances: the shape with some sizes 1)."""
    shape, expected = tuple(info.shape), tuple(parameter.shape)
    fits = all(size == 1 for size in shape) or (
        len(shape) == len(expected)
        and all(size in (full, 1) for size, full in zip(shape, expected, strict=True))
    )
    if not fits:
        raise CheckpointFormatError(
            path,
            f"the optimizer state does not fit the given optimizer: tensor {name!r} has shape "
            f"{list(shape)}, but parameter {index} has shape {list(expected)}",
        )
    if shape == expected and _dtype_kind(info.dtype) != _dtype_kind(parameter.dtype):
        raise CheckpointFormatError(
            path,
            f"the optimizer state does not fit the given optimizer: tensor {name!r} is "
            f"{info.dtype}, but parameter {index} is {parameter.dtype}",
        )


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], path: Path
) -> None:
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        # torch checks the state only as far as it uses it; what it refuses, the file broke.
        raise CheckpointFormatError(
            path, f"the optimizer state does not fit the given optimizer ({exc!r})"
        ) from exc
    _shard_state_like_parameters(optimizer)


def _shard_state_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """The file holds whole state tensors; a parameter FSDP2 sharded (a DTensor) needs its
    state sharded the same way. Each rank keeps its own slice of what it read: no traffic."""
    if "torch.distributed.tensor" not in sys.modules:  # then no parameter can be a DTensor
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter)
            if not isinstance(parameter, DTensor) or not state:
                continue
            for key, value in state.items():
                if type(value) is torch.Tensor and value.shape == parameter.shape:
                    state[key] = distribute_tensor(
                        value.to(parameter.device),
                        parameter.device_mesh,
                        parameter.placements,
                        src_data_rank=None,
                    )


def _registered_anywhere(obj: Any) -> bool:
    all_registries = registries()
    return any(registry.name_of(obj) is not None for _, registry in all_registries.by_hook())


def _kdcore_version() -> str:
    from kdcore import __version__

    return __version__
