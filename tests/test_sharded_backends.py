"""The folder backends: ``safetensors-sharded`` (Hugging Face layout) and ``torch-dcp``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from kdcore_builtins.sharded_safetensors import parse_size
from safetensors import safe_open
from torch import nn

import kdcore as kd
from kdcore import registries
from kdcore.plugin import TensorInfo
from tests.conftest import TinyNet, disk_full_after, make_teacher, write_raw

LABELS = torch.tensor([0, 1, 2, 0, 1])
BACKENDS = [("safetensors-sharded", {"max_shard_size": 200}), ("torch-dcp", {})]
ROOT = Path(__file__).parent.parent
# The commit files of the two folder formats, as documented in docs/checkpoints.md.
INDEX_NAME = "model.safetensors.index.json"
DCP_MARKER = "kdcore-dcp.json"
DCP_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


class Projected(nn.Module):
    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.student_width, self.teacher_width = student_width, teacher_width
        self.proj = nn.Linear(student_width, teacher_width)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.proj(s), t)


def config(**overrides: Any) -> dict[str, Any]:
    return {
        "teacher_model": make_teacher,
        "criterion": {("", ""): kd.LogitsDistillationLoss(2.0), ("fc1", "fc1"): Projected(8, 16)},
        "loss_balancer": kd.StaticLossBalancer([0.3, 0.3]),
        **overrides,
    }


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    loss = model.compute_kd_loss(student_loss=F.cross_entropy(model(x), LABELS))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def trained(batch: torch.Tensor, **overrides: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = kd.convert(TinyNet(), [("kd_loss", config(**overrides))])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        step(model, optimizer, batch)
    return model, optimizer


def outputs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The model's outputs, without leaving a training capture behind."""
    model.eval()
    try:
        with torch.no_grad():
            return model(batch)  # type: ignore[no-any-return]
    finally:
        model.train()


def files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def shards(folder: Path) -> list[str]:
    return [name for name in files(folder) if name.endswith(".safetensors")]


def assert_refused(path: Path, error: type[Exception], match: str, names: Path) -> None:
    """kd.restore fails with ``match``, names the file ``names``, and leaves the model alone."""
    student = TinyNet()
    before = {name: value.clone() for name, value in student.state_dict().items()}
    with pytest.raises(error, match=match) as info:
        kd.restore(student, path)
    assert str(names) in str(info.value)
    assert type(student) is TinyNet
    assert all(torch.equal(before[n], v) for n, v in student.state_dict().items())


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize(("backend", "options"), BACKENDS)
def test_round_trip_rebuilds_the_distillation_model_and_resumes_training(
    tmp_path: Path, batch: torch.Tensor, backend: str, options: dict[str, Any]
) -> None:
    model, optimizer = trained(batch)
    folder = kd.save(model, tmp_path / "run", optimizer=optimizer, backend=backend, **options)
    assert folder.is_dir()

    restored = kd.restore(TinyNet(), folder)
    assert isinstance(restored, kd.DistillationModel) and isinstance(restored, TinyNet)
    assert torch.equal(restored(batch), model(batch))
    assert torch.equal(
        restored.compute_kd_loss(student_loss=torch.tensor(1.0)),
        model.compute_kd_loss(student_loss=torch.tensor(1.0)),
    )
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=0.01)
    kd.restore(restored, folder, optimizer=restored_optimizer)
    uninterrupted = [step(model, optimizer, batch) for _ in range(2)]
    assert [step(restored, restored_optimizer, batch) for _ in range(2)] == uninterrupted


@pytest.mark.parametrize(("backend", "options"), BACKENDS)
def test_saving_again_replaces_the_checkpoint_and_leaves_nothing_behind(
    tmp_path: Path, batch: torch.Tensor, backend: str, options: dict[str, Any]
) -> None:
    model, optimizer = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend=backend, **options)
    first = files(folder)
    step(model, optimizer, batch)
    kd.save(model, folder, backend=backend, **options)
    second = files(folder)
    assert len(second) == len(first) and set(second).isdisjoint(
        set(first) - {INDEX_NAME, DCP_MARKER}
    )
    kd.save(model, folder, backend=backend, **options)
    assert len(files(folder)) == len(first)
    assert torch.equal(kd.restore(TinyNet(), folder)(batch), model(batch))


