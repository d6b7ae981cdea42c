"""Crafted or damaged teacher caches are refused with a kdcore error naming the file and the
value, as crafted checkpoints are; ``kdcore inspect CACHE`` describes a cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import kdcore as kd
from kdcore.cli import main
from tests.conftest import TinyNet

SHARD = "shard-00000.safetensors"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    torch.manual_seed(7)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    return kd.cache_teacher(TinyNet(width=16, classes=10), [x], tmp_path / "cache", top_k=4)


def use(folder: Path) -> None:
    """Build a student on the cache and run one batch of its examples."""
    model = kd.convert(
        TinyNet(classes=10),
        [
            (
                "kd_loss",
                {
                    "teacher_model": {"name": "cached", "path": str(folder)},
                    "criterion": {"name": "topk_kl", "k": 4},
                },
            )
        ],
    )
    model(torch.randn(6, 4, generator=torch.Generator().manual_seed(3)))


def edit_manifest(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def edit_shard(folder: Path, change: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    tensors = load_file(folder / SHARD)
    change(tensors)
    save_file(tensors, folder / SHARD)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format="pickle"), "not a kdcore-teacher-cache manifest"),
        (lambda m: m.update(version=99), "format version 99"),
        (lambda m: m.update(top_k=0), "bad or missing 'top_k'"),
        (lambda m: m.update(compression="zip"), "bad or missing 'compression'"),
        (lambda m: m["shards"][0].update(file="../../etc/passwd"), "bad shard entry .*etc/passwd"),
        (lambda m: m["shards"][0].update(positions=7), r"tensor 'positions' has shape \[6\]"),
        (lambda m: m.pop("teacher"), "bad or missing 'teacher'"),
    ],
)
def test_a_crafted_manifest_is_refused(cache: Path, change: Any, message: str) -> None:
    edit_manifest(cache, change)
    with pytest.raises(kd.KDCoreError, match=message):
        use(cache)


def test_a_manifest_that_is_not_json_is_refused(cache: Path) -> None:
    (cache / "manifest.json").write_text('{"format": "kdcore-teacher-cache", "format": 1}')
    with pytest.raises(kd.KDCoreError, match="manifest.json: not valid JSON"):
        use(cache)


def test_a_shard_with_a_tensor_of_the_wrong_shape_is_refused(cache: Path) -> None:
    edit_shard(cache, lambda t: t.update(values=t["values"][:, :3].contiguous()))
    with pytest.raises(kd.KDCoreError, match=r"tensor 'values' has shape \[6, 3\]"):
        use(cache)


def test_a_shard_without_a_tensor_is_refused(cache: Path) -> None:
    edit_shard(cache, lambda t: t.pop("tail"))
    with pytest.raises(kd.KDCoreError, match="missing tensors \\['tail'\\]"):
        use(cache)


def test_vocabulary_indices_outside_the_vocabulary_are_refused(cache: Path) -> None:
    # 10 classes take 4 bits: a packed byte 0xFF is two indices 15 >= 10
    edit_shard(cache, lambda t: t["indices"].fill_(0xFF))
    with pytest.raises(kd.KDCoreError, match="vocabulary index 15 >= the vocabulary size 10"):
        use(cache)


def test_a_truncated_shard_is_refused(cache: Path) -> None:
    data = (cache / SHARD).read_bytes()
    (cache / SHARD).write_bytes(data[: len(data) - 40])
    with pytest.raises(kd.KDCoreError, match=SHARD):
        use(cache)


def test_a_folder_without_a_manifest_is_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(kd.KDCoreError, match="manifest.json is missing"):
        use(tmp_path)


def test_inspect_prints_the_manifest_size_and_coverage(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "top_k 4" in out and "vocab_size 10 (4 index bits)" in out
    assert "coverage: 6 examples, 6 positions" in out
    assert "bytes per position" in out
    assert main(["inspect", "--json", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 6


def test_positions_outside_the_examples_are_refused(cache: Path) -> None:
    edit_shard(cache, lambda t: t["positions"].fill_(-1))
    with pytest.raises(kd.KDCoreError, match="cached positions -1 to -1 of example 0"):
        use(cache)


def test_a_top_p_of_0_is_refused(tmp_path: Path) -> None:
    with pytest.raises(kd.ConfigError, match=r"top_p=\.\.\.\): must be in \(0, 1\], got 0"):
        kd.cache_teacher(TinyNet(), [torch.randn(2, 4)], tmp_path, top_p=0.0)
