"""``kd.save`` and ``kd.restore``: what a checkpoint holds and how a model comes back from one.

A checkpoint is a set of named tensors plus a JSON manifest (format version, kdcore version,
the applied modes recorded as data, optimizer scalars). Backends (plugins) decide how they are
laid out on disk; this module decides what goes in and rebuilds the model, and never unpickles.

Its parts live in private modules and their public names are re-exported here: the backend
contract and errors (``_checkpoint_backend``), the manifest (``_manifest``), optimizer state
(``_optimizer_state``) and atomic file I/O (``_atomic_io``).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore._atomic_io import atomic_write, fsync_folder, open_regular
from kdcore._checkpoint_backend import (
    CheckpointBackend,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointReader,
    CheckpointVersionError,
    CheckpointWriteError,
    TensorInfo,
    dtype_kind,
)
from kdcore._errors import KDCoreError
from kdcore._manifest import (
    FORMAT,
    FORMAT_VERSION,
    Manifest,
    kdcore_version,
    manifest_json,
    manifest_problems,
    manifest_text,
    parse_manifest,
    recorded_config_problems,
)
from kdcore._model import BALANCER, LOSS_MODULES, TEACHER, is_distillation_model
from kdcore._modes import convert, export, unwrap
from kdcore._optimizer_state import (
    OPTIMIZER_PREFIX,
    check_optimizer,
    load_optimizer_state,
    optimizer_manifest,
    optimizer_state,
)
from kdcore._plugin_manager import BUILTIN_DISTRIBUTION, PluginWarning, registries
from kdcore._record import ModeRecord, NotRecordableWarning
from kdcore._references import TrustPolicy, reference_of, restoring
from kdcore._registry import Provider

# What plugins and users import from here; the rest lives in the private modules above.
__all__ = [
    "DEFAULT_BACKEND",
    "FORMAT",
    "FORMAT_VERSION",
    "OPTIMIZER_PREFIX",
    "CheckpointBackend",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointVersionError",
    "CheckpointWriteError",
    "TensorInfo",
    "atomic_write",
    "fsync_folder",
    "inspect_checkpoint",
    "open_checkpoint",
    "open_regular",
    "parse_manifest",
    "restore",
    "save",
]

DEFAULT_BACKEND = "safetensors"


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
    records = _records(model)
    for record in records:  # said here, where it matters: restore will need these handed over
        for where, why in record.missing:
            warnings.warn(f"{where}: {why}", NotRecordableWarning, stacklevel=2)
    tensors, aliases = _deduplicated(_model_tensors(model))
    manifest = Manifest(
        kdcore_version=kdcore_version(),
        student_class=reference_of(
            model._kd.original_class if is_distillation_model(model) else type(model)
        ),
        modes=records,
        aliases=aliases,
        optimizer=None if optimizer is None else optimizer_manifest(optimizer, tensors),
    )
    try:
        text = manifest_text(manifest)
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
    :mod:`kdcore._references`); ``trust`` adds ``"module:qualname"`` strings or objects.
    Every check runs before the model changes; on error the model is left as it was.
    """
    path = Path(path)
    policy = TrustPolicy(trust, registered=_registered_anywhere)
    model = unwrap(model)
    with contextlib.closing(open_checkpoint(path)) as reader:
        manifest = parse_manifest(reader.manifest, path)
        available = _model_tensors_in(reader.tensors, manifest["aliases"], path)
        if optimizer is not None:
            check_optimizer(optimizer, manifest, path)
        saved_modes = manifest["modes"]
        converted_here = False
        if saved_modes and not is_distillation_model(model):
            _check_tensors(_student_shapes(model), available, path, partial=True)
            modes = _modes_to_rebuild(saved_modes, teacher_model, path)
            with restoring(policy):
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
                state = optimizer_state(optimizer, manifest, reader, path)
                load_optimizer_state(optimizer, state, path)
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
        manifest = manifest_json(text, path)
    except CheckpointFormatError as exc:
        return {
            "path": str(path),
            "manifest": None,
            "problems": [exc.problem],
            "tensor_groups": groups,
            "files": files,
        }
    problems = [problem for _, problem in manifest_problems(manifest)]
    if not problems:
        problems = recorded_config_problems(manifest)
    return {
        "path": str(path),
        "manifest": manifest,
        "problems": problems,
        "tensor_groups": groups,
        "files": files,
    }


def _file_locations(path: Path, files: list[Path]) -> list[dict[str, Any]]:
    """Each file of the checkpoint: its name in it, where it really is (symlinks resolved), and
    whether that is outside the checkpoint's folder. Reading follows symlinks (Hugging Face
    caches link shards into a blob store); this shows where they lead."""
    root = path if path.is_dir() else path.parent
    real_root = os.path.realpath(root)
    locations = []
    for file in sorted(files):
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
            _check_cache_teacher(config["teacher_model"], teacher_model, path)
            config["teacher_model"] = teacher_model
        modes.append((mode["name"], config))
    return modes


def _check_cache_teacher(recorded: Any, teacher_model: nn.Module, path: Path) -> None:
    """A cached teacher given for a checkpoint trained from a cache must hold the same
    teacher's outputs (another folder is fine: a moved cache)."""
    from kdcore._teacher_cache import TeacherCache

    cache = getattr(teacher_model, "cache", None)
    if not isinstance(cache, TeacherCache) or not isinstance(recorded, dict):
        return
    if recorded.get("name") != "cached" or "teacher_fingerprint" not in recorded:
        return
    for key, value in cache.written_from.items():
        if recorded.get(key) not in (None, value):
            raise CheckpointError(
                path,
                f"teacher_model= is the teacher cache {cache.folder}, whose {key} is {value!r}; "
                f"the checkpoint was trained from a cache with {key} {recorded[key]!r} "
                f"({recorded.get('path')}): pass that teacher's cache",
            )


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
        if dtype_kind(available[name].dtype) != dtype_kind(info.dtype):
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


def _registered_anywhere(obj: Any) -> bool:
    all_registries = registries()
    return any(registry.name_of(obj) is not None for _, registry in all_registries.by_hook())