def test_tied_weights_are_stored_once_across_shards(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight

    source = Tied()
    folder = kd.save(source, tmp_path / "tied", backend="safetensors-sharded", max_shard_size=1)
    index = json.loads((folder / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == {"embed.weight", "mid.weight", "mid.bias"}
    restored = kd.restore(Tied(), folder)
    assert restored.head.weight is restored.embed.weight
    assert torch.equal(restored.head.weight, source.embed.weight)


# ------------------------------------------------------------------ safetensors-sharded layout
def test_small_max_shard_size_splits_into_hugging_face_shards(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    model, _ = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend="safetensors-sharded", max_shard_size="200B")
    names = shards(folder)
    count = len(names)
    assert count > 3
    assert names == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert files(folder) == [*names, INDEX_NAME]
    index = json.loads((folder / INDEX_NAME).read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert set(index["weight_map"].values()) == set(names)
    total = 0
    for name in names:
        with safe_open(str(folder / name), "pt") as file:
            assert file.metadata() == {"format": "pt"}
            keys = set(file.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == name}
            sizes = [file.get_tensor(k).numel() * file.get_tensor(k).element_size() for k in keys]
            assert sum(sizes) <= 200 or len(keys) == 1
            total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert json.loads(index["metadata"]["kdcore"])["format"] == "kdcore.checkpoint"


def test_exported_student_index_maps_every_student_tensor(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    model, _ = trained(batch)
    student = kd.export(model)
    folder = kd.save(
        student, tmp_path / "student", backend="safetensors-sharded", max_shard_size=64
    )
    weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    state = student.state_dict()
    assert set(weight_map) == set(state)
    for name, shard in weight_map.items():
        with safe_open(str(folder / shard), "pt") as file:
            assert file.metadata()["format"] == "pt"
            assert torch.equal(file.get_tensor(name), state[name])
    restored = kd.restore(TinyNet(), folder)
    assert type(restored) is TinyNet and torch.equal(restored(batch), student(batch))


def test_transformers_loads_an_exported_student(tmp_path: Path) -> None:
    # transformers needs NumPy, which kdcore's environment lacks: this runs where both exist
    # (PYTHONPATH=<dir with transformers and numpy> pytest ...).
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path / "hf"
    kd.save(model, folder, backend="safetensors-sharded", max_shard_size="20KB")
    kd.save(model, folder, backend="safetensors-sharded", max_shard_size="20KB")  # id names
    config.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (2_000_000_000, 2 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GB", 2 * 10**9),
        ("2gb", 2 * 10**9),
        ("1.5GiB", int(1.5 * 2**30)),
        (" 10 KB ", 10_000),
        ("4096", 4096),
        ("64B", 64),
    ],
)
def test_max_shard_size_values(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [0, -5, True, 1.5, None, "", "GB", "2XB", "-1GB", "1e9", "0MB"])
def test_bad_max_shard_size_is_refused_with_the_value(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="max_shard_size must be a positive number") as info:
        kd.save(TinyNet(), tmp_path / "run", backend="safetensors-sharded", max_shard_size=value)
    assert repr(value) in str(info.value)
    assert not (tmp_path / "run").exists()


def test_unknown_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"takes only max_shard_size, got \['shards'\]"):
        kd.save(TinyNet(), tmp_path / "a", backend="safetensors-sharded", shards=2)
    with pytest.raises(TypeError, match=r"takes no options, got \['max_shard_size'\]"):
        kd.save(TinyNet(), tmp_path / "b", backend="torch-dcp", max_shard_size="1GB")


@pytest.mark.parametrize("backend", ["safetensors-sharded", "torch-dcp"])
def test_a_file_at_the_path_is_not_replaced_by_a_folder(tmp_path: Path, backend: str) -> None:
    path = kd.save(TinyNet(), tmp_path / "run.safetensors")
    with pytest.raises(kd.CheckpointWriteError, match="is a file"):
        kd.save(TinyNet(), path, backend=backend)
    assert path.is_file()


# ------------------------------------------------------------------ faults while saving
def test_a_sharded_save_failing_midway_keeps_the_previous_checkpoint(
    tmp_path: Path, batch: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend="safetensors-sharded", max_shard_size=200)
    before = {name: (folder / name).read_bytes() for name in files(folder)}
    expected = outputs(model, batch)
    step(model, optimizer, batch)  # the model moves on; the failed save must not show it
    first_shard = min(name for name in before if name.endswith(".safetensors"))
    with (
        disk_full_after(len(before[first_shard])) as opened,
        pytest.raises(kd.CheckpointWriteError, match=r"run: .*the disk is full.*unchanged"),
    ):
        kd.save(model, folder, backend="safetensors-sharded", max_shard_size=200)
    assert len(opened) == 2, "the first shard was written, the second failed"
    assert {name: (folder / name).read_bytes() for name in files(folder)} == before
    assert torch.equal(kd.restore(TinyNet(), folder)(batch), expected)


def test_a_dcp_save_failing_midway_keeps_the_previous_checkpoint(
    tmp_path: Path, batch: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.distributed.checkpoint import filesystem

    model, optimizer = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend="torch-dcp")
    before = files(folder)
    expected = outputs(model, batch)
    step(model, optimizer, batch)
    real_write_item = filesystem._write_item
    calls = []

    def disk_full_after_the_first_tensor(*args: Any) -> Any:
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_write_item(*args)

    monkeypatch.setattr(filesystem, "_write_item", disk_full_after_the_first_tensor)
    with pytest.raises(kd.CheckpointWriteError, match=r"run: .*the disk is full.*unchanged"):
        kd.save(model, folder, backend="torch-dcp")
    assert files(folder) == before
    assert torch.equal(kd.restore(TinyNet(), folder)(batch), expected)


def test_killing_a_sharded_save_keeps_a_loadable_checkpoint_and_the_next_save_cleans_up(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import torch, kdcore as kd
        model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(24)])
        for i in range(1000):
            with torch.no_grad():
                model[0].bias.fill_(i)
            kd.save(model, {str(folder)!r}, backend="safetensors-sharded", max_shard_size="300KB")
            print(i, flush=True)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for _ in range(3):
        process.stdout.readline()
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(24)])
    kd.restore(model, folder)
    assert float(model[0].bias[0].detach()) >= 2
    kd.save(model, folder, backend="safetensors-sharded", max_shard_size="300KB")
    named = set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values())
    assert files(folder) == sorted([*named, INDEX_NAME])  # strays and temporaries are gone


