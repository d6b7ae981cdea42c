"""What a new user gets wrong with the teacher cache is refused or repaired with a kdcore error
naming the cause: caching a cached teacher, damaged values, a failed first run, per-example
data, damaged or missing shards, inputs that differ from the cached ones, criteria a cache
cannot serve, and CLI misuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import kdcore as kd
from kdcore.cli import main
from kdcore.plugin import TeacherCache
from tests.conftest import TinyNet
from tests.test_teacher_cache_cli import write_job

SHARD = "shard-00000.safetensors"


def batches() -> list[torch.Tensor]:
    return list(torch.randn(12, 4, generator=torch.Generator().manual_seed(3)).split(4))


def teacher() -> TinyNet:
    torch.manual_seed(7)
    return TinyNet(width=16, classes=10)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return kd.cache_teacher(teacher(), batches(), tmp_path / "cache", top_k=4, examples_per_shard=4)


def student(folder: Path, criterion: Any = None) -> Any:
    criterion = criterion or {"name": "topk_kl", "k": 4}
    spec = {"teacher_model": {"name": "cached", "path": str(folder)}, "criterion": criterion}
    return kd.convert(TinyNet(classes=10), [("kd_loss", spec)])


def loss(model: Any, batch: torch.Tensor) -> float:
    model(batch)
    return float(model.compute_kd_loss().detach())


def shards(folder: Path) -> list[str]:
    return [entry["file"] for entry in json.loads((folder / "manifest.json").read_text())["shards"]]


def edit_shard(folder: Path, name: str, change: Any) -> None:
    tensors = load_file(folder / name)
    change(tensors)
    save_file(tensors, folder / name)


# ---- H2: a cached teacher cannot be cached again ---------------------------------------------


def test_caching_a_cached_teacher_is_refused(cache: Path, tmp_path: Path) -> None:
    for spec in ({"name": "cached", "path": str(cache)}, student(cache).teacher_model):
        with pytest.raises(kd.TeacherCacheError, match="cache the teacher it was written from"):
            kd.cache_teacher(spec, batches(), tmp_path / "again", top_k=4)
        assert not (tmp_path / "again" / "manifest.json").exists()


# ---- H3: served values are checked -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t["values"].fill_(float("nan")), "a NaN or \\+inf value"),
        (lambda t: t["values"].add_(50.0), "a value above its log-sum-exp"),
        (lambda t: t["logsumexp"].fill_(float("inf")), "a log-sum-exp that is not finite"),
        (lambda t: t["tail"].fill_(float("nan")), "a NaN or \\+inf tail"),
        (lambda t: t["tail"].add_(50.0), "a tail above its log-sum-exp"),
    ],
)
def test_damaged_values_are_refused_when_served(cache: Path, change: Any, message: str) -> None:
    edit_shard(cache, SHARD, change)
    model = student(cache)
    with pytest.raises(kd.TeacherCacheError, match=f"{SHARD}: example 0 .*holds {message}"):
        loss(model, batches()[0])
    assert loss(model, batches()[1]) > 0  # other shards are still served


def test_an_empty_tail_is_served(tmp_path: Path) -> None:
    """With top_k = V the kept entries hold all the mass: the tail is -inf, and that is valid."""
    folder = kd.cache_teacher(teacher(), batches(), tmp_path / "all", top_k=10)
    assert loss(student(folder, {"name": "topk_kl", "k": 10}), batches()[0]) >= 0


# ---- M1: a failed first run leaves nothing that blocks the corrected one ---------------------


def test_a_failed_first_run_does_not_lock_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    with pytest.raises(kd.TeacherCacheError, match="top_k=20 exceeds the vocabulary size 10"):
        kd.cache_teacher(teacher(), batches(), folder, top_k=20)
    assert not (folder / "manifest.json").exists()
    kd.cache_teacher(teacher(), batches(), folder, top_k=4)
    assert loss(student(folder), batches()[0]) > 0


def test_a_shard_less_manifest_of_other_settings_is_written_over(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    kd.cache_teacher(teacher(), [], folder, top_k=5)  # an empty cache: a manifest, no shards
    assert shards(folder) == []
    kd.cache_teacher(teacher(), batches(), folder, top_k=4)
    assert loss(student(folder), batches()[0]) > 0


# ---- M2: data yields batches -----------------------------------------------------------------


def test_per_example_dicts_are_refused_asking_for_batches(tmp_path: Path) -> None:
    examples = [{"input_ids": torch.arange(6)}, {"input_ids": torch.arange(1, 7)}]
    with pytest.raises(kd.TeacherCacheError, match=r"pass batches \(e\.g\. a DataLoader"):
        kd.cache_teacher(nn_lm(), examples, tmp_path / "cache", top_k=4)


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed, self.head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        return self.head(self.embed(input_ids))


def nn_lm() -> torch.nn.Module:
    return TinyLM()


# ---- M4: damaged or missing shards: inspect names them, a rerun re-writes them ---------------


def truncate(folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:-16])  # the header intact, its data short


@pytest.mark.parametrize("damage", ["truncated", "header", "missing"])
def test_a_rerun_rewrites_a_damaged_or_missing_shard(cache: Path, damage: str) -> None:
    name = shards(cache)[1]
    before = loss(student(cache), batches()[1])
    if damage == "missing":
        (cache / name).unlink()
    elif damage == "header":
        (cache / name).write_bytes((cache / name).read_bytes()[:20])
    else:
        truncate(cache, name)
    with pytest.raises(kd.TeacherCacheError, match=f"{name}: .*run kd.cache_teacher .* again"):
        student(cache)
    lines: list[str] = []
    kd.cache_teacher(teacher(), batches(), cache, top_k=4, examples_per_shard=4, log=lines.append)
    assert lines[0].startswith(f"re-writing damaged shards: {name}")
    assert loss(student(cache), batches()[1]) == pytest.approx(before, rel=1e-6)


def test_inspect_names_a_damaged_shard_and_shows_the_rest(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncate(cache, shards(cache)[1])
    (cache / shards(cache)[2]).unlink()
    assert main(["inspect", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "coverage: 4 examples, 4 positions" in out and "3 shards (2 damaged)" in out
    assert f"damaged: {shards(cache)[1]} is not a readable safetensors shard" in out
    assert f"damaged: {shards(cache)[2]} is missing" in out
    assert "again with the same teacher and arguments" in out


def test_inspect_help_describes_caches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "For a teacher cache folder" in text and "damaged shard is named" in text


# ---- low: what a lookup miss, a criterion or the CLI says -----------------------------------


def test_a_float64_copy_of_cached_inputs_names_the_dtype(cache: Path) -> None:
    with pytest.raises(kd.TeacherCacheError, match="torch.float64, cached as torch.float32"):
        loss(student(cache), batches()[0].double())


def test_a_padded_batch_without_attention_mask_names_the_padding(tmp_path: Path) -> None:
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    folder = kd.cache_teacher(nn_lm(), [{"input_ids": ids}], tmp_path / "cache", top_k=4)
    model = kd.convert(
        nn_lm(),
        [("kd_loss", {"teacher_model": {"name": "cached", "path": str(folder)},
                      "criterion": {"name": "topk_kl", "k": 4}})],
    )  # fmt: skip
    padded = torch.tensor([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 0, 0]])
    with pytest.raises(kd.TeacherCacheError, match="trailing 0 tokens .* pass its attention_mask"):
        model(padded)


def test_an_uncached_example_mentions_the_eval_set(cache: Path) -> None:
    with pytest.raises(kd.TeacherCacheError, match="the eval set too"):
        loss(student(cache), torch.randn(2, 4))


@pytest.mark.parametrize(
    "criterion",
    [
        {"name": "mse"},
        {("fc1", "fc1"): {"name": "fitnet", "student_width": 8, "teacher_width": 16}},
        {("", ""): {"name": "fused_logits", "student_head": "fc2", "teacher_head": "fc2"}},
    ],
)
def test_a_dense_criterion_on_a_cached_teacher_names_the_sparse_ones(
    cache: Path, criterion: Any
) -> None:
    with pytest.raises(kd.KDCoreError, match=r"topk_kl, forward_kl, logits"):
        loss(student(cache, criterion), batches()[0])


def test_a_crafted_shard_entry_outside_the_folder_is_named(cache: Path) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../c2/shard-00000.safetensors"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(kd.TeacherCacheError, match=r"bad shard entry .*\.\./c2/shard-00000"):
        student(cache)


def test_cache_teacher_into_a_file_or_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(kd.TeacherCacheError, match="is a file"):
        kd.cache_teacher(teacher(), batches(), file, top_k=4)
    with pytest.raises(kd.TeacherCacheError, match="not empty and not a teacher cache"):
        kd.cache_teacher(teacher(), batches(), tmp_path, top_k=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_another_ranks_manifest_being_written_is_not_a_foreign_file(tmp_path: Path) -> None:
    # Under torchrun a rank may look at the folder while another writes its first list: the
    # atomic write's temporary file is there, its manifest-rankR.json not yet (a CI failure).
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / ".manifest-rank0.json.0123456789ab.tmp").write_text("{")
    (folder / "shard-rank0-00000.safetensors").write_bytes(b"")
    kd.cache_teacher(teacher(), batches(), folder, top_k=4)
    assert TeacherCache(folder).examples == sum(len(b) for b in batches())


def test_cli_cache_teacher_errors_name_the_flag_or_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path)
    assert main(["cache-teacher", str(job), str(job)]) == 1
    assert "is a file" in capsys.readouterr().err
    assert main(["cache-teacher", str(job), str(tmp_path / "c"), "--top-p", "1.5"]) == 1
    err = capsys.readouterr().err
    assert "--top-p must be in (0, 1], got 1.5" in err and str(job) not in err
