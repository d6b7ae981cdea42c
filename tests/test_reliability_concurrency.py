"""Several processes at one checkpoint path, and files that are not what they seem.

* Concurrent ``kd.save`` calls to one path each succeed (or raise ``CheckpointWriteError``), and
  the path ends with one complete checkpoint: the one committed last.
* A ``kd.restore`` while others save gets the old or the new checkpoint, complete.
* A FIFO or device where a checkpoint file is expected is refused at once; a folder without write
  permission is a ``CheckpointWriteError``; symlinked shards are reported by ``kdcore inspect``;
  a save keeps the mode of the file it replaces.

Every process is forked, every wait is bounded (a hang fails the test instead of blocking CI),
and each process logs what it did with ``time.monotonic()`` stamps (one clock for all processes
on Linux), so the checks say which save a reader may have seen.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import kdcore as kd
from kdcore.cli import main
from kdcore.plugin import inspect_checkpoint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fork, FIFOs and flock are POSIX")

FORK = multiprocessing.get_context("fork")
BACKENDS: dict[str, dict[str, Any]] = {
    "safetensors": {},
    "safetensors-sharded": {"max_shard_size": "2KB"},  # three shards
    "torch-dcp": {},
}
INITIAL = -1.0  # the value every parameter of the checkpoint holds before a test's saves


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8))


def save_value(path: Path, backend: str, value: float) -> None:
    """Save a model whose every parameter holds ``value``; with odd values, with optimizer
    state too, so that files of consecutive saves differ in size."""
    model = net()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)
    optimizer = None
    if int(value) % 2:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()  # momentum buffers of zeros; the parameters keep ``value``
    kd.save(model, path, optimizer=optimizer, backend=backend, **BACKENDS[backend])


def read_value(path: Path) -> float:
    """The one value every parameter of the checkpoint holds (a mix of saves fails here)."""
    model = kd.restore(net(), path)
    with torch.no_grad():
        values = {float(v) for p in model.parameters() for v in (p.min(), p.max())}
    if len(values) != 1:
        raise AssertionError(f"{path} mixes saves: {sorted(values)}")
    return values.pop()


# ============================================================== schedules of processes
@attrs.frozen
class Event:
    kind: str  # "save" or "read"
    value: float | None  # saved, or read
    start: float
    end: float
    error: str | None = None


def _worker(
    log: Path, path: Path, backend: str, kind: str, plan: list[tuple[float, float]]
) -> None:
    """Forked: for each (delay, value), sleep, then save ``value`` or read; log each outcome."""
    torch.set_num_threads(1)
    with open(log, "w") as out:
        for delay, value in plan:
            time.sleep(delay)
            start = time.monotonic()
            error, result = None, value
            try:
                if kind == "save":
                    save_value(path, backend, value)
                else:
                    result = read_value(path)
            except BaseException as exc:  # logged, and the test fails on it
                error = "".join(traceback.format_exception_only(exc)).strip()
                if not isinstance(exc, (kd.KDCoreError, AssertionError)):
                    error += "\n" + traceback.format_exc()
            end = time.monotonic()
            out.write(json.dumps(attrs.asdict(Event(kind, result, start, end, error))) + "\n")
            out.flush()


def run_schedule(
    path: Path,
    backend: str,
    writers: list[list[float]],
    readers: list[list[float]],
    timeout: float = 60.0,
) -> list[Event]:
    """Fork one process per writer (each saves once per delay, with values unique to it) and
    per reader (one restore per delay), all at once; return every process's events."""
    logs = path.parent / f"{path.name}-logs"
    logs.mkdir(exist_ok=True)
    processes = []
    jobs = [("save", i, delays) for i, delays in enumerate(writers)]
    jobs += [("read", i, delays) for i, delays in enumerate(readers)]
    for kind, number, delays in jobs:
        plan = [(delay, float(1000 * (number + 1) + step)) for step, delay in enumerate(delays)]
        log = logs / f"{kind}-{number}.jsonl"
        process = FORK.Process(target=_worker, args=(log, path, backend, kind, plan))
        process.start()
        processes.append((process, log))
    deadline = time.monotonic() + timeout
    try:
        for process, _ in processes:
            process.join(max(deadline - time.monotonic(), 0.1))
            assert not process.is_alive(), f"a {backend} process still runs after {timeout} s"
            assert process.exitcode == 0
    finally:
        for process, _ in processes:
            if process.is_alive():
                process.kill()
                process.join()
    events = []
    for _, log in processes:
        events += [Event(**json.loads(line)) for line in log.read_text().splitlines()]
    return events