# ------------------------------------------------------------------ detection by content
def test_each_format_is_recognised_by_content_not_by_name(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    model, _ = trained(batch)
    expected = model(batch)
    single = kd.save(model, tmp_path / "a", backend="safetensors")
    sharded = kd.save(model, tmp_path / "b", backend="safetensors-sharded", max_shard_size=200)
    dcp = kd.save(model, tmp_path / "c", backend="torch-dcp")
    misleading = {
        single: tmp_path / "model.safetensors.index.json",
        sharded: tmp_path / "checkpoint.distcp",
        dcp: tmp_path / "model.safetensors",
    }
    for source, target in misleading.items():
        source.rename(target)
        assert torch.equal(kd.restore(TinyNet(), target)(batch), expected)
    # the index file itself may be given, too
    index = misleading[sharded] / INDEX_NAME
    assert torch.equal(kd.restore(TinyNet(), index)(batch), expected)
    (tmp_path / "empty").mkdir()
    with pytest.raises(kd.CheckpointFormatError, match="not a checkpoint any installed backend"):
        kd.restore(TinyNet(), tmp_path / "empty")


@pytest.mark.parametrize(
    ("first", "second"),
    [("safetensors-sharded", "torch-dcp"), ("torch-dcp", "safetensors-sharded")],
)
def test_saving_another_format_into_the_folder_replaces_the_old_one(
    tmp_path: Path, batch: torch.Tensor, first: str, second: str
) -> None:
    model, optimizer = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend=first)
    step(model, optimizer, batch)
    kd.save(model, folder, backend=second)
    assert torch.equal(kd.restore(TinyNet(), folder)(batch), model(batch))
    fresh = tmp_path / "fresh"
    kd.save(model, fresh, backend=second)
    assert len(files(folder)) == len(files(fresh))


