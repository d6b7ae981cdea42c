"""Peak memory and time of the chunked logit divergences against the plain PyTorch formulas.

For each size ``N x V`` (tokens x vocabulary) and each divergence, forward + backward of

* the plain formula, written the straightforward way (``F.log_softmax``/``F.softmax``,
  ``F.kl_div`` or the divergence's definition, autograd for the gradient), and
* kdcore's chunked custom-autograd version (``kdcore_builtins.divergences``),

and, for the fused variant, ``FusedLogitsLoss``-style ``fused_linear_divergence`` on hidden states
and lm-head weights against materialising both models' logits (``hidden @ weight.T``) and then the
plain formula.

Every measurement runs in a fresh subprocess: the inputs are allocated first, the resident set
size (RSS) is read, one forward + backward runs, and the peak is ``ru_maxrss`` minus that RSS:
the memory the computation added on top of its inputs, the gradient included (both variants
keep one ``[N, V]`` gradient). Then ``--repeats`` timed forward + backward passes (after one
warm-up) give the median. Variants alternate over ``--rounds`` rounds; the figures reported are
the medians over rounds. Loss and gradient agreement (max relative difference) is checked in
separate subprocesses for the first size.

When the plain formula would not fit in the memory available now (``MemAvailable`` in
/proc/meminfo, with a margin; its need is estimated from the previous size's measured peak),
only kdcore's variant runs, and the plain peak shown is that estimate, marked ``~``.
Nothing is asserted: read the ratios.

    python benchmarks/divergences.py [--sizes 2048x32000,4096x128000] [--repeats 3]
                                     [--rounds 2] [--hidden 1024] [--only jsd,fused]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_kl",
    "skew_reverse_kl",
    "tvd",
    "topk_kl",
)
TEMPERATURE = 2.0
BETA, ALPHA, TOP_K = 0.5, 0.1, 64
#: Plain formulas peak at about this many [N, V] float32 tensors above their inputs (measured:
#: 4-8 depending on the divergence); used to skip sizes that would not fit.
PLAIN_TENSORS = 9
FUSED_PLAIN_TENSORS = 11


# ====================================================================== the computations
def plain_divergence(s: Any, t: Any, name: str) -> Any:
    """The straightforward PyTorch formula of ``name``, batchmean-reduced, times T**2."""
    import torch
    import torch.nn.functional as F

    T = TEMPERATURE
    n = s.shape[0]
    if name == "forward_kl":
        log_p = F.log_softmax(s / T, dim=-1)
        q = F.softmax(t.detach() / T, dim=-1)
        return F.kl_div(log_p, q, reduction="batchmean") * T**2
    log_p = F.log_softmax(s / T, dim=-1)
    log_q = F.log_softmax(t.detach() / T, dim=-1)
    if name == "reverse_kl":
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * T**2
    if name == "jsd":  # TRL's generalized_jsd_loss
        log_m = torch.logsumexp(
            torch.stack(
                [log_p + torch.log1p(torch.tensor(-BETA)), log_q + torch.log(torch.tensor(BETA))]
            ),
            dim=0,
        )
        kl_t = F.kl_div(log_m, log_q, reduction="none", log_target=True)
        kl_s = F.kl_div(log_m, log_p, reduction="none", log_target=True)
        return (BETA * kl_t + (1 - BETA) * kl_s).sum() / n * T**2
    if name == "skew_kl":
        m = ALPHA * log_q.exp() + (1 - ALPHA) * log_p.exp()
        return F.kl_div(m.log(), log_q, reduction="batchmean", log_target=True) * T**2
    if name == "skew_reverse_kl":
        m = ALPHA * log_p.exp() + (1 - ALPHA) * log_q.exp()
        return F.kl_div(m.log(), log_p, reduction="batchmean", log_target=True) * T**2
    if name == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum() / n * T**2
    if name == "topk_kl":
        top = t.detach().topk(TOP_K, dim=-1).indices
        log_p_k = F.log_softmax(s.gather(-1, top) / T, dim=-1)
        log_q_k = F.log_softmax(t.detach().gather(-1, top) / T, dim=-1)
        return F.kl_div(log_p_k, log_q_k, reduction="batchmean", log_target=True) * T**2
    raise ValueError(name)


def chunked_divergence(s: Any, t: Any, name: str) -> Any:
    from kdcore_builtins.divergences import logit_divergence

    return logit_divergence(
        s, t, name, temperature=TEMPERATURE, beta=BETA, alpha=ALPHA, k=TOP_K, reduction="batchmean"
    )


# ====================================================================== child process
def _rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def _max_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    n, v, variant, name = spec["n"], spec["v"], spec["variant"], spec["divergence"]
    # float64: the reference of the agreement check (the same float32 draws, converted)
    dtype = torch.float64 if spec.get("float64") else torch.float32
    if variant in ("plain", "chunked"):
        s = torch.randn(n, v).mul_(2.0).to(dtype).requires_grad_()
        t = torch.randn(n, v).mul_(2.0).to(dtype)
        leaves = [s]

        def step() -> Any:
            loss = (plain_divergence if variant == "plain" else chunked_divergence)(s, t, name)
            loss.backward()
            return loss

    else:  # materialised / fused
        from kdcore_builtins.divergences import fused_linear_divergence

        h = spec["hidden"]
        hs = torch.randn(n, h).to(dtype).requires_grad_()
        ht = torch.randn(n, h + h // 2).to(dtype)
        ws = (torch.randn(v, h) / h**0.5).to(dtype).requires_grad_()
        wt = (torch.randn(v, h + h // 2) / (h + h // 2) ** 0.5).to(dtype)
        leaves = [hs, ws]

        def step() -> Any:
            if variant == "materialised":
                with torch.no_grad():
                    teacher_logits = ht @ wt.t()
                loss = plain_divergence(hs @ ws.t(), teacher_logits, name)
            else:
                loss = fused_linear_divergence(
                    hs, ht, ws, wt, divergence=name, temperature=TEMPERATURE, beta=BETA,
                    alpha=ALPHA, k=TOP_K, reduction="batchmean",
                )  # fmt: skip
            loss.backward()
            return loss

    if spec.get("check"):
        loss = step()
        out = {"loss": loss.item()}
        torch.save([loss.detach()] + [leaf.grad for leaf in leaves], spec["check"])
        return out
    reset = _reset_peak()
    before_peak = _max_rss_bytes()
    baseline = _rss_bytes()
    step()
    peak = _max_rss_bytes() - baseline
    times = []
    for i in range(spec["repeats"] + 1):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        step()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return {
        "peak": peak,
        # An earlier peak above the inputs (imports) would overstate small peaks.
        "stale_peak": before_peak > baseline + (1 << 20) and not reset,
        "time": statistics.median(times),
        "threads": torch.get_num_threads(),
    }


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ====================================================================== parent
def mem_available() -> int:
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def check_agreement(n: int, v: int, hidden: int, names: list[str], tmp: str) -> None:
    """Loss and gradient of the plain formula and of kdcore, both in float32, against the plain
    formula in float64: how far each is from the exact value, not from each other."""
    import torch

    print(
        f"\nagreement at {n} x {v}: max relative difference from the float64 formula, "
        "loss / gradient"
    )
    pairs = [(name, "plain", "chunked") for name in names if name != "fused"]
    if "fused" in names:
        pairs += [(div, "materialised", "fused") for div in ("forward_kl", "jsd")]
    for name, reference, ours in pairs:
        tensors = {}
        for label, variant, float64 in (
            ("exact", reference, True),
            ("plain", reference, False),
            ("kdcore", ours, False),
        ):
            path = os.path.join(tmp, f"{label}.pt")
            run_child(
                {"n": n, "v": v, "variant": variant, "divergence": name, "hidden": hidden,
                 "repeats": 0, "check": path, "float64": float64}
            )  # fmt: skip
            tensors[label] = torch.load(path)
        shown = []
        for label in ("plain", "kdcore"):
            errors = [
                ((a.double() - b).abs().max() / b.abs().max()).item()
                for a, b in zip(tensors[label], tensors["exact"], strict=True)
            ]
            shown.append(f"{label} " + " / ".join(f"{e:.1e}" for e in errors))
        title = f"{name} ({ours})" if ours == "fused" else name
        print(f"  {title:<22} " + "   ".join(shown))
    if "tvd" in names:
        print(
            "  (tvd's gradient jumps where p = q: float32 rounding flips the sign of p - q at a"
            " few such columns, in either implementation)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="2048x32000,4096x128000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024, help="student hidden size (fused)")
    parser.add_argument("--only", default="", help="comma-separated divergences and/or 'fused'")
    parser.add_argument("--no-check", action="store_true", help="skip the agreement check")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import tempfile

    import torch

    names = [*DIVERGENCES, "fused"]
    if args.only:
        names = [name for name in args.only.split(",") if name]
    print(
        f"machine: {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {mem_available() / 2**30:.1f} GiB available"
    )
    print(
        f"T={TEMPERATURE}, reduction=batchmean, jsd beta={BETA}, skew alpha={ALPHA}, "
        f"top-k k={TOP_K}; fused: student hidden {args.hidden}, teacher {args.hidden * 3 // 2}"
    )
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
    if not args.no_check:
        n, v = sizes[0]
        with tempfile.TemporaryDirectory() as tmp:
            check_agreement(n, v, args.hidden, names, tmp)

    rows = []
    measured: dict[str, float] = {}  # label -> plain peak / (N * V * 4), from a smaller size
    for n, v in sizes:
        tensor = n * v * 4
        for name in names:
            fused = name == "fused"
            variants = ("materialised", "fused") if fused else ("plain", "chunked")
            divergences = ("forward_kl", "jsd") if fused else (name,)
            guess = FUSED_PLAIN_TENSORS if fused else PLAIN_TENSORS
            for divergence in divergences:
                label = f"{divergence} (fused)" if fused else divergence
                estimate = measured.get(label, guess) * tensor
                need = estimate * 1.1 + (0 if fused else 2 * tensor)
                run = variants
                if need * 1.2 > mem_available():  # the plain formula alone would not fit
                    run = variants[1:]
                    print(
                        f"{n}x{v} {label}: the plain formula needs ~{need / 2**30:.1f} GiB, "
                        f"{mem_available() / 2**30:.1f} GiB available now: not run (its peak "
                        f"is estimated from the smaller size)"
                    )
                results: dict[str, list[dict[str, Any]]] = {variant: [] for variant in run}
                for round_index in range(args.rounds):
                    order = run if round_index % 2 == 0 else run[::-1]
                    for variant in order:
                        results[variant].append(
                            run_child(
                                {
                                    "n": n,
                                    "v": v,
                                    "variant": variant,
                                    "divergence": divergence,
                                    "hidden": args.hidden,
                                    "repeats": args.repeats,
                                }
                            )
                        )
                summary = {
                    variant: {
                        "peak": statistics.median(r["peak"] for r in runs),
                        "time": statistics.median(r["time"] for r in runs),
                        "stale": any(r["stale_peak"] for r in runs),
                    }
                    for variant, runs in results.items()
                }
                estimated = variants[0] not in summary
                if estimated:
                    summary[variants[0]] = {"peak": estimate, "time": math.nan, "stale": False}
                else:
                    measured[label] = summary[variants[0]]["peak"] / tensor
                base, ours = summary[variants[0]], summary[variants[1]]
                rows.append((f"{n}x{v}", label, base, ours, estimated))
                plain_peak = f"{'~' if estimated else ''}{base['peak'] / 2**20:.0f}"
                plain_time = "not run" if estimated else f"{base['time'] * 1e3:.1f} ms"
                print(
                    f"{n}x{v} {label:<22} peak {plain_peak:>8} -> "
                    f"{ours['peak'] / 2**20:7.0f} MiB (x{ours['peak'] / base['peak']:.2f})   "
                    f"time {plain_time:>10} -> {ours['time'] * 1e3:8.1f} ms "
                    f"(x{ours['time'] / base['time']:.2f})"
                    + (
                        "  [earlier peak above the inputs: may be overstated]"
                        if ours["stale"]
                        else ""
                    ),
                    flush=True,
                )

    print(
        "\n| N x V | divergence | plain peak MiB | kdcore peak MiB | ratio "
        "| plain ms | kdcore ms | ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for size, label, base, ours, estimated in rows:
        mark = "~" if estimated else ""
        plain_time = "not run (no room)" if estimated else f"{base['time'] * 1e3:.0f}"
        time_ratio = "" if estimated else f"{ours['time'] / base['time']:.2f}"
        print(
            f"| {size} | {label} | {mark}{base['peak'] / 2**20:.0f} | {ours['peak'] / 2**20:.0f} "
            f"| {mark}{ours['peak'] / base['peak']:.2f} | {plain_time} | "
            f"{ours['time'] * 1e3:.0f} | {time_ratio} |"
        )
    if any(row[4] for row in rows):
        print("\n~: the plain formula did not fit in the memory available; its peak is the smaller")
        print("size's peak scaled by N x V (the peak is a fixed number of [N, V] tensors).")


if __name__ == "__main__":
    main()
