"""Crafted checkpoints (issue 10, findings 6-10 and 12): duplicate manifest keys, alias chains,
optimizer state that does not fit its parameters, manifests `kdcore inspect` must report rather
than crash on, DCP metadata with very many chunks or huge integers, and checkpoint-backend
plugins that raise or claim every file.

Each refusal is a kdcore error naming the file, raised before the model or the optimizer changes.
"""

from __future__ import annotations

import copy
import itertools
import json
import pickle
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import kdcore as kd
from kdcore.cli import main
from kdcore.plugin import inspect_checkpoint
from tests.conftest import JSON, TinyNet, crafted_manifest, manifests, write_raw
from tests.test_plugin_manager import make_distribution


# ================================================================== helpers
def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """Everything a refused restore must leave as it was, copied."""
    tensors = {name: value.clone() for name, value in model.state_dict().items()}
    return type(model), tensors, copy.deepcopy(optimizer.state_dict()) if optimizer else None


def assert_unchanged(before: Any, model: nn.Module, optimizer: Any = None) -> None:
    cls, tensors, state = before
    assert type(model) is cls
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    assert all(torch.equal(tensors[name], now[name]) for name in tensors)
    if optimizer is not None:
        assert _same(state, optimizer.state_dict())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def refused(
    path: Path,
    error: type[Exception],
    match: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> kd.KDCoreError:
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=match) as info:
        kd.restore(model, path, optimizer=optimizer)
    assert isinstance(info.value, kd.KDCoreError)
    assert str(path) in str(info.value), "the error names the file"
    assert_unchanged(before, model, optimizer)
    return info.value


def raw_safetensors(
    path: Path, entries: dict[str, tuple[str, list[int], bytes]], meta: Any
) -> Path:
    """A safetensors file written by hand, so that a shape can be anything the format allows."""
    header: dict[str, Any] = {"__metadata__": meta}
    data, offset = b"", 0
    for name, (dtype, shape, payload) in entries.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(payload)],
        }
        data += payload
        offset += len(payload)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


# ================================================================== 6. duplicate manifest keys
def test_a_manifest_key_given_twice_is_refused(tmp_path: Path) -> None:
    """json keeps the last of two equal keys; a second "modes" would hide the first."""
    text = json.dumps(crafted_manifest())[:-1] + ', "modes": []}'
    path = write_raw(tmp_path / "twice.safetensors", TinyNet().state_dict(), {"kdcore": text})
    refused(path, kd.CheckpointFormatError, "duplicate key 'modes' in the manifest", TinyNet())


def test_a_nested_manifest_key_given_twice_is_refused(tmp_path: Path) -> None:
    manifest = crafted_manifest()
    text = json.dumps(manifest).replace('"name": "logits"', '"name": "logits", "name": "mse"')
    path = write_raw(tmp_path / "nested.safetensors", TinyNet().state_dict(), {"kdcore": text})
    refused(path, kd.CheckpointFormatError, "duplicate key 'name' in the manifest", TinyNet())