@pytest.mark.parametrize("newer", ["safetensors-sharded", "torch-dcp"])
def test_after_a_crash_between_formats_the_newer_commit_is_restored(
    tmp_path: Path, batch: torch.Tensor, newer: str
) -> None:
    model, optimizer = trained(batch)
    older = "torch-dcp" if newer == "safetensors-sharded" else "safetensors-sharded"
    kd.save(model, tmp_path / "old", backend=older)
    step(model, optimizer, batch)
    kd.save(model, tmp_path / "new", backend=newer)
    for entry in (tmp_path / "new").iterdir():  # as if the newer save died before cleaning up
        entry.rename(tmp_path / "old" / entry.name)
    expected = outputs(model, batch)
    assert torch.equal(outputs(kd.restore(TinyNet(), tmp_path / "old"), batch), expected)


# ------------------------------------------------------------------ damaged sharded checkpoints
def edit_index(folder: Path, change: Any) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    change(index)
    (folder / INDEX_NAME).write_text(json.dumps(index))


def first_shard(index: dict[str, Any]) -> str:
    return sorted(set(index["weight_map"].values()))[0]


def _point(index: dict[str, Any], target: str) -> None:
    index["weight_map"]["fc1.weight"] = target


def _drop_entry(index: dict[str, Any]) -> None:
    del index["weight_map"]["fc1.weight"]


def _move_entry(index: dict[str, Any]) -> None:
    names = sorted(set(index["weight_map"].values()))
    index["weight_map"]["fc1.weight"] = next(
        n for n in names if n != index["weight_map"]["fc1.weight"]
    )


CORRUPT_INDEXES = {
    "missing shard": (
        lambda i: _point(i, "model-00009-of-00009.safetensors"),
        r"'fc1\.weight' in shard 'model-00009-of-00009\.safetensors', which does not exist",
    ),
    "parent traversal": (
        lambda i: _point(i, "../outside.safetensors"),
        r"'\.\./outside\.safetensors', which is not a file in the checkpoint folder \(paths outside the folder are refused\)",
    ),
    "absolute path": (
        lambda i: _point(i, "/etc/passwd"),
        r"'/etc/passwd', which is not a file in the checkpoint folder",
    ),
    "subfolder": (
        lambda i: _point(i, "sub/model.safetensors"),
        r"not a file in the checkpoint folder",
    ),
    "dot dot": (lambda i: _point(i, ".."), r"not a file in the checkpoint folder"),
    "not a name": (
        lambda i: _point(i, 3),
        r"weight_map entry for tensor 'fc1\.weight' is not a file name",
    ),
    "unlisted tensor": (
        _drop_entry,
        r"holds tensor 'fc1\.weight', which the weight_map does not list",
    ),
    "tensor in the wrong shard": (
        _move_entry,
        r"puts tensor 'fc1\.weight' in 'model-\d+-of-\d+\.safetensors', which lacks it",
    ),
    "no weight_map": (lambda i: i.pop("weight_map"), "has no 'weight_map' object"),
    "metadata not an object": (
        lambda i: i.update(metadata=[1]),
        "'metadata' must be a JSON object",
    ),
    "wrong total_size": (
        lambda i: i["metadata"].update(total_size=12),
        r"total_size 12 does not match the \d+ bytes",
    ),
    "no manifest": (
        lambda i: i["metadata"].pop("kdcore"),
        "safetensors index without a kdcore manifest",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPT_INDEXES))
def test_corrupted_index_is_refused_naming_the_problem(
    tmp_path: Path, batch: torch.Tensor, case: str
) -> None:
    model, _ = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend="safetensors-sharded", max_shard_size=200)
    change, match = CORRUPT_INDEXES[case]
    edit_index(folder, change)
    assert_refused(folder, kd.CheckpointFormatError, match, names=folder / INDEX_NAME)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"{not json", "index is not valid JSON"),
        (
            b'{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}',
            "duplicate key 'a' in the index",
        ),
        (b'{"weight_map": {}, "weight_map": {}}', "duplicate key 'weight_map'"),
    ],
)
def test_invalid_index_json_is_refused(tmp_path: Path, text: bytes, match: str) -> None:
    folder = kd.save(TinyNet(), tmp_path / "run", backend="safetensors-sharded")
    (folder / INDEX_NAME).write_bytes(text)
    with pytest.raises(kd.CheckpointError, match=match):
        kd.restore(TinyNet(), folder)


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path: Path) -> None:
    folder = kd.save(TinyNet(), tmp_path / "run", backend="safetensors-sharded", max_shard_size=1)
    index = json.loads((folder / INDEX_NAME).read_text())
    shard = index["weight_map"]["fc2.bias"]
    tensors = {"fc2.bias": torch.zeros(3), "fc1.bias": torch.zeros(8)}
    write_raw(folder / shard, tensors, {"format": "pt"})
    assert_refused(
        folder, kd.CheckpointFormatError, r"tensor 'fc1\.bias' is stored twice", folder / INDEX_NAME
    )