def check_history(path: Path, events: list[Event]) -> float:
    """Every save and read succeeded; each read saw a complete checkpoint that was current at
    some moment of the read; the path holds a save that may have committed last. Returns the
    final value."""
    failures = [event.error for event in events if event.error]
    assert not failures, "\n".join(failures)  # type: ignore[arg-type]
    saves = [event for event in events if event.kind == "save"]
    origin = {event.value: event for event in saves}
    origin[INITIAL] = Event("save", INITIAL, -float("inf"), -float("inf"))
    for read in (event for event in events if event.kind == "read"):
        source = origin.get(read.value)
        assert source is not None, f"read {read.value}, which no save wrote"
        assert source.start < read.end, f"read {read.value} before its save began"
        newer = [s for s in saves if s.start > source.end and s.end < read.start]
        assert not newer, f"read {read.value} after save {newer[0].value} had replaced it"
    final = read_value(path)
    last_start = max(event.start for event in saves)
    candidates = {event.value for event in saves if event.end >= last_start}
    assert final in candidates, f"the path holds {final}; the last commit was one of {candidates}"
    return final


def leftovers(path: Path) -> list[str]:
    """Files a finished save should not have left: temporaries, locks, unindexed shards, older
    DCP folders."""
    if not path.is_dir():
        return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))
    names = {p.name for p in path.iterdir()}
    expected = set()
    if "model.safetensors.index.json" in names:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        expected = {"model.safetensors.index.json", *index["weight_map"].values()}
    if "kdcore-dcp.json" in names:
        marker = json.loads((path / "kdcore-dcp.json").read_text())
        expected = {"kdcore-dcp.json", marker["checkpoint"]}
    return sorted(names - expected)


# ============================================================== concurrent writers
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_concurrent_saves_to_one_path_all_succeed_and_the_last_commit_wins(
    tmp_path: Path, backend: str
) -> None:
    """Three processes save to one path at once, again and again: none fails, and the path
    then holds one complete checkpoint from a save that may have committed last."""
    path = tmp_path / "run"
    save_value(path, backend, INITIAL)
    saves = 40 if backend == "safetensors" else 8
    events = run_schedule(path, backend, writers=[[0.0] * saves] * 3, readers=[])
    check_history(path, events)
    assert leftovers(path) == []