# ================================================================== 7. aliases
class Six(nn.Module):
    """Six parameters of one shape, so that any of them can stand for any other."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.ParameterList([nn.Parameter(torch.randn(3)) for _ in range(6)])


def six_with_aliases(tmp_path: Path, aliases: dict[str, str], stored: list[int]) -> Path:
    tensors = {f"p.{i}": torch.full((3,), float(i)) for i in stored}
    manifest = crafted_manifest(modes=[], aliases=aliases)
    return write_raw(tmp_path / "aliases.safetensors", tensors, {"kdcore": json.dumps(manifest)})


def test_an_alias_chain_is_refused_before_any_tensor_is_written(tmp_path: Path) -> None:
    """p.5 -> p.4 -> p.3 with p.4 not stored: restore used to load p.0..p.4, then KeyError."""
    path = six_with_aliases(tmp_path, {"p.4": "p.3", "p.5": "p.4"}, stored=[0, 1, 2, 3])
    refused(
        path,
        kd.CheckpointFormatError,
        r"alias 'p\.5' names 'p\.4', which is itself an alias",
        Six(),
    )


def test_an_alias_cycle_is_refused(tmp_path: Path) -> None:
    path = six_with_aliases(tmp_path, {"p.4": "p.5", "p.5": "p.4"}, stored=[0, 1, 2, 3])
    refused(path, kd.CheckpointFormatError, "which is itself an alias", Six())


def test_an_alias_that_shadows_a_stored_tensor_is_refused(tmp_path: Path) -> None:
    path = six_with_aliases(tmp_path, {"p.0": "p.1"}, stored=[0, 1, 2, 3, 4, 5])
    refused(path, kd.CheckpointFormatError, r"alias 'p\.0' is also a stored tensor", Six())


def test_direct_aliases_still_restore(tmp_path: Path) -> None:
    path = six_with_aliases(tmp_path, {"p.4": "p.3", "p.5": "p.3"}, stored=[0, 1, 2, 3])
    model = kd.restore(Six(), path)
    assert [float(p.detach()[0]) for p in model.p] == [0, 1, 2, 3, 3, 3]


# ================================================================== 8. optimizer state
def trained_with_optimizer(
    kind: type[torch.optim.Optimizer] = torch.optim.Adam, **options: Any
) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = TinyNet()
    optimizer = kind(model.parameters(), **options)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    return model, optimizer


def saved_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    return load_file(str(path)), metadata


def test_optimizer_state_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    """It used to restore, then fail at the next optimizer.step()."""
    model, optimizer = trained_with_optimizer()
    path = kd.save(model, tmp_path / "run.safetensors", optimizer=optimizer)
    tensors, metadata = saved_parts(path)
    tensors["__optimizer__.state.0.exp_avg"] = torch.zeros(3)
    crafted = write_raw(tmp_path / "crafted.safetensors", tensors, metadata)
    model, optimizer = trained_with_optimizer()
    refused(
        crafted,
        kd.CheckpointFormatError,
        r"tensor '__optimizer__\.state\.0\.exp_avg' has shape \[3\].*parameter 0 .*\[8, 4\]",
        model,
        optimizer,
    )


def test_optimizer_state_of_another_kind_of_number_is_refused(tmp_path: Path) -> None:
    model, optimizer = trained_with_optimizer()
    path = kd.save(model, tmp_path / "run.safetensors", optimizer=optimizer)
    tensors, metadata = saved_parts(path)
    tensors["__optimizer__.state.1.exp_avg_sq"] = torch.zeros(8, dtype=torch.bool)
    crafted = write_raw(tmp_path / "crafted.safetensors", tensors, metadata)
    model, optimizer = trained_with_optimizer()
    refused(crafted, kd.CheckpointFormatError, r"exp_avg_sq' is torch\.bool", model, optimizer)


def test_optimizer_state_for_a_parameter_no_group_holds_is_refused(tmp_path: Path) -> None:
    model, optimizer = trained_with_optimizer()
    path = kd.save(model, tmp_path / "run.safetensors", optimizer=optimizer)
    tensors, metadata = saved_parts(path)
    tensors["__optimizer__.state.9.exp_avg"] = torch.zeros(3)
    crafted = write_raw(tmp_path / "crafted.safetensors", tensors, metadata)
    model, optimizer = trained_with_optimizer()
    refused(crafted, kd.CheckpointFormatError, "parameter index 9, which no", model, optimizer)


def test_a_zero_byte_optimizer_tensor_of_a_huge_shape_is_refused(tmp_path: Path) -> None:
    """[0, 2**70] holds no bytes, so the file's size allows it; torch.empty raised TypeError."""
    model, optimizer = trained_with_optimizer()
    path = kd.save(model, tmp_path / "run.safetensors", optimizer=optimizer)
    tensors, metadata = saved_parts(path)
    entries = {
        name: ("F32", list(value.shape), value.numpy().tobytes()) for name, value in tensors.items()
    }
    entries["__optimizer__.state.0.exp_avg"] = ("F32", [0, 2**70], b"")
    crafted = raw_safetensors(tmp_path / "huge.safetensors", entries, metadata)
    model, optimizer = trained_with_optimizer()
    refused(
        crafted,
        kd.CheckpointFormatError,
        r"has shape \[0, 1180591620717411303424\]",
        model,
        optimizer,
    )
    assert main(["inspect", str(crafted)]) == 0  # and inspect summarises it without a crash


