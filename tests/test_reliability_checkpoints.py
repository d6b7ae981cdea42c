"""Hostile and damaged checkpoints: restore refuses each with a kdcore error naming the problem,
runs nothing the file names, and allocates no more than the file's size.

"Runs nothing" is checked three ways: every malicious callable, if called, would create a
sentinel file; an audit hook (``sys.addaudithook``) records any process spawn, ``exec``/``eval``,
unpickling (``pickle.find_class``) or file opened for writing during the restore; and no module
a file names gets imported. "Allocates no more than the file's size" is measured for Python
objects with ``tracemalloc`` and, for tensors, by counting every ``torch.empty`` the readers make.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import sys
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from kdcore_builtins import dcp_backend, safetensors_format
from torch import nn

import kdcore as kd
from kdcore._manifest import parse_manifest  # the parser alone, fuzzed fast (restore runs it first)
from kdcore.plugin import CheckpointNotFoundError
from tests.conftest import (
    JSON,
    TinyNet,
    crafted_manifest,
    make_teacher,
    manifests,
    nothing_runs,
    trained_model,
    write_raw,
)


@pytest.fixture(scope="module", autouse=True)
def _warm_up(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Load the plugins and let attrs/cattrs generate their code before anything is watched:
    the first restore of a process imports kdcore's own modules, which is not the file's doing."""
    folder = tmp_path_factory.mktemp("warm-up")
    for mode, criterion in [("kd_loss", {"name": "logits"}), ("layerwise_kd", None)]:
        pairs = criterion or [{"student": "fc1", "teacher": "fc1", "loss": {"name": "mse"}}]
        config = {"teacher_model": make_teacher, "criterion": pairs}
        model = kd.convert(TinyNet(), [(mode, config)])
        for backend in ("safetensors", "safetensors-sharded", "torch-dcp"):
            path = kd.save(model, folder / f"{mode}-{backend}", backend=backend)
            kd.restore(TinyNet(), path)
    kd.restore(TinyNet(), kd.save(TinyNet(), folder / "plain.safetensors"))


# ================================================================== building checkpoints
def raw_file(header: bytes | str, data: bytes = b"", length: int | None = None) -> bytes:
    header = header.encode() if isinstance(header, str) else header
    return (len(header) if length is None else length).to_bytes(8, "little") + header + data


