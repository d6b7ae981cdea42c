"""Saving and restoring a ~50M-parameter student: ``kd.save``/``kd.restore`` against torch.

Variants, each timed as *save* (state on disk) and *restore* (the tensors back in a fresh model
that was built beforehand, outside the timing):

* ``kd-safetensors``: ``kd.save(model, path)`` (single-file backend) + ``kd.restore(fresh, path)``.
* ``torch``: ``torch.save(model.state_dict(), path)`` + ``fresh.load_state_dict(torch.load(path,
  weights_only=True))``. Note that ``torch.save`` does not fsync while ``kd.save`` does (it writes
  through a temporary file, fsyncs and renames), so
* ``torch+fsync``: the same ``torch.save`` followed by an fsync of the file, for a like-for-like
  durable save (restore is the same as ``torch``'s).
* ``kd-sharded`` (``backend="safetensors-sharded"``, ``max_shard_size="50MB"``) and ``kd-dcp``
  (``backend="torch-dcp"``) with ``--folders``.

Timing is interleaved: every repetition runs each variant once, the variant order rotating from
one repetition to the next; medians over repetitions are reported with the ratio to ``torch``.
Files go to a fresh folder under /tmp and are deleted after each repetition (so every save writes
a new file; the page cache is warm for the restore, the same for every variant).

Peak extra memory: for each variant a fresh ``python -c`` builds the model (for restore: writes
the file, builds a fresh model and drops the first), resets the RSS high-water mark (Linux
``/proc/self/clear_refs``; building the model would otherwise mask the operation's peak), notes
the current RSS, runs the operation, and reports the new high-water mark (``VmHWM``) minus that
RSS: the memory the operation needed beyond the model. (``getrusage(RUSAGE_SELF).ru_maxrss`` is
not used: on Linux it also holds the RSS the benchmark process had when it forked the child.)
``safetensors.torch.save_file`` is measured too when it works without NumPy (it does not in
safetensors 0.8: reported as skipped).

    python benchmarks/save_restore.py [--reps 5] [--width 2048] [--layers 12] [--folders]
                                      [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import kdcore as kd

warnings.filterwarnings("ignore", "Failed to initialize NumPy")


def build(width: int, layers: int) -> nn.Module:
    """An MLP student: ``layers`` Linear(width, width) with GELU between, plus a LayerNorm."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks, nn.LayerNorm(width))


# ---------------------------------------------------------------------------- variants
def kd_variant(backend: str, **options: object) -> tuple[Callable, Callable]:
    def save(model: nn.Module, path: Path) -> None:
        kd.save(model, path, backend=backend, **options)

    def restore(fresh: nn.Module, path: Path) -> None:
        kd.restore(fresh, path)

    return save, restore


def torch_variant(fsync: bool) -> tuple[Callable, Callable]:
    def save(model: nn.Module, path: Path) -> None:
        if fsync:
            with open(path, "wb") as file:
                torch.save(model.state_dict(), file)
                file.flush()
                os.fsync(file.fileno())
        else:
            torch.save(model.state_dict(), path)

    def restore(fresh: nn.Module, path: Path) -> None:
        fresh.load_state_dict(torch.load(path, weights_only=True))

    return save, restore


def variants(folders: bool) -> dict[str, tuple[Callable, Callable]]:
    chosen = {
        "kd-safetensors": kd_variant("safetensors"),
        "torch": torch_variant(fsync=False),
        "torch+fsync": torch_variant(fsync=True),
    }
    if folders:
        chosen["kd-sharded"] = kd_variant("safetensors-sharded", max_shard_size="50MB")
        chosen["kd-dcp"] = kd_variant("torch-dcp")
    return chosen


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def time_variants(
    model: nn.Module, fresh: nn.Module, reps: int, folders: bool, workdir: Path
) -> dict[str, dict[str, list[float]]]:
    chosen = variants(folders)
    names = list(chosen)
    results = {name: {"save": [], "restore": []} for name in names}
    reference = dict(model.state_dict())
    for rep in range(reps + 1):  # the first round warms up and is not counted
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            save, restore = chosen[name]
            path = workdir / f"{name}.ckpt"
            start = time.perf_counter()
            save(model, path)
            saved = time.perf_counter()
            with torch.no_grad():
                for tensor in fresh.state_dict().values():
                    tensor.zero_()
            begin = time.perf_counter()
            restore(fresh, path)
            restored = time.perf_counter()
            remove(path)
            if rep:
                results[name]["save"].append(saved - start)
                results[name]["restore"].append(restored - begin)
            if rep == 1:  # check once that every variant gives the model back
                state = fresh.state_dict()
                assert all(torch.equal(state[k], v) for k, v in reference.items()), name
    return results


# ---------------------------------------------------------------------------- memory
MEMORY_PRELUDE = """
import gc, os, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {bench!r})
import torch, kdcore as kd
from save_restore import build
torch.set_num_threads({threads})
# Import what the operations import on first use (plugins, DCP), outside the measurement.
import torch.distributed.checkpoint
from kdcore import registries
registries()
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key)) * 1024
def start():
    # Reset the high-water mark (Linux: clear_refs 5) so that building the model does not mask
    # the operation's own peak; the baseline is the RSS now.
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")
def peak():
    # VmHWM, not ru_maxrss: ru_maxrss also keeps the RSS the parent had when it forked this
    # process (Linux carries it across fork + exec), which clear_refs does not reset.
    return status("VmHWM")
"""

