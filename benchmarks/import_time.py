"""Import cost of ``import kdcore`` against its baseline, ``import torch``.

Every measurement runs in a fresh interpreter (``sys.executable``), the two commands alternating
(torch, kdcore, torch, kdcore, ...) so that machine noise hits both alike. Printed:

* wall clock of ``python -c "import torch"`` vs ``python -c "import kdcore"`` (interpreter
  start-up included), medians and ratio; target ratio <= 1.05;
* the import alone, timed inside the child with ``perf_counter`` (start-up excluded), medians
  and ratio, and what ``import kdcore`` costs after ``import torch`` in the same process;
* the modules kdcore adds on top of torch, from ``python -X importtime`` (median over runs);
* whether ``import kdcore`` left any plugin module (``kdcore_builtins.*``) in ``sys.modules``
  (it must not: plugins load on first use), and what that first use costs;
* whether cattrs is loaded after the import or the first use (it should not be: it is imported
  when a config is first structured).

Timings are reported, never asserted. The plugin check is functional: the script exits with
status 1 when ``import kdcore`` loads a plugin module.

    python benchmarks/import_time.py [--runs 15] [--importtime-runs 5] [--top 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

TARGET_RATIO = 1.05

# Children print one JSON line on stdout; torch's NumPy warning and the like go to stderr.
TIMED_IMPORT = (
    "import time, json; t0 = time.perf_counter(); import {module}; "
    "print(json.dumps({{'import_s': time.perf_counter() - t0}}))"
)
INCREMENT = (
    "import time, json; import torch; t0 = time.perf_counter(); import kdcore; "
    "print(json.dumps({'kdcore_after_torch_s': time.perf_counter() - t0}))"
)
PLUGIN_CHECK = """
import json, sys, time
import kdcore
def plugin_modules():
    return sorted(m for m in sys.modules if m.split(".")[0] == "kdcore_builtins")
after_import = plugin_modules()
import kdcore._plugin_manager as pm
host_made = pm._default_host is not None
t0 = time.perf_counter()
kdcore.LogitsDistillationLoss  # first use: discovers entry points, imports the plugins
first_use_s = time.perf_counter() - t0
after_use = plugin_modules()
print(json.dumps({"after_import": after_import, "host_made_at_import": host_made,
                  "first_use_s": first_use_s, "after_use": after_use,
                  "cattrs_loaded": "cattrs" in sys.modules}))
"""


# Children read and write bytecode under a private cache prefix (set in main), so that kdcore is
# timed as an installed package with its .pyc files, whatever PYTHONDONTWRITEBYTECODE says here,
# and nothing is written into the source tree.
CHILD_ENV: dict[str, str] = dict(os.environ)


def run_child(
    code: str, *flags: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        env=CHILD_ENV if env is None else env,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise RuntimeError(f"child process failed ({result.returncode}): {code}")
    return result


def wall(code: str) -> float:
    t0 = time.perf_counter()
    run_child(code)
    return time.perf_counter() - t0


def child_json(code: str) -> dict:
    return json.loads(run_child(code).stdout.strip().splitlines()[-1])


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def summary(name: str, samples: list[float]) -> float:
    med = statistics.median(samples)
    print(f"  {name:<22} median {ms(med)}   min {ms(min(samples))}   max {ms(max(samples))}")
    return med


def parse_importtime(stderr: str) -> list[tuple[str, int, int, int]]:
    """(module, depth, self_us, cumulative_us) for each ``-X importtime`` line, in output order."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        parts = line[len("import time:") :].split("|")
        self_us, cumul_us, raw_name = int(parts[0]), int(parts[1]), parts[2]
        stripped = raw_name.lstrip(" ")
        depth = (len(raw_name) - len(stripped) - 1) // 2
        rows.append((stripped.strip(), depth, self_us, cumul_us))
    return rows


