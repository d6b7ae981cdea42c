"""Offline distillation on the digits demo itself (its data, its models, its temperature): a
lossless cache of the teacher gives online ``topk_kl``'s loss and gradients, and ``kdcore
distill`` trains from the cache as from the teacher."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import kdcore as kd
from kdcore.cli import main
from kdcore.training.demo import MLP, TEST_IMAGES, load_digits
from kdcore.training.loop import IGNORE_LABEL

LABELS = 100  # the demo's labelled training images
CRITERION = {"name": "topk_kl", "k": 5, "tail_bucket": True, "temperature": 4.0}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()  # tiny models: a second thread only adds waiting
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits() -> tuple[TensorDataset, TensorDataset]:
    """The demo's split: its training images (all but LABELS of them unlabelled) and its
    held-out test images."""
    x, y = load_digits()
    draw = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=draw)
    test, training = order[:TEST_IMAGES], order[TEST_IMAGES:]
    few = torch.full_like(y[training], IGNORE_LABEL)
    keep = torch.randperm(len(training), generator=draw)[:LABELS]
    few[keep] = y[training][keep]
    return TensorDataset(x[training], few), TensorDataset(x[test], y[test])


@functools.cache
def _teacher() -> MLP:
    """The demo's teacher (two hidden layers of 256), trained on every training label for a
    few Adam steps (the demo takes 600)."""
    x, y = load_digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[TEST_IMAGES:]
    torch.manual_seed(0)
    model = MLP(width=256, depth=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for batch in order.split(64)[:15]:
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval().requires_grad_(False)


def teacher() -> MLP:
    return copy.deepcopy(_teacher())


def student() -> MLP:
    torch.manual_seed(1)
    return MLP(width=8, depth=1)


def test_a_lossless_cache_of_the_demo_teacher_gives_online_topk_kl_exactly(
    tmp_path: Path,
) -> None:
    images = digits()[0].tensors[0]
    kd.cache_teacher(teacher(), images.split(64), tmp_path, top_k=5, temperature=4.0)
    for batch in (images[:64], images[640:704], images[-20:]):
        results = []
        for source in (teacher(), {"name": "cached", "path": str(tmp_path)}):
            model = kd.convert(
                student(), [("kd_loss", {"teacher_model": source, "criterion": CRITERION})]
            )
            model(batch)
            loss = model.compute_kd_loss()
            loss.backward()
            results.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
        (online, online_grads), (offline, offline_grads) = results
        assert float(online) > 0.01
        torch.testing.assert_close(offline, online, rtol=1e-6, atol=0.0)
        for a, b in zip(online_grads, offline_grads, strict=True):
            assert float((b - a).norm() / a.norm()) <= 1e-6


JOB = """
[train]
student = "tests.test_teacher_cache_digits:student"
data = "tests.test_teacher_cache_digits:digits"
optimizer = "adam"
learning_rate = 3e-3
steps = 30
batch_size = 64
log_every = 10
eval_every = 0
output = "{output}"
seed = 1
loggers = []

[kd_loss]
teacher_model = {teacher}
loss_balancer = {{ name = "static", kd_loss_weight = 0.7 }}
[[kd_loss.criterion]]
student = ""
teacher = ""
loss = {{ name = "topk_kl", k = 5, tail_bucket = true, temperature = 4.0 }}
"""


def test_kdcore_distill_trains_the_demo_student_from_a_cache_as_from_the_teacher(
    tmp_path: Path,
) -> None:
    online = tmp_path / "online.toml"
    teacher_spec = '{ name = "callable", target = "tests.test_teacher_cache_digits:teacher" }'
    online.write_text(JOB.format(output=(tmp_path / "online").as_posix(), teacher=teacher_spec))
    cache = tmp_path / "cache"
    assert (
        main(["cache-teacher", str(online), str(cache), "--top-k", "5", "--temperature", "4"]) == 0
    )
    offline = tmp_path / "offline.toml"
    cached = f'{{ name = "cached", path = "{cache.as_posix()}" }}'
    offline.write_text(JOB.format(output=(tmp_path / "offline").as_posix(), teacher=cached))

    assert main(["distill", str(online)]) == 0
    assert main(["distill", str(offline)]) == 0
    trained = [
        kd.restore(student(), tmp_path / run / "student.safetensors").state_dict()
        for run in ("online", "offline")
    ]
    moved = max(
        float((t - s).abs().max())
        for t, s in zip(trained[0].values(), student().state_dict().values(), strict=True)
    )
    assert moved > 0.01
    for name, tensor in trained[0].items():
        torch.testing.assert_close(trained[1][name], tensor, rtol=0.0, atol=1e-6, msg=name)