def test_a_truncated_shard_is_refused_naming_the_shard(tmp_path: Path, batch: torch.Tensor) -> None:
    model, _ = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend="safetensors-sharded", max_shard_size=200)
    shard = folder / shards(folder)[1]
    shard.write_bytes(shard.read_bytes()[:-3])
    assert_refused(folder, kd.CheckpointFormatError, "truncated|data bytes", shard)


# ------------------------------------------------------------------ torch-dcp layout and safety
def dcp_checkpoint(folder: Path) -> Path:
    marker = json.loads((folder / DCP_MARKER).read_text())
    return folder / marker["checkpoint"]


def test_dcp_folder_holds_a_plain_dcp_checkpoint_that_torch_reads(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    import torch.distributed.checkpoint as dcp

    model, _ = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend="torch-dcp")
    marker = json.loads((folder / DCP_MARKER).read_text())
    assert set(marker) == {"format", "format_version", "checkpoint", "manifest"}
    assert json.loads(marker["manifest"])["format"] == "kdcore.checkpoint"
    assert files(folder) == sorted([DCP_MARKER, marker["checkpoint"]])
    assert files(dcp_checkpoint(folder)) == [".metadata", "__0_0.distcp"]
    # torch's own loader reads it (it unpickles: fine for a file this test just wrote)
    state = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=dcp_checkpoint(folder))
    assert all(torch.equal(state[n], v) for n, v in model.state_dict().items())


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_dcp_reads_every_dtype_and_layout_without_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = torch.randn(4, 6) * 3
    tensors = {str(dtype): base.to(dtype) for dtype in DCP_DTYPES}
    tensors |= {
        "transposed": torch.randn(4, 3).t(),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
        "view": torch.arange(20.0).reshape(4, 5)[1:3, 2:],
    }
    backend = registries().checkpoint_backends.get("torch-dcp")
    backend.write(tmp_path / "run", tensors, "{}")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling")

    for module, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    reader = backend.open(tmp_path / "run")
    try:
        assert set(reader.tensors) == set(tensors)
        for name, tensor in tensors.items():
            assert reader.tensors[name] == TensorInfo(tensor.dtype, tuple(tensor.shape))
            loaded = reader.load(name)
            into = torch.empty_like(tensor)
            reader.load(name, out=into)
            for got in (loaded, into):
                assert got.dtype == tensor.dtype and got.shape == tensor.shape
                assert torch.equal(as_bytes(got), as_bytes(tensor))
    finally:
        reader.close()


def test_restore_from_dcp_never_unpickles(
    tmp_path: Path, batch: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend="torch-dcp", optimizer=optimizer)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling")

    for module, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    restored = kd.restore(TinyNet(), folder)
    kd.restore(restored, folder, optimizer=torch.optim.Adam(restored.parameters(), lr=0.01))
    assert torch.equal(restored(batch), model(batch))