def with_manifest(
    path: Path, manifest: Any, tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    return write_raw(path, TinyNet().state_dict() if tensors is None else tensors, {"kdcore": text})


# ================================================================== measuring allocations
class _CountingTorch:
    """Stands in for ``torch`` inside the reader modules; adds up what ``torch.empty`` makes."""

    def __init__(self) -> None:
        self.allocated = 0

    def empty(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = torch.empty(*args, **kwargs)
        self.allocated += tensor.numel() * tensor.element_size()
        return tensor

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


FIXED_COST = 512 * 1024  # Python objects any restore makes (plugins, convert), file or not


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def assert_refused(
    path: Path,
    match: str,
    error: type[Exception] = kd.KDCoreError,
    *,
    optimizer: bool = False,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> kd.KDCoreError:
    """restore refuses ``path`` with ``error`` matching ``match``, naming the file; runs nothing;
    leaves the student alone; allocates (Python objects and tensors) at most the file's size."""
    student = TinyNet()
    before = {name: value.clone() for name, value in student.state_dict().items()}
    counting = _CountingTorch()
    with contextlib.ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for module in (safetensors_format, dcp_backend):
            patch.setattr(module, "torch", counting)
        tracemalloc.start()
        try:
            with nothing_runs(), pytest.raises(error, match=match) as info:
                kd.restore(
                    student,
                    path,
                    optimizer=torch.optim.Adam(student.parameters()) if optimizer else None,
                )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    size = folder_size(path)
    assert isinstance(info.value, kd.KDCoreError)
    assert str(path) in str(info.value), "the error names the file"
    assert type(student) is TinyNet, "the student was left as it was"
    assert all(torch.equal(before[n], v) for n, v in student.state_dict().items())
    assert counting.allocated <= size, f"tensors of {counting.allocated} bytes for {size}"
    # The header is read (its bytes) and decoded (a str) before json parses it: 3x covers both
    # and what it parses into; the tensor data itself goes straight into tensors, counted above.
    assert peak <= 3 * size + FIXED_COST, f"Python allocations peaked at {peak} for {size} bytes"
    return info.value


# ================================================================== 1. references
SENTINEL_ENV = "KDCORE_RELIABILITY_SENTINEL"


def plant_flag(*args: Any, **kwargs: Any) -> nn.Module:
    """A plain importable function, not marked as a teacher factory: a file may not call it."""
    Path(os.environ[SENTINEL_ENV]).write_text("ran")
    return TinyNet(width=16)


class NotAModule:
    """An importable class that is not an nn.Module: a file may not construct it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Path(os.environ[SENTINEL_ENV]).write_text("ran")


def calls_for(target: str, sentinel: Path) -> list[Any]:
    """Arguments with which ``target``, if called, would create ``sentinel``."""
    shell = f"touch {sentinel}"
    code = f"open({str(sentinel)!r}, 'w').close()"
    return {
        "os:system": [shell],
        "posix:system": [shell],
        "os:popen": [shell],
        "builtins:eval": [code],
        "builtins:exec": [code],
        "builtins:__import__": ["antigravity"],
        "subprocess:Popen": [["touch", str(sentinel)]],
        "subprocess:run": [["touch", str(sentinel)]],
        "subprocess:check_output": [["touch", str(sentinel)]],
        "importlib:import_module": ["antigravity"],
        "pathlib:Path.write_text": [str(sentinel), "ran"],
        "shutil:copyfile": [__file__, str(sentinel)],
        "torch:load": [str(sentinel)],
        "pickle:loads": [list(pickle.dumps(0))],
    }.get(target, [])


MALICIOUS = [
    "os:system",
    "posix:system",
    "os:popen",
    "builtins:eval",
    "builtins:exec",
    "builtins:__import__",
    "subprocess:Popen",
    "subprocess:run",
    "subprocess:check_output",
    "importlib:import_module",
    "pathlib:Path.write_text",
    "shutil:copyfile",
    "torch:load",
    "pickle:loads",
    "tests.test_reliability_checkpoints:plant_flag",
    "tests.test_reliability_checkpoints:NotAModule",
    "antigravity:fly",  # a module not imported: not imported by restore either
]


def _teacher_factory(manifest: dict[str, Any], target: str, args: list[Any]) -> None:
    manifest["modes"][0]["config"]["teacher_model"] = {
        "name": "callable",
        "target": target,
        "args": args,
    }


def _teacher_loader(manifest: dict[str, Any], target: str, args: list[Any]) -> None:
    manifest["modes"][0]["config"]["teacher_model"] = {"name": target}


def _ensemble_member(manifest: dict[str, Any], target: str, args: list[Any]) -> None:
    manifest["modes"][0]["config"]["teacher_model"] = {
        "good": {"name": "callable", "target": "tests.conftest:make_teacher"},
        "evil": {"name": "callable", "target": target, "args": args},
    }


def _criterion_loss(manifest: dict[str, Any], target: str, args: list[Any]) -> None:
    manifest["modes"][0]["config"]["criterion"][0]["loss"] = {"name": target}


def _whole_model_criterion(manifest: dict[str, Any], target: str, args: list[Any]) -> None:
    manifest["modes"][0]["config"]["criterion"] = {"name": target}


def _balancer(manifest: dict[str, Any], target: str, args: list[Any]) -> None:
    manifest["modes"][0]["config"]["loss_balancer"] = {"name": target}


def _mode_name(manifest: dict[str, Any], target: str, args: list[Any]) -> None:
    manifest["modes"][0]["name"] = target


def _layerwise_loss(manifest: dict[str, Any], target: str, args: list[Any]) -> None:
    manifest["modes"][0]["name"] = "layerwise_kd"
    manifest["modes"][0]["config"]["criterion"] = [
        {"student": "fc1", "teacher": "fc1", "loss": {"name": target}}
    ]


REFUSING_PLACES: dict[str, Callable[[dict[str, Any], str, list[Any]], None]] = {
    "teacher factory": _teacher_factory,
    "teacher loader": _teacher_loader,
    "ensemble member": _ensemble_member,
    "criterion loss": _criterion_loss,
    "whole-model criterion": _whole_model_criterion,
    "loss balancer": _balancer,
    "mode name": _mode_name,
    "layerwise_kd loss": _layerwise_loss,
}


@pytest.fixture
def sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "SENTINEL"
    monkeypatch.setenv(SENTINEL_ENV, str(path))
    yield path
    assert not path.exists(), "a malicious callable ran"
    assert "antigravity" not in sys.modules


@pytest.mark.parametrize("place", list(REFUSING_PLACES))
def test_a_reference_to_non_model_code_is_refused_in_every_place(
    tmp_path: Path, sentinel: Path, place: str
) -> None:
    """17 references x 8 places of the manifest: each refused by name, none run or imported."""
    for target in MALICIOUS:
        manifest = crafted_manifest()
        REFUSING_PLACES[place](manifest, target, calls_for(target, sentinel))
        path = with_manifest(tmp_path / "evil.safetensors", manifest)
        error = assert_refused(
            path, "evil", (kd.UntrustedReferenceError, kd.UnknownPluginError, kd.ConfigError)
        )
        if place == "mode name":  # looked up in the mode registry only, never resolved
            assert isinstance(error, kd.UnknownPluginError) and f"unknown mode {target!r}" in str(
                error
            )
        else:
            assert isinstance(error, kd.UntrustedReferenceError), (target, error)
            assert repr(target) in str(error) and "trust=" in str(error)


@pytest.mark.parametrize("field", ["student_class", "optimizer class"])
def test_informative_references_are_never_resolved(
    tmp_path: Path, sentinel: Path, field: str
) -> None:
    """``student_class`` and the optimizer's ``class`` only inform: restore never looks them up."""
    for target in MALICIOUS:
        manifest = crafted_manifest(modes=[])
        if field == "student_class":
            manifest["student_class"] = target
        else:
            manifest["optimizer"] = {
                "class": target,
                "param_groups": [{"params": [0, 1, 2, 3], "lr": 0.001}],
                "scalars": {},
            }
        path = with_manifest(tmp_path / "informative.safetensors", manifest)
        student = TinyNet()
        optimizer = torch.optim.Adam(student.parameters()) if manifest["optimizer"] else None
        with nothing_runs():
            kd.restore(student, path, optimizer=optimizer)


def test_trusted_code_failing_on_arguments_from_the_file_is_a_checkpoint_error(
    tmp_path: Path, sentinel: Path
) -> None:
    """An nn.Module class is trusted, but a file can hand it arguments it chokes on."""
    manifest = crafted_manifest()
    manifest["modes"][0]["config"]["teacher_model"] = {
        "name": "callable",
        "target": "tests.conftest:TinyNet",
        "kwargs": {"width": -1},
    }
    path = with_manifest(tmp_path / "bad-args.safetensors", manifest)
    assert_refused(
        path,
        r"rebuilding the model from its recorded config failed: RuntimeError\(.*negative dimension",
        kd.CheckpointError,
    )


# ================================================================== 2. pickles everywhere
class Boom:
    """Creates the sentinel when unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.target}",))


def torch_save_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _dcp_folder(folder: Path) -> Path:
    return folder / json.loads((folder / "kdcore-dcp.json").read_text())["checkpoint"]


PICKLE_PLACES = {
    # (backend, file to replace, what the error names)
    "the .safetensors file": ("safetensors", lambda p: p, "never unpickles"),
    "a shard": (
        "safetensors-sharded",
        lambda p: p / "model-00001-of-00002.safetensors",
        "header length .* is larger than the file",
    ),
    "the shard index": (
        "safetensors-sharded",
        lambda p: p / "model.safetensors.index.json",
        "index is not valid JSON",
    ),
    "the DCP .metadata": (
        "torch-dcp",
        lambda p: _dcp_folder(p) / ".metadata",
        "refers to posix.system|is not a valid pickle",
    ),
    "a .distcp file": (
        "torch-dcp",
        lambda p: _dcp_folder(p) / "__0_0.distcp",
        "truncated",
    ),
    "the kdcore-dcp.json marker": (
        "torch-dcp",
        lambda p: p / "kdcore-dcp.json",
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("place", list(PICKLE_PLACES))
@pytest.mark.parametrize("wrapping", ["pickle", "torch.save"])
def test_a_pickle_under_any_file_name_is_never_unpickled(
    tmp_path: Path, sentinel: Path, place: str, wrapping: str
) -> None:
    backend, file_of, match = PICKLE_PLACES[place]
    options = {"max_shard_size": 200} if backend == "safetensors-sharded" else {}
    path = kd.save(TinyNet(), tmp_path / "run", backend=backend, **options)
    target = file_of(path)
    payload = Boom(sentinel)
    target.write_bytes(
        pickle.dumps(payload, protocol=4) if wrapping == "pickle" else torch_save_bytes(payload)
    )
    if wrapping == "torch.save" and place == "the .safetensors file":
        match = "zip archive"
    assert_refused(path, match, kd.CheckpointFormatError)


# ================================================================== 3. damaged safetensors
HEADERS: dict[str, tuple[bytes, str]] = {
    "header length 2**64-1": (raw_file("{}", length=2**64 - 1), "larger than the file"),
    "header length 2**63": (raw_file("{}", length=2**63), "larger than the file"),
    "header length 10**12": (raw_file('{"a": 1}', length=10**12), "larger than the file"),
    "header length one past the end": (
        raw_file('{"a":1}  ', length=10),
        "header length 10 is larger than the file",
    ),
    "header length shorter than its JSON": (
        raw_file('{"__metadata__":{"kdcore":"x"}}', length=5),
        "not valid JSON",
    ),
    "invalid JSON": (raw_file("{not json}     "), "not valid JSON"),
    "invalid UTF-8": (raw_file(b"{\xff\xfe}    "), "not valid JSON"),
    "JSON nesting 100k deep": (
        raw_file('{"a":' * 100_000 + "1" + "}" * 100_000),
        "nests too deeply",
    ),
    "header is a list": (raw_file(b"{}" + b"        ")[:8] + b"[1]     ", "not valid JSON|not a"),
    "metadata is a list": (raw_file('{"__metadata__":[]}'), "__metadata__ must map strings"),
    "metadata value is a number": (
        raw_file('{"__metadata__":{"kdcore":1}}'),
        "__metadata__ must map strings",
    ),
    "no manifest": (raw_file('{"__metadata__":{"format":"pt"}}'), "without a kdcore manifest"),
    "unknown dtype": (
        raw_file('{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}', bytes(16)),
        "unknown dtype 'F128'",
    ),
    "dtype of the wrong type": (
        raw_file('{"a":{"dtype":7,"shape":[1],"data_offsets":[0,4]}}', bytes(4)),
        "unknown dtype 7",
    ),
    "negative shape": (
        raw_file('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', bytes(4)),
        "shape must be a list of non-negative ints",
    ),
    "shape of floats": (
        raw_file('{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', bytes(4)),
        "shape must be a list",
    ),
    "shape is a string": (
        raw_file('{"a":{"dtype":"F32","shape":"1","data_offsets":[0,4]}}', bytes(4)),
        "shape must be a list",
    ),
    "byte length does not fit the shape": (
        raw_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', bytes(4)),
        r"4 bytes stored for shape \[2\] of F32 \(8 bytes needed\)",
    ),
    "a huge shape": (
        raw_file(
            '{"a":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4398046511104]}}',
            bytes(8),
        ),
        "ends at data byte 4398046511104 but the file holds 8: truncated",
    ),
    "reversed offsets": (
        raw_file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}', bytes(4)),
        r"data_offsets must be \[begin, end\]",
    ),
    "overlapping tensors": (
        raw_file(
            '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            '"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            bytes(8),
        ),
        "overlaps or leaves gaps",
    ),
    "data beyond the tensors": (
        raw_file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(12)),
        "holds 12 data bytes but its tensors cover 4",
    ),
    "duplicate tensor names": (
        raw_file(
            '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
            bytes(8),
        ),
        "duplicate tensor name 'a'",
    ),
    "an entry with extra keys": (
        raw_file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}', bytes(4)),
        "entry must have dtype, shape and data_offsets",
    ),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_a_damaged_header_is_refused_naming_the_problem(tmp_path: Path, case: str) -> None:
    data, match = HEADERS[case]
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(data)
    assert_refused(path, match, kd.CheckpointFormatError)


def test_a_header_claiming_a_huge_length_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """The length is checked against the file's size first: nothing near it is allocated."""
    path = tmp_path / "huge.safetensors"
    path.write_bytes(raw_file('{"a": 1}', length=2**62))
    tracemalloc.start()
    try:
        with pytest.raises(kd.CheckpointFormatError, match="larger than the file"):
            kd.restore(TinyNet(), path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < FIXED_COST


def _tensors_as(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: value.to(dtype) for name, value in TinyNet().state_dict().items()}


MANIFESTS: dict[str, tuple[Any, str, type[Exception]]] = {
    "manifest is invalid JSON": (
        "{not json",
        "manifest is not valid JSON",
        kd.CheckpointFormatError,
    ),
    "manifest nests 100k deep": (
        "[" * 100_000,
        "manifest nests too deeply",
        kd.CheckpointFormatError,
    ),
    "manifest is a list": ("[]", "has no kdcore manifest", kd.CheckpointFormatError),
    "format is wrong": (
        crafted_manifest(format="x"),
        "has no kdcore manifest",
        kd.CheckpointFormatError,
    ),
    "format_version is a string": (
        crafted_manifest(format_version="1"),
        "format_version must be an integer, got '1'",
        kd.CheckpointFormatError,
    ),
    "format_version is a bool": (
        crafted_manifest(format_version=True),
        "format_version must be an integer",
        kd.CheckpointFormatError,
    ),
    "format_version from the future": (
        crafted_manifest(format_version=2**70),
        "reads up to format 1: upgrade kdcore",
        kd.CheckpointVersionError,
    ),
    "modes is a dict": (
        crafted_manifest(modes={"kd_loss": {}}),
        "manifest 'modes' has the wrong type",
        kd.CheckpointFormatError,
    ),
    "a mode is a string": (
        crafted_manifest(modes=["kd_loss"]),
        r"modes\[0\] is malformed",
        kd.CheckpointFormatError,
    ),
    "teacher_weights is a string": (
        crafted_manifest(
            modes=[{"name": "kd_loss", "config": {}, "missing": [], "teacher_weights": "no"}]
        ),
        r"modes\[0\] is malformed",
        kd.CheckpointFormatError,
    ),
    "a missing entry is a number": (
        crafted_manifest(
            modes=[{"name": "kd_loss", "config": {}, "missing": [1], "teacher_weights": False}]
        ),
        r"modes\[0\]\.missing holds 1",
        kd.CheckpointFormatError,
    ),
    "a missing entry is short": (
        crafted_manifest(
            modes=[{"name": "kd_loss", "config": {}, "missing": [["x"]], "teacher_weights": False}]
        ),
        r"modes\[0\]\.missing holds \['x'\]",
        kd.CheckpointFormatError,
    ),
    "aliases map to numbers": (
        crafted_manifest(aliases={"a": 1}),
        "'aliases' must map names to names",
        kd.CheckpointFormatError,
    ),
    "an alias names a missing tensor": (
        crafted_manifest(aliases={"fc1.weight": "nope"}),
        "alias 'fc1.weight' names missing tensor 'nope'",
        kd.CheckpointFormatError,
    ),
    "optimizer is a list": (
        crafted_manifest(optimizer=[]),
        "manifest 'optimizer' has the wrong type",
        kd.CheckpointFormatError,
    ),
    "mode config has a typo": (
        crafted_manifest(
            modes=[
                {
                    "name": "kd_loss",
                    "config": {
                        "teacher_model": {"name": "callable", "target": "tests.conftest:TinyNet"},
                        "teacher_modle": {},
                        "criterion": {"name": "logits"},
                    },
                    "missing": [],
                    "teacher_weights": False,
                }
            ]
        ),
        r"kd_loss\.teacher_modle: unknown key; did you mean 'teacher_model'",
        kd.ConfigError,
    ),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_a_damaged_manifest_is_refused_naming_the_problem(tmp_path: Path, case: str) -> None:
    manifest, match, error = MANIFESTS[case]
    path = with_manifest(tmp_path / "damaged.safetensors", manifest)
    assert_refused(path, match, error)


OPTIMIZERS: dict[str, tuple[Any, dict[str, torch.Tensor], str]] = {
    "param_groups is a string": (
        {"param_groups": "x", "scalars": {}},
        {},
        "manifest 'optimizer' is malformed",
    ),
    "a group is a number": (
        {"param_groups": [1], "scalars": {}},
        {},
        r"param_groups\[0\] has no 'params' list of indices",
    ),
    "params is a number": (
        {"param_groups": [{"params": 4}], "scalars": {}},
        {},
        r"param_groups\[0\] has no 'params' list",
    ),
    "a scalars key is not an index": (
        {"param_groups": [{"params": [0, 1, 2, 3]}], "scalars": {"x": {"step": 1}}},
        {},
        r"scalars\['x'\] must map a parameter index to a dict",
    ),
    "lr is a string": (
        {"param_groups": [{"params": [0, 1, 2, 3], "lr": "fast"}], "scalars": {}},
        {},
        r"param_groups\[0\]\.lr is 'fast', where the given optimizer holds 0\.001",
    ),
    "betas of the wrong length": (
        {"param_groups": [{"params": [0, 1, 2, 3], "betas": [0.9]}], "scalars": {}},
        {},
        r"param_groups\[0\]\.betas is \[0\.9\]",
    ),
    "a badly named state tensor": (
        {"param_groups": [{"params": [0, 1, 2, 3]}], "scalars": {}},
        {"__optimizer__.x": torch.ones(1)},
        r"tensor '__optimizer__\.x' is not named __optimizer__\.state\.<parameter index>\.<key>",
    ),
    "state torch cannot take": (
        {"param_groups": [{"params": [0, 1, 2, 3]}], "scalars": {}},
        {"__optimizer__.state.0.exp_avg": torch.ones(7)},
        "the optimizer state does not fit the given optimizer",
    ),
}


@pytest.mark.parametrize("case", list(OPTIMIZERS))
def test_damaged_optimizer_state_is_refused_before_anything_changes(
    tmp_path: Path, case: str
) -> None:
    optimizer, extra, match = OPTIMIZERS[case]
    path = with_manifest(
        tmp_path / "optimizer.safetensors",
        crafted_manifest(modes=[], optimizer=optimizer),
        {**TinyNet().state_dict(), **extra},
    )
    assert_refused(path, match, kd.CheckpointFormatError, optimizer=True)


TENSORS: dict[str, tuple[dict[str, torch.Tensor], str]] = {
    "bool tensors for float weights": (
        _tensors_as(torch.bool),
        r"tensor 'fc1\.weight' is torch\.bool in the file but torch\.float32 in the model",
    ),
    "integer tensors for float weights": (
        _tensors_as(torch.int64),
        "is torch.int64 in the file but torch.float32",
    ),
    "unsigned tensors for float weights": (_tensors_as(torch.uint16), "is torch.uint16"),
    "a tensor of another shape": (
        {**TinyNet().state_dict(), "fc1.weight": torch.zeros(4, 8)},
        r"tensor 'fc1\.weight' has shape \[4, 8\] in the file but \[8, 4\] in the model",
    ),
    "a missing tensor": (
        {k: v for k, v in TinyNet().state_dict().items() if k != "fc2.bias"},
        "has no tensor 'fc2.bias', which the model needs",
    ),
    "an extra tensor": (
        {**TinyNet().state_dict(), "fc3.weight": torch.zeros(1)},
        "holds tensor 'fc3.weight', which the model lacks",
    ),
}


@pytest.mark.parametrize("case", list(TENSORS))
def test_tensors_that_do_not_fit_the_model_are_refused(tmp_path: Path, case: str) -> None:
    tensors, match = TENSORS[case]
    path = with_manifest(tmp_path / "tensors.safetensors", crafted_manifest(modes=[]), tensors)
    assert_refused(path, match, kd.CheckpointMismatchError)


def test_lower_precision_tensors_still_load() -> None:
    """The dtype check refuses another kind of number, not another precision."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"half-{os.getpid()}.safetensors"
    try:
        with_manifest(path, crafted_manifest(modes=[]), _tensors_as(torch.float16))
        restored = kd.restore(TinyNet(), path)
        assert restored.fc1.weight.dtype == torch.float32
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    folder = tmp_path_factory.mktemp("saved")
    model, optimizer = trained_model()
    return kd.save(model, folder / "run.safetensors", optimizer=optimizer).read_bytes()


def test_truncation_at_every_offset_of_the_header_and_many_of_the_data(
    tmp_path: Path, saved_bytes: bytes
) -> None:
    header_end = 8 + int.from_bytes(saved_bytes[:8], "little")
    offsets = sorted(
        {*range(0, 64), *range(64, header_end + 16, 7), *range(header_end, len(saved_bytes), 97)}
        - {len(saved_bytes)}
    )
    path = tmp_path / "cut.safetensors"
    for keep in offsets:
        path.write_bytes(saved_bytes[:keep])
        assert_refused(
            path,
            "too short|larger than the file|truncated|not a checkpoint|not valid JSON|data bytes",
            kd.CheckpointFormatError,
        )
    assert len(offsets) > 300


def test_a_missing_path_is_a_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such file or folder"):
        kd.restore(TinyNet(), tmp_path / "nope.safetensors")


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_byte_damage_is_refused_or_harmless(
    tmp_path: Path, saved_bytes: bytes, data: st.DataObject
) -> None:
    """Flip, cut or insert bytes anywhere: a kdcore error, or a restore that runs nothing."""
    damaged = bytearray(saved_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(damaged) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            damaged[position] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del damaged[position : position + data.draw(st.integers(1, 64))]
        else:
            damaged[position:position] = data.draw(st.binary(min_size=1, max_size=16))
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(damaged))
    with nothing_runs(), contextlib.suppress(kd.KDCoreError):
        kd.restore(TinyNet(), path)


# ================================================================== 4. fuzzing the manifest
@pytest.mark.slow
@settings(max_examples=2000, deadline=None, derandomize=True)
@given(manifest=manifests() | JSON, text=st.text(max_size=40))
def test_the_manifest_parser_raises_only_its_documented_errors(manifest: Any, text: str) -> None:
    for candidate in (json.dumps(manifest), text):
        try:
            parsed = parse_manifest(candidate, Path("fuzz.safetensors"))
        except (kd.CheckpointFormatError, kd.CheckpointVersionError) as exc:
            assert str(exc).startswith("fuzz.safetensors: ")
        else:
            assert isinstance(parsed["modes"], list) and isinstance(parsed["aliases"], dict)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(manifest=manifests())
def test_restoring_a_fuzzed_manifest_raises_only_kdcore_errors_and_runs_nothing(
    tmp_path: Path, manifest: Any
) -> None:
    """The whole restore (parse, rebuild through convert, load) on a mutated manifest."""
    path = with_manifest(tmp_path / "fuzz.safetensors", json.dumps(manifest))
    student = TinyNet()
    with nothing_runs():
        try:
            kd.restore(student, path)
        except kd.KDCoreError as exc:
            assert str(path) in str(exc)
            assert type(student) is TinyNet


# ================================================================== sanity of the tools
def test_the_audit_hook_sees_what_a_pickle_would_run(tmp_path: Path) -> None:
    """The watcher is not blind: unpickling Boom is caught, and so is the sentinel file."""
    with pytest.raises(AssertionError, match="restore ran something"), nothing_runs():
        pickle.loads(pickle.dumps(Boom(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()


def test_the_allocation_counter_sees_tensor_reads(tmp_path: Path, saved_bytes: bytes) -> None:
    path = tmp_path / "run.safetensors"
    path.write_bytes(saved_bytes)
    counting = _CountingTorch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(safetensors_format, "torch", counting)
        model = kd.restore(TinyNet(), path)
        kd.restore(model, path, optimizer=torch.optim.Adam(model.parameters()))
    assert 0 < counting.allocated <= len(saved_bytes)


def test_a_zip_that_is_not_torch_save_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "archive.safetensors"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data.pkl", pickle.dumps(0))
    assert_refused(path, "zip archive", kd.CheckpointFormatError)