def added_by_kdcore(rows: list[tuple[str, int, int, int]]) -> list[tuple[str, int, int, int]]:
    """The rows printed after the top-level ``torch`` entry: what ``import kdcore`` pulled in."""
    for index, (name, depth, _, _) in enumerate(rows):
        if name == "torch" and depth == 0:
            return rows[index + 1 :]
    raise RuntimeError("no top-level 'torch' line in the -X importtime output")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15, help="fresh processes per variant")
    parser.add_argument("--importtime-runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="time with the environment as is (with PYTHONDONTWRITEBYTECODE=1 and no __pycache__, "
        "kdcore is compiled from source on every import)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdcore-bench-pycache-") as prefix:
        if not args.no_bytecode_cache:
            CHILD_ENV.pop("PYTHONDONTWRITEBYTECODE", None)
            CHILD_ENV["PYTHONPYCACHEPREFIX"] = prefix
        return run(args)


def run(args: argparse.Namespace) -> int:

    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}")
    versions = child_json(
        "import json, importlib.metadata as md; print(json.dumps({name: md.version(name) "
        "for name in ('torch', 'pluggy', 'attrs', 'cattrs', 'kdcore')}))"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))

    if args.no_bytecode_cache:
        print(
            "bytecode: environment as is (PYTHONDONTWRITEBYTECODE="
            f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r})"
        )
    else:
        print(
            "bytecode: cached in a temporary PYTHONPYCACHEPREFIX (as an installed package); "
            "--no-bytecode-cache to time without"
        )
    # Warm the OS file cache and fill the bytecode cache, so the first measured run is no outlier.
    for _ in range(2):
        run_child("import kdcore")

    print(f"\n1. wall clock of a fresh `python -c 'import X'`, {args.runs} alternating runs each")
    wall_torch, wall_kd = [], []
    for _ in range(args.runs):
        wall_torch.append(wall("import torch"))
        wall_kd.append(wall("import kdcore"))
    med_t = summary("import torch", wall_torch)
    med_k = summary("import kdcore", wall_kd)
    ratio_wall = med_k / med_t
    print(
        f"  ratio kdcore/torch: {ratio_wall:.3f}  (target <= {TARGET_RATIO})  "
        f"difference of medians: {(med_k - med_t) * 1e3:+.1f} ms"
    )

    print(
        "\n2. the import statement alone, timed in the child (start-up excluded), "
        f"{args.runs} runs each"
    )
    in_torch, in_kd, increment = [], [], []
    for _ in range(args.runs):
        in_torch.append(child_json(TIMED_IMPORT.format(module="torch"))["import_s"])
        in_kd.append(child_json(TIMED_IMPORT.format(module="kdcore"))["import_s"])
        increment.append(child_json(INCREMENT)["kdcore_after_torch_s"])
    med_t2 = summary("import torch", in_torch)
    med_k2 = summary("import kdcore", in_kd)
    med_inc = summary("kdcore after torch", increment)
    print(
        f"  ratio kdcore/torch: {med_k2 / med_t2:.3f}  (target <= {TARGET_RATIO}); "
        f"kdcore on top of torch: {med_inc * 1e3:.1f} ms = {med_inc / med_t2 * 100:.1f}% of torch"
    )

    print(
        f"\n3. what `import kdcore` adds on top of torch (-X importtime, median of "
        f"{args.importtime_runs} runs)"
    )
    self_us: dict[str, list[int]] = defaultdict(list)
    cumul_us: dict[str, list[int]] = defaultdict(list)
    depth_of: dict[str, int] = {}
    order: list[str] = []
    for _ in range(args.importtime_runs):
        rows = added_by_kdcore(
            parse_importtime(run_child("import torch; import kdcore", "-X", "importtime").stderr)
        )
        for name, depth, self_t, cumul_t in rows:
            if name not in depth_of:
                order.append(name)
                depth_of[name] = depth
            self_us[name].append(self_t)
            cumul_us[name].append(cumul_t)
    med_self = {name: statistics.median(v) for name, v in self_us.items()}
    med_cumul = {name: statistics.median(v) for name, v in cumul_us.items()}
    total_self = sum(med_self.values())
    print(f"  {len(order)} modules newly imported, sum of self times {total_self / 1e3:.1f} ms")
    by_package: dict[str, float] = defaultdict(float)
    for name, value in med_self.items():
        by_package[name.split(".")[0]] += value
    print("  self time by top-level package:")
    for package, value in sorted(by_package.items(), key=lambda kv: -kv[1]):
        print(f"    {package:<28} {value / 1e3:7.2f} ms  ({value / total_self * 100:4.1f}%)")
    print(f"  top {args.top} modules by self time (cumulative in brackets):")
    for name in sorted(order, key=lambda n: -med_self[n])[: args.top]:
        print(f"    {name:<40} {med_self[name] / 1e3:6.2f} ms  [{med_cumul[name] / 1e3:6.2f} ms]")
    print("  kdcore and the modules it imports directly (cumulative, first importer pays):")
    for name in order:
        if depth_of[name] <= 1:
            print(f"    {'  ' * depth_of[name]}{name:<38} {med_cumul[name] / 1e3:6.2f} ms")

    if not args.no_bytecode_cache:
        no_cache = {k: v for k, v in CHILD_ENV.items() if k != "PYTHONPYCACHEPREFIX"}
        no_cache["PYTHONDONTWRITEBYTECODE"] = "1"
        print(
            f"\n   for comparison, kdcore after torch compiled from source (no kdcore .pyc; "
            f"torch's own __pycache__ is used), {args.runs} runs"
        )
        uncached = [
            json.loads(run_child(INCREMENT, env=no_cache).stdout.strip().splitlines()[-1])[
                "kdcore_after_torch_s"
            ]
            for _ in range(args.runs)
        ]
        summary("kdcore after torch", uncached)

    print("\n4. plugin modules after `import kdcore`")
    check = child_json(PLUGIN_CHECK)
    ok = not check["after_import"] and not check["host_made_at_import"]
    print(f"  kdcore_builtins.* in sys.modules after import: {check['after_import'] or 'none'}")
    print(f"  plugin host created at import: {check['host_made_at_import']}")
    print(
        f"  first use (kd.LogitsDistillationLoss: entry-point discovery + plugin imports): "
        f"{check['first_use_s'] * 1e3:.1f} ms; loaded then: {', '.join(check['after_use'])}"
    )
    print(
        f"  {'OK' if ok else 'FAIL'}: import kdcore {'loads no' if ok else 'LOADS A'} plugin module"
    )
    print(f"  cattrs loaded after import and first use: {check['cattrs_loaded']}")

    print("\nsummary")
    print(
        f"  wall clock: torch {med_t * 1e3:.1f} ms, kdcore {med_k * 1e3:.1f} ms, "
        f"ratio {ratio_wall:.3f} (target <= {TARGET_RATIO}: "
        f"{'met' if ratio_wall <= TARGET_RATIO else 'NOT met'})"
    )
    print(
        f"  in-process: torch {med_t2 * 1e3:.1f} ms, kdcore {med_k2 * 1e3:.1f} ms, "
        f"ratio {med_k2 / med_t2:.3f}; kdcore after torch {med_inc * 1e3:.1f} ms"
    )
    return 0 if ok else 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