class Boom:
    """Runs a shell command when unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.target}",))


def test_a_malicious_dcp_metadata_is_refused_without_running_it(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    model, _ = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend="torch-dcp")
    metadata = dcp_checkpoint(folder) / ".metadata"
    pwned = tmp_path / "pwned"
    metadata.write_bytes(pickle.dumps(Boom(pwned)))
    assert_refused(
        folder,
        kd.CheckpointFormatError,
        r"refers to posix\.system, which is not one of the classes this format uses; refused "
        "without running anything",
        metadata,
    )
    assert not pwned.exists()


def test_a_payload_hidden_inside_real_dcp_metadata_is_refused(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    model, _ = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend="torch-dcp")
    metadata = dcp_checkpoint(folder) / ".metadata"
    real = pickle.loads(metadata.read_bytes())  # the test's own, trusted file
    pwned = tmp_path / "pwned"
    real.planner_data = {"fc1.weight": Boom(pwned)}
    metadata.write_bytes(pickle.dumps(real))
    assert_refused(folder, kd.CheckpointFormatError, r"refers to posix\.system", metadata)
    assert not pwned.exists()


def test_a_malicious_tensor_record_is_refused_without_running_it(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    """The tensors in .distcp files are torch.save archives; their data.pkl is never run."""
    model, _ = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend="torch-dcp")
    checkpoint = dcp_checkpoint(folder)
    pwned = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save(Boom(pwned), evil)
    (checkpoint / "evil.distcp").write_bytes(evil.getvalue())
    real = pickle.loads((checkpoint / ".metadata").read_bytes())
    for key, info in real.storage_data.items():
        if key.fqn == "fc1.weight":
            info.relative_path, info.offset, info.length = "evil.distcp", 0, len(evil.getvalue())
    (checkpoint / ".metadata").write_bytes(pickle.dumps(real))
    assert_refused(
        folder,
        kd.CheckpointFormatError,
        r"fc1\.weight.*data\.pkl refers to posix\.system",
        checkpoint / "evil.distcp",
    )
    assert not pwned.exists()


def change_metadata(folder: Path, change: Any) -> Path:
    path = dcp_checkpoint(folder) / ".metadata"
    real = pickle.loads(path.read_bytes())
    change(real)
    path.write_bytes(pickle.dumps(real))
    return path


def _storage_of(metadata: Any, fqn: str) -> Any:
    return next(info for key, info in metadata.storage_data.items() if key.fqn == fqn)


def _bytes_entry(metadata: Any) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata.state_dict_metadata["fc1.weight"] = BytesStorageMetadata()


def _half_chunk(metadata: Any) -> None:
    chunk = metadata.state_dict_metadata["fc1.weight"].chunks[0]
    chunk.sizes = torch.Size([4, 4])


CORRUPT_DCP = {
    "traversal": (
        lambda m: setattr(_storage_of(m, "fc1.weight"), "relative_path", "../x.distcp"),
        r"'\.\./x\.distcp', which is not a file in the checkpoint folder",
    ),
    "missing file": (
        lambda m: setattr(_storage_of(m, "fc1.weight"), "relative_path", "gone.distcp"),
        "'gone.distcp', which does not exist",
    ),
    "past the end": (lambda m: setattr(_storage_of(m, "fc1.weight"), "offset", 10**9), "truncated"),
    "bytes entry": (_bytes_entry, "entry 'fc1.weight' is pickled bytes, not a tensor"),
    "uncovered": (_half_chunk, r"the chunks of 'fc1\.weight' do not cover its shape \[8, 4\]"),
    "no chunks": (lambda m: m.state_dict_metadata["fc1.weight"].chunks.clear(), "do not cover"),
    "transforms": (
        lambda m: setattr(_storage_of(m, "fc1.weight"), "transform_descriptors", ["zstd"]),
        "stream transforms",
    ),
    "newer version": (lambda m: setattr(m, "version", "2.0.0"), "DCP format version '2.0.0'"),
}


@pytest.mark.parametrize("case", list(CORRUPT_DCP))
def test_corrupted_dcp_metadata_is_refused_naming_the_problem(
    tmp_path: Path, batch: torch.Tensor, case: str
) -> None:
    model, _ = trained(batch)
    folder = kd.save(model, tmp_path / "run", backend="torch-dcp")
    change, match = CORRUPT_DCP[case]
    path = change_metadata(folder, change)
    names = path if case != "past the end" else path.parent / "__0_0.distcp"
    assert_refused(folder, kd.CheckpointFormatError, match, names)


@pytest.mark.parametrize("keep", [0, 1, 10, -1])
def test_truncated_dcp_metadata_is_refused(tmp_path: Path, keep: int) -> None:
    folder = kd.save(TinyNet(), tmp_path / "run", backend="torch-dcp")
    metadata = dcp_checkpoint(folder) / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:keep])
    assert_refused(folder, kd.CheckpointFormatError, "pickle", metadata)


def test_damaged_tensor_data_is_refused(tmp_path: Path) -> None:
    folder = kd.save(TinyNet(), tmp_path / "run", backend="torch-dcp")
    data = dcp_checkpoint(folder) / "__0_0.distcp"
    data.write_bytes(b"\0" * data.stat().st_size)
    assert_refused(folder, kd.CheckpointFormatError, "is not a torch.save archive", data)


@pytest.mark.parametrize(
    ("marker", "match"),
    [
        ({"checkpoint": "../elsewhere"}, r"'\.\./elsewhere', which is not a folder inside"),
        ({"checkpoint": "dcp-000000000000"}, "which does not exist"),
        ({"manifest": None}, "'manifest' must be a string"),
        ({"format_version": 7}, "format_version 7 is not 1"),
    ],
)
def test_a_damaged_dcp_marker_is_refused(
    tmp_path: Path, marker: dict[str, Any], match: str
) -> None:
    folder = kd.save(TinyNet(), tmp_path / "run", backend="torch-dcp")
    content = json.loads((folder / DCP_MARKER).read_text()) | marker
    (folder / DCP_MARKER).write_text(json.dumps(content))
    assert_refused(folder, kd.CheckpointFormatError, match, folder / DCP_MARKER)


def test_a_bare_dcp_checkpoint_is_recognised_but_has_no_manifest(tmp_path: Path) -> None:
    folder = kd.save(TinyNet(), tmp_path / "run", backend="torch-dcp")
    bare = dcp_checkpoint(folder)
    assert_refused(bare, kd.CheckpointFormatError, "without a kdcore manifest", bare)


# ------------------------------------------------------------------ FSDP2 across two processes
FSDP2_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, tempfile, warnings
    from pathlib import Path
    import torch, torch.distributed as dist
    import torch.multiprocessing as mp
    from torch import nn
    import kdcore as kd
    from kdcore import registries

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3))

    def shard(model, world):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for layer in model[::2]:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    MANIFEST = json.dumps({"format": "kdcore.checkpoint", "format_version": 1,
        "kdcore_version": kd.__version__, "student_class": "torch.nn:Sequential", "modes": [],
        "aliases": {}, "optimizer": None})

    def main(rank, world, init, folder):
        warnings.simplefilter("ignore")
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        model = shard(build(), world)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(2.0)
        # kd.save itself cannot take DTensors yet (kdcore._checkpoint._deduplicated): the backend
        # is called the way kd.save calls it.
        backend = registries().checkpoint_backends.get("torch-dcp")
        backend.write(Path(folder), model.state_dict(), MANIFEST)
        x = torch.ones(2, 4)
        expected = model(x).detach()  # a forward is collective: every rank runs it
        fresh = kd.restore(shard(build(), world), folder)
        assert torch.equal(fresh(x), expected)
        if rank == 0:
            torch.save(expected, Path(folder).parent / "expected.pt")
        # FSDP2's reference cycles hold the process group; left to interpreter exit, its gloo
        # threads can abort the process ("terminate called without an active exception").
        del model, fresh
        gc.collect()
        dist.destroy_process_group()
        gc.collect()

    if __name__ == "__main__":
        folder = sys.argv[1]
        mp.spawn(main, args=(2, tempfile.mktemp(), folder), nprocs=2)
    """
)