def test_a_duplicated_parameter_index_in_the_groups_is_refused(tmp_path: Path) -> None:
    model, optimizer = trained_with_optimizer()
    path = kd.save(model, tmp_path / "run.safetensors", optimizer=optimizer)
    tensors, metadata = saved_parts(path)
    manifest = json.loads(metadata["kdcore"])
    manifest["optimizer"]["param_groups"][0]["params"] = [0, 0, 2, 3]
    crafted = write_raw(
        tmp_path / "crafted.safetensors", tensors, {**metadata, "kdcore": json.dumps(manifest)}
    )
    model, optimizer = trained_with_optimizer()
    refused(crafted, kd.CheckpointFormatError, "parameter index 0 twice", model, optimizer)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        (torch.optim.Adam, {"amsgrad": True}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.Adafactor, {}),  # factored state: [8, 1] and [1, 4] for an [8, 4] weight
        (torch.optim.Rprop, {}),
        (torch.optim.ASGD, {}),
    ],
)
def test_real_optimizer_states_still_restore_and_resume_exactly(
    tmp_path: Path, kind: type[torch.optim.Optimizer], options: dict[str, Any]
) -> None:
    model, optimizer = trained_with_optimizer(kind, **options)
    path = kd.save(model, tmp_path / "run.safetensors", optimizer=optimizer)
    restored = kd.restore(TinyNet(), path)
    restored_optimizer = kind(restored.parameters(), **options)
    kd.restore(restored, path, optimizer=restored_optimizer)
    x = torch.randn(5, 4)
    for m, o in ((model, optimizer), (restored, restored_optimizer)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters(), strict=True)
    )


# ================================================================== 9. kdcore inspect
def inspect_manifest(tmp_path: Path, manifest: Any, capsys: pytest.CaptureFixture[str]) -> str:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    path = write_raw(tmp_path / "inspect.safetensors", TinyNet().state_dict(), {"kdcore": text})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensor_groups"]["student"]["tensors"] == 4
    return out + json.dumps(summary["problems"])


def test_inspect_reports_a_manifest_without_kdcore_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = crafted_manifest()
    del manifest["kdcore_version"]
    out = inspect_manifest(tmp_path, manifest, capsys)
    assert "written by kdcore (not recorded)" in out
    assert "mode kd_loss" in out


def test_inspect_reports_a_criterion_of_the_wrong_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = crafted_manifest()
    manifest["modes"][0]["config"]["criterion"] = 5
    out = inspect_manifest(tmp_path, manifest, capsys)
    assert "problems:" in out
    assert "modes[0].config.criterion is 5" in out
    assert "teacher:" in out  # the rest of the mode is still shown


def test_inspect_reports_every_problem_of_a_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = inspect_manifest(tmp_path, crafted_manifest(modes={}, aliases=[]), capsys)
    assert "manifest 'modes' has the wrong type" in out
    assert "manifest 'aliases' has the wrong type" in out


def test_inspect_reports_a_newer_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = inspect_manifest(tmp_path, crafted_manifest(format_version=7), capsys)
    assert "format 7, written by kdcore 0.1.0" in out
    assert "reads up to format 1: upgrade kdcore" in out


def test_inspect_reports_a_manifest_that_is_not_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = inspect_manifest(tmp_path, "{not json", capsys)
    assert "the manifest is not valid JSON" in out


