"""Faults while saving: a process killed at random moments of ``kd.save``, a full disk, a failing
fsync or rename. The path always holds the old checkpoint or the new one, both loadable, and no
temporary file outlives the next successful save.

(tests/test_checkpoint.py and tests/test_sharded_backends.py each kill one save; this file kills
many, at measured random moments, and checks every outcome.)
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kdcore as kd
from tests.conftest import FullDisk, TinyNet, trained_model

ROOT = Path(__file__).parent.parent
LAYERS, WIDTH = 2, 512  # 2 MiB of float32: a save takes long enough to be hit mid-way

# One helper process imports torch once, then forks a child per trial that saves the model
# (every parameter filled with the trial number) over the checkpoint; the helper kills it after
# a random delay, log-uniform from 0.1 ms to 3 x a measured forked save, and waits for the test
# to check the file.
KILLER = (
    textwrap.dedent(
        """
    import math, os, random, signal, sys, time
    import torch
    import kdcore as kd

    torch.set_num_threads(1)
    rng = random.Random(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])

    def fill(value):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(value)

    for job in sys.argv[1:]:
        path, backend, trials = job.split(",")
        options = {"max_shard_size": "300KB"} if backend == "safetensors-sharded" else {}
        fill(0)
        kd.save(model, path, backend=backend, **options)
        # Timed as the trials run: in a forked child (its first writes copy pages, which a save
        # in this process would not pay; timed here, kills could all land before the rename).
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                kd.save(model, path, backend=backend, **options)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        duration = time.perf_counter() - start
        for trial in range(1, int(trials) + 1):
            fill(trial)
            pid = os.fork()
            if pid == 0:
                try:
                    kd.save(model, path, backend=backend, **options)
                finally:
                    os._exit(0)
            # Log-uniform from 0.1 ms to 3 saves: kills early in the write, at the rename and
            # after it, whatever the fork and page-copy costs of this machine.
            time.sleep(math.exp(rng.uniform(math.log(1e-4), math.log(3 * duration))))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            print(trial, "killed" if os.WIFSIGNALED(status) else "finished", flush=True)
            sys.stdin.readline()
    """
    )
    .replace("LAYERS", str(LAYERS))
    .replace("WIDTH", str(WIDTH))
)
JOBS = [("safetensors", 24), ("safetensors-sharded", 6), ("torch-dcp", 6)]


def fresh_model() -> nn.Module:
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def saved_value(path: Path, model: nn.Module) -> float:
    """The one value every parameter of the checkpoint holds (a mix would fail here)."""
    model = kd.restore(model, path)
    with torch.no_grad():
        values = {float(v) for p in model.parameters() for v in (p.min(), p.max())}
    assert len(values) == 1, f"the checkpoint mixes saves: {sorted(values)}"
    return values.pop()


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


@pytest.mark.slow
def test_killing_save_at_random_moments_leaves_the_old_or_the_new_checkpoint(
    tmp_path: Path,
) -> None:
    """36 saves SIGKILLed (24 single-file, 6 sharded, 6 DCP): old or new, never a mix."""
    paths = {backend: tmp_path / backend / "run" for backend, _ in JOBS}
    for path in paths.values():
        path.parent.mkdir()
    jobs = [f"{paths[backend]},{backend},{trials}" for backend, trials in JOBS]
    helper = subprocess.Popen(
        [sys.executable, "-c", KILLER, *jobs],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert helper.stdin is not None and helper.stdout is not None
    model = fresh_model()
    try:
        for backend, trials in JOBS:
            path, outcomes = paths[backend], {"old": 0, "new": 0}
            previous = 0.0
            for trial in range(1, trials + 1):
                number, status = helper.stdout.readline().split()
                assert int(number) == trial
                value = saved_value(path, model)
                assert value in (previous, float(trial)), (backend, trial, previous, value)
                if status == "finished":
                    assert value == trial
                outcomes["new" if value == trial else "old"] += 1
                previous = value
                helper.stdin.write("\n")
                helper.stdin.flush()
            # Kills landed on both sides of the rename (all but certain at 24 trials).
            if trials >= 20:
                assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes
    finally:
        helper.stdin.close()
        helper.wait(timeout=60)
        helper.stdout.close()
    assert helper.returncode == 0
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(-1.0)
    for backend, path in paths.items():
        # The next successful save removes what killed saves left behind.
        options: dict[str, Any] = {"max_shard_size": "300KB"} if "sharded" in backend else {}
        kd.save(model, path, backend=backend, **options)
        assert temporaries(path.parent) == [], backend
        assert saved_value(path, fresh_model()) == -1.0
    assert sorted(p.name for p in paths["safetensors"].parent.iterdir()) == ["run"]


def test_a_temporary_file_a_live_writer_holds_is_not_removed(tmp_path: Path) -> None:
    """Cleaning up after killed saves never takes a file another save is still writing."""
    import fcntl

    path = tmp_path / "run.safetensors"
    live = tmp_path / ".run.safetensors.abc123xy.tmp"
    dead = tmp_path / ".run.safetensors.zzz999qq.tmp"
    dead.write_bytes(b"left by a killed save")
    with open(live, "wb") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        kd.save(nn.Linear(2, 2), path)
        assert live.exists() and not dead.exists()
    kd.save(nn.Linear(2, 2), path)
    assert not live.exists()


# ------------------------------------------------------------------ a full disk
def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


BACKEND_OPTIONS: dict[str, dict[str, Any]] = {
    "safetensors": {},
    "safetensors-sharded": {"max_shard_size": 300},
    "torch-dcp": {},
}


@pytest.mark.parametrize("backend", list(BACKEND_OPTIONS))
@pytest.mark.parametrize("budget", ["0", "7", "8", "100", "10%", "50%", "90%", "all but 1"])
def test_a_full_disk_at_any_byte_raises_a_clear_error_and_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, budget: str
) -> None:
    """The disk fills after ``budget`` of the bytes the save writes (in any of its files)."""
    model, optimizer = trained_model()
    options = BACKEND_OPTIONS[backend]
    path = kd.save(model, tmp_path / "run", backend=backend, optimizer=optimizer, **options)
    before = snapshot(tmp_path)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)  # the failed save must not show this
    remaining, real_fdopen = [2**62], os.fdopen

    def fdopen(descriptor: int, *args: Any, **kwargs: Any) -> Any:
        return FullDisk(real_fdopen(descriptor, *args, **kwargs), remaining)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fdopen", fdopen)
        if backend == "torch-dcp":  # DCP opens its own files: its tensor writes fail instead
            from torch.distributed.checkpoint import filesystem

            real_write_item = filesystem._write_item

            def write_item(stream: Any, *args: Any, **kwargs: Any) -> Any:
                return real_write_item(FullDisk(stream, remaining), *args, **kwargs)

            patch.setattr(filesystem, "_write_item", write_item)
        probe = kd.save(model, tmp_path / "probe", backend=backend, optimizer=optimizer, **options)
        total = 2**62 - remaining[0]  # what one save writes through the patched files
        remaining[0] = {"10%": total // 10, "50%": total // 2, "90%": total * 9 // 10}.get(
            budget, total - 1 if budget == "all but 1" else int(budget.rstrip("%") or 0)
        )
        with pytest.raises(kd.CheckpointWriteError, match=r"the disk is full.*unchanged") as info:
            kd.save(model, path, backend=backend, optimizer=optimizer, **options)
    assert isinstance(info.value, kd.KDCoreError) and isinstance(info.value, OSError)
    assert str(path) in str(info.value)
    if probe.is_dir():
        shutil.rmtree(probe)
    else:
        probe.unlink()
    assert snapshot(tmp_path) == before, "the old checkpoint changed or a file was left behind"
    restored = kd.restore(TinyNet(), path)
    assert not torch.equal(restored.fc1.weight, model.fc1.weight)


@pytest.mark.parametrize("backend", list(BACKEND_OPTIONS))
@pytest.mark.parametrize(
    ("call", "error"),
    [("fsync", errno.EIO), ("fsync", errno.ENOSPC), ("replace", errno.EACCES)],
)
def test_a_failing_fsync_or_rename_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, call: str, error: int
) -> None:
    model, _ = trained_model()
    options = BACKEND_OPTIONS[backend]
    path = kd.save(model, tmp_path / "run", backend=backend, **options)
    before = snapshot(tmp_path)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    real = getattr(os, call)

    def failing(*args: Any, **kwargs: Any) -> Any:
        if call == "fsync" and not Path(f"/proc/self/fd/{args[0]}").resolve().is_file():
            return real(*args, **kwargs)  # folders may sync; files may not
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, call, failing)
    with pytest.raises(kd.CheckpointWriteError, match="unchanged") as info:
        kd.save(model, path, backend=backend, **options)
    if error == errno.ENOSPC:
        assert "the disk is full" in str(info.value)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