@pytest.mark.slow
def test_fsdp2_shards_written_by_two_ranks_restore_sharded_and_consolidated(
    tmp_path: Path,
) -> None:
    # torch's multi-rank DCP save gathers plans with gather_object, which needs NumPy.
    pytest.importorskip("numpy")
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    folder = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(script), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(dcp_checkpoint(folder)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    model = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3))
    kd.restore(model, folder)  # every tensor assembled from the two ranks' chunks
    assert torch.equal(model(torch.ones(2, 4)), expected)


def test_damaged_dcp_metadata_only_ever_raises_a_format_error(tmp_path: Path) -> None:
    """Byte flips and cuts anywhere in .metadata: a CheckpointFormatError or a valid read."""
    folder = kd.save(TinyNet(), tmp_path / "run", backend="torch-dcp")
    metadata = dcp_checkpoint(folder) / ".metadata"
    original = metadata.read_bytes()
    backend = registries().checkpoint_backends.get("torch-dcp")
    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        data = bytearray(original)
        position = int(torch.randint(len(data), (1,), generator=generator))
        if trial % 3 == 0:
            data = data[:position]
        else:
            data[position] = int(torch.randint(256, (1,), generator=generator))
        metadata.write_bytes(bytes(data))
        with contextlib.suppress(kd.CheckpointFormatError):
            backend.open(folder).close()