# ============================================================== readers during saves
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_restoring_while_another_process_saves_gets_the_old_or_the_new_checkpoint(
    tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "run"
    save_value(path, backend, INITIAL)
    # The single file's window (between opening the file and reading its size) is short.
    saves, reads = (150, 250) if backend == "safetensors" else (12, 25)
    events = run_schedule(
        path, backend, writers=[[0.0] * saves, [0.001] * saves], readers=[[0.0] * reads] * 2
    )
    check_history(path, events)
    seen = {event.value for event in events if event.kind == "read"}
    assert len(seen) >= 2, f"the readers saw only {seen}: no read overlapped a save"


@st.composite
def schedules(draw: st.DrawFn) -> tuple[str, list[list[float]], list[list[float]]]:
    delays = st.lists(st.sampled_from([0.0, 0.0005, 0.002, 0.01]), min_size=1, max_size=4)
    backend = draw(st.sampled_from(list(BACKENDS)))
    writers = draw(st.lists(delays, min_size=1, max_size=3))
    readers = draw(st.lists(delays, min_size=0, max_size=2))
    return backend, writers, readers


@given(schedule=schedules())
@settings(
    max_examples=9,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_any_schedule_of_saves_and_restores_reads_old_or_new_and_ends_complete(
    tmp_path_factory: pytest.TempPathFactory,
    schedule: tuple[str, list[list[float]], list[list[float]]],
) -> None:
    backend, writers, readers = schedule
    path = tmp_path_factory.mktemp("schedule") / "run"
    save_value(path, backend, INITIAL)
    check_history(path, run_schedule(path, backend, writers, readers))
    assert leftovers(path) == []


@pytest.mark.slow
@given(schedule=schedules())
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_many_schedules_of_saves_and_restores_read_old_or_new_and_end_complete(
    tmp_path_factory: pytest.TempPathFactory,
    schedule: tuple[str, list[list[float]], list[list[float]]],
) -> None:
    test_any_schedule_of_saves_and_restores_reads_old_or_new_and_ends_complete.hypothesis.inner_test(  # type: ignore[attr-defined]
        tmp_path_factory, schedule
    )


# ============================================================== files that are not files
def _in_child(function: Callable[[], None], timeout: float = 30.0, user: int | None = None) -> str:
    """Run ``function`` in a forked process (as ``user`` when given); return what it raised,
    as ``"Class: message"`` ("" when nothing), failing if it runs past ``timeout``."""
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(reading)
        outcome = ""
        try:
            if user is not None:
                os.setgid(user)
                os.setuid(user)
            function()
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, kd.KDCoreError):
                outcome = "kdcore " + outcome
        os.write(writing, outcome.encode())
        os._exit(0)
    os.close(writing)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"{function} still runs after {timeout} s (blocked)")
        with os.fdopen(reading, "rb") as pipe:
            return pipe.read().decode()
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def _dcp_files(path: Path) -> dict[str, Path]:
    marker = json.loads((path / "kdcore-dcp.json").read_text())
    folder = path / marker["checkpoint"]
    return {
        "marker": path / "kdcore-dcp.json",
        "metadata": folder / ".metadata",
        "data": next(folder.glob("*.distcp")),
    }


def _checkpoint_files(path: Path, backend: str) -> dict[str, Path]:
    if backend == "safetensors":
        return {"file": path}
    if backend == "safetensors-sharded":
        shard = sorted(path.glob("model-*.safetensors"))[0]
        return {"index": path / "model.safetensors.index.json", "shard": shard}
    return _dcp_files(path)


SPECIAL_FILES = [
    (backend, role, kind)
    for backend, roles in [
        ("safetensors", ["file"]),
        ("safetensors-sharded", ["index", "shard"]),
        ("torch-dcp", ["marker", "metadata", "data"]),
    ]
    for role in roles
    for kind in ["fifo", "device"]
]


@pytest.mark.parametrize(("backend", "role", "kind"), SPECIAL_FILES)
def test_a_fifo_or_device_in_place_of_a_checkpoint_file_is_refused_at_once(
    tmp_path: Path, backend: str, role: str, kind: str
) -> None:
    """Opening a FIFO blocks until a writer comes and /dev/zero never ends: restore and
    inspect must refuse both without reading them, naming the file."""
    path = tmp_path / "run"
    save_value(path, backend, 1.0)
    target = _checkpoint_files(path, backend)[role]
    if role == "marker":  # with DCP's own metadata beside it, the folder is DCP's at first sight
        shutil.copy(_dcp_files(path)["metadata"], path / ".metadata")
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    for call in (lambda: read_value(path), lambda: inspect_checkpoint(path)):
        outcome = _in_child(call, timeout=20)
        assert outcome.startswith("kdcore "), outcome
    assert target.name in outcome, outcome