def test_inspect_of_something_that_is_no_checkpoint_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert main(["inspect", str(path)]) == 1
    assert "is not a checkpoint any installed backend reads" in capsys.readouterr().err


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@pytest.mark.slow
@given(manifest=manifests() | JSON)
def test_inspect_of_a_fuzzed_manifest_never_raises_anything_but_a_kdcore_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], manifest: Any
) -> None:
    path = write_raw(
        tmp_path / "fuzz.safetensors", TinyNet().state_dict(), {"kdcore": json.dumps(manifest)}
    )
    try:
        summary = inspect_checkpoint(path)
    except kd.KDCoreError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(summary["problems"], list)
        json.dumps(summary)
    assert main(["inspect", str(path)]) in (0, 1)
    capsys.readouterr()
    if main(["inspect", str(path), "--json"]) == 0:
        assert isinstance(json.loads(capsys.readouterr().out)["problems"], list)


# ================================================================== 10. DCP metadata
Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def dcp_folder(folder: Path, shape: tuple[int, ...], boxes: list[Box], offset: int = 0) -> Path:
    """A bare DCP checkpoint of one tensor ``w`` stored in chunks ``boxes``, in a file that does
    not exist (restore must get through the metadata checks to say so) unless ``offset`` is
    given."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]
    file = "data.distcp" if offset else "missing.distcp"
    storage = {MetadataIndex("w", c.offsets): _StorageInfo(file, offset, 8) for c in chunks}
    properties = TensorProperties(dtype=torch.float32)
    metadata = Metadata(
        state_dict_metadata={"w": TensorStorageMetadata(properties, torch.Size(shape), chunks)},
        storage_data=storage,
    )
    folder.mkdir()
    if offset:
        (folder / file).write_bytes(bytes(64))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return folder


def rows(count: int, *, overlap: bool = False) -> list[Box]:
    """One chunk per row of a [count, 2] tensor; ``overlap``: the sizes still add up, but [0, 1]
    is covered twice and [count - 1, 1] not at all."""
    boxes: list[Box] = [((row, 0), (1, 2)) for row in range(count)]
    if overlap:
        boxes[-1:] = [((0, 1), (1, 1)), ((count - 1, 0), (1, 1))]
    return boxes


MISSING = "'missing.distcp', which does not exist"  # every metadata check passed


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_twenty_thousand_dcp_chunks_are_checked_in_linear_time(
    tmp_path: Path, overlap: bool
) -> None:
    """The pairwise check took 11 s for 4,000 chunks and grew with the square: 20,000 would take
    about five minutes. Linear (or n log n) work takes well under a second; 30 s is generous."""
    folder = dcp_folder(tmp_path / "dcp", (20_000, 2), rows(20_000, overlap=overlap))
    match = "the chunks of 'w' overlap" if overlap else MISSING
    start = time.perf_counter()
    with pytest.raises(kd.CheckpointFormatError, match=match):
        kd.restore(TinyNet(), folder)
    assert time.perf_counter() - start < 30


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Box]]:
    """A small tensor and chunks inside it: a grid split (what DCP writes), then perhaps
    moved, resized, dropped or duplicated chunks."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    cuts = [
        sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else [] for n in shape
    ]
    edges = [[0, *c, n] for c, n in zip(cuts, shape, strict=True)]
    boxes: list[Box] = [
        (
            tuple(e[i] for e, i in zip(edges, index, strict=True)),
            tuple(e[i + 1] - e[i] for e, i in zip(edges, index, strict=True)),
        )
        for index in itertools.product(*(range(len(e) - 1) for e in edges))
    ]
    for _ in range(draw(st.integers(0, 2))):
        victim = draw(st.integers(0, len(boxes) - 1))
        offsets = tuple(draw(st.integers(0, n - 1)) for n in shape)
        sizes = tuple(draw(st.integers(0, n - o)) for o, n in zip(offsets, shape, strict=True))
        boxes[victim] = (offsets, sizes)
    return shape, list({offsets: (offsets, sizes) for offsets, sizes in boxes}.values())


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(layout=layouts())
def test_dcp_chunks_are_accepted_exactly_when_they_tile_the_tensor(
    tmp_path: Path, layout: tuple[tuple[int, ...], list[Box]]
) -> None:
    """Against counting, cell by cell, how often each element is covered."""
    shape, boxes = layout
    cover: dict[tuple[int, ...], int] = {}
    for offsets, sizes in boxes:
        ranges = (range(o, o + s) for o, s in zip(offsets, sizes, strict=True))
        for cell in itertools.product(*ranges):
            cover[cell] = cover.get(cell, 0) + 1
    tiles = all(cover.get(cell) == 1 for cell in itertools.product(*map(range, shape)))
    folder = dcp_folder(Path(tempfile.mkdtemp(dir=tmp_path)) / "dcp", shape, boxes)
    with pytest.raises(kd.CheckpointFormatError) as info:
        kd.restore(TinyNet(), folder)
    assert (MISSING in str(info.value)) == tiles, str(info.value)