def write_metadata(folder: Path, data: bytes) -> Path:
    """Replace the .metadata pickle of the DCP checkpoint in ``folder`` with ``data``."""
    path = dcp_checkpoint(folder) / ".metadata"
    path.write_bytes(data)
    return path


def metadata_with(original: bytes, stand_in: str, replacement: bytes) -> bytes:
    """The .metadata pickle ``original`` with ``stand_in`` (a string set in it) replaced by the
    opcodes ``replacement``; protocol 2, so that no frame length has to change."""
    real = pickle.loads(original)  # the test's own, trusted file
    _storage_of(real, "fc1.weight").offset = stand_in
    data = pickle.dumps(real, protocol=2, fix_imports=False)  # builtins, not __builtin__
    encoded = stand_in.encode()
    pushed = b"X" + len(encoded).to_bytes(4, "little") + encoded  # BINUNICODE
    assert data.count(pushed) == 1
    return data.replace(pushed, replacement)


def test_deeply_nested_pickles_are_refused_cleanly(tmp_path: Path) -> None:
    """Neither the pickle reader nor the checks nor the messages recurse on deep nesting."""
    folder = kd.save(TinyNet(), tmp_path / "run", backend="torch-dcp")
    original = (dcp_checkpoint(folder) / ".metadata").read_bytes()
    depth = 200_000
    nested = b"N" + b"\x85" * depth  # None wrapped in 200k one-tuples
    as_key = b"\x80\x04}" + nested + b"Ns."  # ... used as a dict key
    metadata = write_metadata(folder, as_key)
    assert_refused(folder, kd.CheckpointFormatError, "dict key of type tuple", metadata)
    write_metadata(folder, b"\x80\x04" + nested + b".")
    assert_refused(
        folder,
        kd.CheckpointFormatError,
        "is not DCP metadata kdcore reads: the pickled object is not a Metadata",
        metadata,
    )
    write_metadata(folder, metadata_with(original, "stand-in offset", nested))
    assert_refused(
        folder,
        kd.CheckpointFormatError,
        r"storage of 'fc1\.weight': offset must be a non-negative 64-bit integer, got "
        r"\(\(\(\(\.\.\.\),",
        metadata,
    )


def pickled_with_getattr(metadata: Any, lookup: Callable[[Any], tuple[Any, str]]) -> bytes:
    """``metadata`` pickled with each memory-format enum member as ``getattr(*lookup(member))``,
    as some Python 3.11 releases pickle enum members."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, _MEM_FORMAT_ENCODING):
                return getattr, lookup(obj)
            return NotImplemented

    buffer = io.BytesIO()
    Pickler(buffer, protocol=4).dump(metadata)
    assert b"getattr" in buffer.getvalue()
    return buffer.getvalue()


def test_getattr_in_dcp_metadata_is_only_an_enum_member_lookup(
    tmp_path: Path, batch: torch.Tensor
) -> None:
    """Python 3.11.2 pickles enum members as getattr(EnumClass, "NAME"); nothing else passes."""
    from torch.distributed.checkpoint.metadata import Metadata

    model = TinyNet()
    folder = kd.save(model, tmp_path / "run", backend="torch-dcp")
    real = pickle.loads((dcp_checkpoint(folder) / ".metadata").read_bytes())  # trusted
    metadata = write_metadata(folder, pickled_with_getattr(real, lambda m: (type(m), m.name)))
    assert torch.equal(kd.restore(TinyNet(), folder)(batch), model(batch))
    write_metadata(folder, pickled_with_getattr(real, lambda m: (Metadata, "__reduce__")))
    assert_refused(
        folder,
        kd.CheckpointFormatError,
        r"uses builtins\.getattr on .*, not as an enum member lookup; refused without running",
        metadata,
    )
    write_metadata(folder, pickled_with_getattr(real, lambda m: (subprocess.Popen, "wait")))
    assert_refused(
        folder,
        kd.CheckpointFormatError,
        r"refers to subprocess\.Popen, which is not one of the classes this format uses",
        metadata,
    )
