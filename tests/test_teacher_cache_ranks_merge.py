"""A cache that ranks of a torchrun run left unmerged (killed before rank 0 listed their shards in
manifest.json): ``kdcore inspect`` says so, and a run with another number of processes resumes
from the ranks' shards and merges them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdcore as kd
from kdcore.cli import main
from kdcore.plugin import TeacherCache
from tests.teacher_cache_ranks import data, teacher


def unmerged_cache(folder: Path) -> None:
    """The first half of the data, listed as rank 1's shards only."""
    kd.cache_teacher(teacher(), data()[:5], folder, top_k=4, examples_per_shard=3)
    (folder / "manifest.json").rename(folder / "manifest-rank1.json")


def test_inspect_names_the_ranks_lists_not_merged_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unmerged_cache(tmp_path)
    listed = json.loads((tmp_path / "manifest-rank1.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**listed, "shards": []}))  # as at start
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "coverage: 0 examples" in out
    assert "not served yet: shards listed in manifest-rank1.json only" in out

    kd.cache_teacher(teacher(), [], tmp_path, top_k=4)  # nothing to run: merges the list
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "coverage: 15 examples" in out and "not served yet" not in out


def test_one_process_resumes_from_the_ranks_shards_and_merges_them(tmp_path: Path) -> None:
    unmerged_cache(tmp_path)
    model, ran = teacher(), []
    model.register_forward_hook(lambda module, args, out: ran.append(args[0].shape[0]))
    kd.cache_teacher(model, data(), tmp_path, top_k=4, examples_per_shard=3)
    assert sum(ran) == 30 - 15  # the ranks' 15 examples did not run again

    kd.cache_teacher(teacher(), data(), tmp_path / "one", top_k=4, examples_per_shard=3)
    inputs = torch.cat(data())
    got, expected = (
        TeacherCache(tmp_path).lookup(inputs),
        TeacherCache(tmp_path / "one").lookup(inputs),
    )
    for name in ("indices", "logits", "logsumexp", "tail_logsumexp"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