# ============================================================== permissions and modes
def _unprivileged() -> int | None:
    """As root, a user to drop to (root writes into any folder); else None."""
    return 65534 if os.geteuid() == 0 else None


@pytest.fixture
def searchable_tmp(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, or as root a folder other users can reach (pytest's is private to root)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="kdcore-permissions-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_saving_into_a_folder_without_write_permission_is_a_checkpoint_write_error(
    searchable_tmp: Path, backend: str
) -> None:
    folder = searchable_tmp / "readonly"
    folder.mkdir()
    path = folder / "run"
    if backend != "safetensors":
        path.mkdir()  # an existing checkpoint folder the user cannot write into
    folder.chmod(0o555)
    path.parent.chmod(0o555)
    if path.is_dir():
        path.chmod(0o555)
    # As root, drop to nobody in the child: root writes into any folder.
    user = 65534 if os.geteuid() == 0 else None
    outcome = _in_child(lambda: save_value(path, backend, 1.0), user=user)
    assert outcome.startswith("kdcore CheckpointWriteError"), outcome
    assert str(path) in outcome
    assert sorted(p.name for p in folder.iterdir()) == ([] if backend == "safetensors" else ["run"])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_new_checkpoint_gets_the_umask_mode_and_a_save_keeps_an_existing_files_mode(
    tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "run"
    previous = os.umask(0o027)
    try:
        save_value(path, backend, 1.0)
    finally:
        os.umask(previous)
    files = [p for p in [path, *path.rglob("*")] if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files
    ]
    if backend == "safetensors":
        path.chmod(0o604)
        save_value(path, backend, 2.0)
        assert stat.S_IMODE(path.stat().st_mode) == 0o604
    elif backend == "safetensors-sharded":
        index = path / "model.safetensors.index.json"
        index.chmod(0o604)
        save_value(path, backend, 2.0)
        assert stat.S_IMODE(index.stat().st_mode) == 0o604


# ============================================================== symlinks
@contextlib.contextmanager
def _captured(capsys: pytest.CaptureFixture[str]) -> Iterator[list[str]]:
    out: list[str] = []
    yield out
    out.append(capsys.readouterr().out)


def test_inspect_shows_where_symlinked_shards_really_live(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hugging Face caches link shards into a blob store: restore follows the links (as
    documented), and ``kdcore inspect`` names each shard's real location, flagging those
    outside the checkpoint folder."""
    path = tmp_path / "run"
    save_value(path, "safetensors-sharded", 3.0)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.rename(blobs / "abc123")
    shard.symlink_to(blobs / "abc123")
    assert read_value(path) == 3.0
    with _captured(capsys) as out:
        assert main(["inspect", str(path)]) == 0
    assert str(blobs / "abc123") in out[0] and "outside the checkpoint folder" in out[0]
    with _captured(capsys) as out:
        assert main(["inspect", str(path), "--json"]) == 0
    files = {f["name"]: f for f in json.loads(out[0])["files"]}
    assert files[shard.name]["location"] == str(blobs / "abc123")
    assert files[shard.name]["outside"] is True
    assert files["model.safetensors.index.json"]["outside"] is False


def test_inspect_shows_a_dcp_folder_linked_from_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run"
    save_value(path, "torch-dcp", 4.0)
    folder = _dcp_files(path)["metadata"].parent
    elsewhere = tmp_path / "elsewhere"
    folder.rename(elsewhere)
    folder.symlink_to(elsewhere)
    assert read_value(path) == 4.0
    summary = inspect_checkpoint(path)
    outside = {f["name"] for f in summary["files"] if f["outside"]}
    assert f"{folder.name}/.metadata" in outside
    # A new save replaces the link and removes it, never what it points to.
    save_value(path, "torch-dcp", 5.0)
    assert not folder.is_symlink() and (elsewhere / ".metadata").is_file()