MEMORY_SAVE = {
    "kd-safetensors": "kd.save(model, path)",
    "torch": "torch.save(model.state_dict(), path)",
    "safetensors.save_file": (
        "from safetensors.torch import save_file; save_file(model.state_dict(), path)"
    ),
    "kd-sharded": "kd.save(model, path, backend='safetensors-sharded', max_shard_size='50MB')",
    "kd-dcp": "kd.save(model, path, backend='torch-dcp')",
}
MEMORY_RESTORE = {
    "kd-safetensors": ("kd.save(model, path)", "kd.restore(fresh, path)"),
    "torch": (
        "torch.save(model.state_dict(), path)",
        "fresh.load_state_dict(torch.load(path, weights_only=True))",
    ),
    "kd-sharded": (
        "kd.save(model, path, backend='safetensors-sharded', max_shard_size='50MB')",
        "kd.restore(fresh, path)",
    ),
    "kd-dcp": ("kd.save(model, path, backend='torch-dcp')", "kd.restore(fresh, path)"),
}


def measure_memory(
    width: int, layers: int, threads: int, workdir: Path, folders: bool
) -> dict[str, dict[str, object]]:
    bench = str(Path(__file__).parent)
    prelude = MEMORY_PRELUDE.format(bench=bench, threads=threads)
    results: dict[str, dict[str, object]] = {}
    for name, statement in MEMORY_SAVE.items():
        if name in ("kd-sharded", "kd-dcp") and not folders:
            continue
        path = workdir / f"mem-{name}"
        body = f"""
        model = build({width}, {layers})
        path = {str(path)!r}
        before = start()
        try:
            {statement}
        except Exception as exc:
            print("SKIP", repr(exc)[:200]); sys.exit(0)
        print("RESULT", before, peak())
        """
        results.setdefault(name, {})["save"] = run_child(prelude + textwrap.dedent(body))
        remove(path)
    for name, (write, statement) in MEMORY_RESTORE.items():
        if name in ("kd-sharded", "kd-dcp") and not folders:
            continue
        path = workdir / f"mem-{name}"
        body = f"""
        model = build({width}, {layers})
        path = {str(path)!r}
        {write}
        fresh = build({width}, {layers})
        del model
        before = start()
        {statement}
        print("RESULT", before, peak())
        """
        results.setdefault(name, {})["restore"] = run_child(prelude + textwrap.dedent(body))
        remove(path)
    return results


def run_child(source: str) -> object:
    done = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, check=False, timeout=900
    )
    for line in done.stdout.splitlines():
        if line.startswith("SKIP"):
            return line[5:]
        if line.startswith("RESULT"):
            before, after = (int(v) for v in line.split()[1:])
            return (after - before) / 2**20
    raise RuntimeError(f"memory child failed:\n{done.stderr[-2000:]}")


# ---------------------------------------------------------------------------- profile
def profile_restore(model: nn.Module, fresh: nn.Module, workdir: Path) -> str:
    path = workdir / "profile.safetensors"
    kd.save(model, path)
    kd.restore(fresh, path)  # warm
    profiler = cProfile.Profile()
    profiler.enable()
    kd.restore(fresh, path)
    profiler.disable()
    remove(path)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
    return out.getvalue()


# ---------------------------------------------------------------------------- report
def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--folders", action="store_true", help="add the folder backends")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile kd.restore always")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, fresh = build(args.width, args.layers), build(args.width, args.layers)
    parameters = sum(t.numel() for t in model.state_dict().values())
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(
        f"machine: nproc {os.cpu_count()}, {cpu_model()}, torch {torch.__version__}, "
        f"{args.threads} threads, python {platform.python_version()}"
    )
    print(
        f"student: MLP {args.layers} x Linear({args.width}, {args.width}): "
        f"{parameters / 1e6:.1f}M parameters, {size / 2**20:.0f} MiB float32"
    )
    workdir = Path(tempfile.mkdtemp(prefix="kd-save-restore-", dir="/tmp"))
    try:
        print(f"files in {workdir}; {args.reps} interleaved repetitions (+1 warm-up), medians\n")
        results = time_variants(model, fresh, args.reps, args.folders, workdir)
        base = {op: statistics.median(results["torch"][op]) for op in ("save", "restore")}
        print(
            f"{'variant':16} {'save s':>8} {'x torch':>8} {'restore s':>10} {'x torch':>8}"
            f"   (min save / min restore)"
        )
        for name, times in results.items():
            save, restore = (statistics.median(times[op]) for op in ("save", "restore"))
            print(
                f"{name:16} {save:8.3f} {save / base['save']:8.2f} {restore:10.3f} "
                f"{restore / base['restore']:8.2f}   ({min(times['save']):.3f} / "
                f"{min(times['restore']):.3f})"
            )
        kd_restore = statistics.median(results["kd-safetensors"]["restore"])
        if not args.no_memory:
            print("\npeak extra memory (RSS high-water mark above the built model, MiB)")
            memory = measure_memory(args.width, args.layers, args.threads, workdir, args.folders)
            for name, ops in memory.items():
                cells = []
                for op in ("save", "restore"):
                    value = ops.get(op, "-")
                    cells.append(f"{value:8.1f}" if isinstance(value, float) else f"{value!s:>8}")
                print(f"{name:24} save {cells[0]}   restore {cells[1]}")
        if args.profile or kd_restore > base["restore"]:
            print(
                "\nkd.restore is slower than torch.load + load_state_dict: profile"
                if kd_restore > base["restore"]
                else "\nkd.restore profile"
            )
            print(profile_restore(model, fresh, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