@pytest.mark.parametrize(
    "value", [10**5000, -(10**5000), 2**64], ids=["5001 digits", "negative", "2**64"]
)
def test_a_dcp_integer_beyond_64_bits_is_a_format_error(tmp_path: Path, value: int) -> None:
    """A 5,000-digit integer used to raise a bare ValueError when the message printed it."""
    folder = dcp_folder(tmp_path / "dcp", (3, 2), rows(3), offset=value)
    with pytest.raises(kd.CheckpointFormatError, match="-bit integer") as info:
        kd.restore(TinyNet(), folder)
    assert str(folder / ".metadata") in str(info.value)


# ================================================================== 12. backend plugins
EAGER_BACKENDS = """
    import kdcore

    class Raises:
        def detect(self, path):
            raise RuntimeError("detect exploded")

    class ClaimsEverything:
        def detect(self, path):
            return True

        def open(self, path):
            raise RuntimeError("not mine after all")

    @kdcore.hookimpl
    def kdcore_register_checkpoint_backends(registry):
        registry.add("aaa-raises", Raises())
        registry.add("aab-claims-everything", ClaimsEverything())
"""


@pytest.fixture
def plugin_root(tmp_path: Path) -> Any:
    root = tmp_path / "plugins"
    root.mkdir()
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m.startswith("acme")]:
        del sys.modules[name]


def test_builtin_backends_are_asked_first_and_a_raising_detect_is_a_warning(
    plugin_root: Path, tmp_path: Path
) -> None:
    """ "aaa-..." sorts before "safetensors": by name, the eager plugin would claim every file."""
    make_distribution(plugin_root, "acme-backends", {"eager": EAGER_BACKENDS})
    with kd.use_host(kd.PluginHost(search_path=[str(plugin_root), *sys.path], blocked=())):
        model = TinyNet()
        for backend in ("safetensors", "safetensors-sharded", "torch-dcp"):
            path = kd.save(model, tmp_path / f"run-{backend}", backend=backend)
            restored = kd.restore(TinyNet(), path)
            assert torch.equal(restored.fc1.weight, model.fc1.weight)
        other = tmp_path / "other.bin"
        other.write_bytes(b"neither format")
        with (
            pytest.warns(
                kd.PluginWarning,
                match=r"checkpoint backend 'aaa-raises' of plugin 'eager' \(distribution "
                r"'acme-backends'\) raised in detect.*detect exploded.*; it is skipped",
            ),
            pytest.raises(
                kd.CheckpointFormatError,
                match=r"checkpoint backend 'aab-claims-everything' of plugin 'eager' \(distribution "
                r"'acme-backends'\) failed to open it: RuntimeError\('not mine after all'\)",
            ) as info,
        ):
            kd.restore(TinyNet(), other)
        assert str(other) in str(info.value)
