"""Per-step cost of training through kdcore against a hand-written KD step doing the same math.

The kdcore step::

    model = kd.convert(student, [("kd_loss", {
        "teacher_model": teacher,
        "criterion": kd.LogitsDistillationLoss(temperature=2.0),
        "loss_balancer": kd.StaticLossBalancer(0.5)})])
    out = model(x); ce = F.cross_entropy(out, y)
    loss = model.compute_kd_loss(student_loss=ce); loss.backward(); opt.step()

The hand-written step: teacher in eval under ``no_grad``, student forward, then
``F.kl_div(log_softmax(s / T), softmax(t / T), reduction="mean") * T**2 * 0.5 + 0.5 * ce``,
backward, step. The ``*-2pairs`` cases add an intermediate-layer pair (``MSELoss`` between the
student's and the teacher's ``act2`` outputs, captured by forward hooks in kdcore, returned by the
model in the hand-written step) next to the logits pair, weights 0.25 / 0.25 / 0.5 (student).

Cases: ``small`` (batch 32, MLP width 64: per-call overhead dominates) and ``mid`` (batch 256,
MLP width 1024). Both variants start from the same weights and see the same batches; their loss
and gradients are compared once (max abs difference printed). Timing is interleaved: each round
runs a block of ``k`` steps of one variant then of the other (the order alternating every round,
ABBA), after warm-up rounds; the median over rounds of the per-step time is reported for each
variant, with the ratio and the overhead in microseconds (difference of medians, and median of the
per-round paired differences). Then a per-phase breakdown (forward, loss, backward, optimizer).

Timings are reported, never asserted. Defaults to ``torch.set_num_threads(1)`` (``--threads``).

    python benchmarks/step_overhead.py [--cases small,small-2pairs,mid,mid-2pairs] [--threads 1]
                                       [--rounds-scale 1.0] [--profile small]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import io
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kdcore as kd

TEMPERATURE = 2.0
SMALL_OVERHEAD_TARGET = 0.05  # flagged in the output when the small-model overhead exceeds 5%


class MLP(nn.Module):
    """fc1 -> act1 -> fc2 -> act2 -> head; ``features_and_logits`` also returns act2's output."""

    def __init__(self, inputs: int, width: int, classes: int) -> None:
        super().__init__()
        # Kept so that kdcore can record how to rebuild the teacher (no NotRecordableWarning).
        self.inputs, self.width, self.classes = inputs, width, classes
        self.fc1 = nn.Linear(inputs, width)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(width, classes)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.act2(self.fc2(self.act1(self.fc1(x))))
        return features, self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    inputs: int
    width: int
    classes: int
    two_pairs: bool
    steps_per_block: int
    rounds: int
    warmup_rounds: int


CASES = {
    "small": Case("small", 32, 64, 64, 10, False, 25, 200, 20),
    "small-2pairs": Case("small-2pairs", 32, 64, 64, 10, True, 25, 200, 20),
    "mid": Case("mid", 256, 1024, 1024, 100, False, 2, 40, 4),
    "mid-2pairs": Case("mid-2pairs", 256, 1024, 1024, 100, True, 2, 40, 4),
}


# ----------------------------------------------------------------------------- the two variants
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Phases = Callable[[torch.Tensor, torch.Tensor], list[int]]


@dataclass
class Variant:
    step: Step  # one full training step (what is timed)
    phases: Phases  # the same step, returning the ns spent per phase
    loss: Step  # forward + loss only (for the sanity check)
    student_parameters: Callable[[], dict[str, nn.Parameter]]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def kdcore_variant(student: MLP, teacher: MLP, two_pairs: bool) -> Variant:
    if two_pairs:
        criterion = {
            ("act2", "act2"): kd.MSELoss(),
            ("", ""): kd.LogitsDistillationLoss(temperature=TEMPERATURE),
        }
        balancer = kd.StaticLossBalancer([0.25, 0.25])
    else:
        criterion = kd.LogitsDistillationLoss(temperature=TEMPERATURE)
        balancer = kd.StaticLossBalancer(0.5)
    model: Any = kd.convert(
        student,
        [
            (
                "kd_loss",
                {"teacher_model": teacher, "criterion": criterion, "loss_balancer": balancer},
            )
        ],
    )
    model.train()
    opt = make_optimizer(trainable(model))

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        ce = F.cross_entropy(out, y)
        loss = model.compute_kd_loss(student_loss=ce)
        loss.backward()
        opt.step()
        return loss

    def phases(x: torch.Tensor, y: torch.Tensor) -> list[int]:
        t0 = time.perf_counter_ns()
        opt.zero_grad(set_to_none=True)
        out = model(x)
        t1 = time.perf_counter_ns()
        ce = F.cross_entropy(out, y)
        loss = model.compute_kd_loss(student_loss=ce)
        t2 = time.perf_counter_ns()
        loss.backward()
        t3 = time.perf_counter_ns()
        opt.step()
        t4 = time.perf_counter_ns()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]

    def loss_only(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model.compute_kd_loss(student_loss=F.cross_entropy(model(x), y))

    def student_parameters() -> dict[str, nn.Parameter]:
        with model.hide_teacher_model(), model.hide_loss_modules():
            return dict(model.named_parameters())

    return Variant(step, phases, loss_only, student_parameters)


def manual_variant(student: MLP, teacher: MLP, two_pairs: bool) -> Variant:
    teacher.requires_grad_(False)
    teacher.eval()
    student.train()
    opt = make_optimizer(trainable(student))
    T = TEMPERATURE

    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (
            F.kl_div(F.log_softmax(s / T, dim=-1), F.softmax(t / T, dim=-1), reduction="mean")
            * T**2
        )

    if two_pairs:

        def forward_and_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[int, torch.Tensor]:
            with torch.no_grad():
                t_feat, t_logits = teacher.features_and_logits(x)
            s_feat, s_logits = student.features_and_logits(x)
            t_fwd = time.perf_counter_ns()
            ce = F.cross_entropy(s_logits, y)
            loss = 0.25 * F.mse_loss(s_feat, t_feat) + 0.25 * kl(s_logits, t_logits) + 0.5 * ce
            return t_fwd, loss

    else:

        def forward_and_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[int, torch.Tensor]:
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            t_fwd = time.perf_counter_ns()
            ce = F.cross_entropy(s_logits, y)
            loss = kl(s_logits, t_logits) * 0.5 + 0.5 * ce
            return t_fwd, loss

    # The timed step is the same code without the clock read in the middle.
    if two_pairs:

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                t_feat, t_logits = teacher.features_and_logits(x)
            s_feat, s_logits = student.features_and_logits(x)
            ce = F.cross_entropy(s_logits, y)
            loss = 0.25 * F.mse_loss(s_feat, t_feat) + 0.25 * kl(s_logits, t_logits) + 0.5 * ce
            loss.backward()
            opt.step()
            return loss

    else:

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            ce = F.cross_entropy(s_logits, y)
            loss = kl(s_logits, t_logits) * 0.5 + 0.5 * ce
            loss.backward()
            opt.step()
            return loss

    def phases(x: torch.Tensor, y: torch.Tensor) -> list[int]:
        t0 = time.perf_counter_ns()
        opt.zero_grad(set_to_none=True)
        t1, loss = forward_and_loss(x, y)
        t2 = time.perf_counter_ns()
        loss.backward()
        t3 = time.perf_counter_ns()
        opt.step()
        t4 = time.perf_counter_ns()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]

    def loss_only(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return forward_and_loss(x, y)[1]

    return Variant(step, phases, loss_only, lambda: dict(student.named_parameters()))


# ----------------------------------------------------------------------------- measuring
def build(case: Case) -> tuple[dict[str, Variant], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Both variants, from copies of the same student and teacher, and the batches they share."""
    torch.manual_seed(0)
    student = MLP(case.inputs, case.width, case.classes)
    teacher = MLP(case.inputs, case.width, case.classes)
    batches = [
        (torch.randn(case.batch, case.inputs), torch.randint(case.classes, (case.batch,)))
        for _ in range(8)
    ]
    variants = {
        "manual": manual_variant(copy.deepcopy(student), copy.deepcopy(teacher), case.two_pairs),
        "kdcore": kdcore_variant(copy.deepcopy(student), copy.deepcopy(teacher), case.two_pairs),
    }
    return variants, batches


def sanity_check(case: Case) -> None:
    """Same weights, same batch: compare the loss and the student's gradients once."""
    variants, batches = build(case)
    x, y = batches[0]
    losses: dict[str, float] = {}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for name, variant in variants.items():
        loss = variant.loss(x, y)
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {
            n: torch.zeros_like(p) if p.grad is None else p.grad
            for n, p in variant.student_parameters().items()
        }
    if set(grads["manual"]) != set(grads["kdcore"]):
        print(
            f"  sanity: student parameter names differ: "
            f"{sorted(set(grads['manual']) ^ set(grads['kdcore']))}"
        )
        return
    grad_diff = max(
        (grads["manual"][n] - grads["kdcore"][n]).abs().max().item() for n in grads["manual"]
    )
    print(
        f"  sanity: loss manual {losses['manual']:.9f}, kdcore {losses['kdcore']:.9f}; "
        f"max |loss diff| {abs(losses['manual'] - losses['kdcore']):.3g}, "
        f"max |grad diff| {grad_diff:.3g} over {len(grads['manual'])} student tensors"
    )


def time_case(case: Case, scale: float, no_gc: bool = False) -> dict[str, list[float]]:
    variants, batches = build(case)
    rounds = max(3, int(case.rounds * scale))
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    if no_gc:
        gc.disable()
    counter = 0
    for r in range(case.warmup_rounds + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            step = variants[name].step
            t0 = time.perf_counter_ns()
            for i in range(case.steps_per_block):
                x, y = batches[(counter + i) % len(batches)]
                step(x, y)
            elapsed = time.perf_counter_ns() - t0
            if r >= case.warmup_rounds:
                samples[name].append(elapsed / case.steps_per_block / 1e3)  # us per step
        counter += case.steps_per_block
    gc.enable()
    return samples


def phase_breakdown(case: Case, scale: float) -> dict[str, list[float]]:
    """Median per-phase time (us) of each variant, steps interleaved one by one."""
    variants, batches = build(case)
    steps = max(20, int(case.rounds * case.steps_per_block * scale / 2))
    warmup = max(5, steps // 10)
    per: dict[str, list[list[int]]] = {name: [] for name in variants}
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        for name in variants if i % 2 == 0 else list(variants)[::-1]:
            result = variants[name].phases(x, y)
            if i >= warmup:
                per[name].append(result)
    return {
        name: [statistics.median(col) / 1e3 for col in zip(*rows, strict=True)]
        for name, rows in per.items()
    }


def profile_case(case: Case, steps: int) -> None:
    variants, batches = build(case)
    step = variants["kdcore"].step
    for i in range(50):
        step(*batches[i % len(batches)])
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(steps):
        step(*batches[i % len(batches)])
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
    stats.print_stats(40)
    print(f"\ncProfile of {steps} kdcore steps, case {case.name} (top 40 by own time):")
    print(out.getvalue())


# ----------------------------------------------------------------------------- main
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)"
    )
    parser.add_argument(
        "--rounds-scale", type=float, default=1.0, help="scale the number of rounds"
    )
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument(
        "--no-gc", action="store_true", help="gc.disable() while timing (diagnostic: GC share)"
    )
    parser.add_argument("--profile", metavar="CASE", help="also cProfile the kdcore step of CASE")
    parser.add_argument("--profile-steps", type=int, default=2000)
    args = parser.parse_args()

    # F.kl_div(reduction="mean") warns on every call; the warning is muted (its warn() call,
    # filtered, still runs in the hand-written step, about a microsecond).
    warnings.filterwarnings("ignore", message="reduction: 'mean' divides")
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"python {platform.python_version()}, torch {torch.__version__}, kdcore {kd.__version__}")
    print(
        f"machine: {os.cpu_count()} CPUs, {cpu_model()}; torch threads: {torch.get_num_threads()}"
        f"{' (set_num_threads)' if args.threads else ''}; "
        f"gc {'disabled' if args.no_gc else 'enabled'} while timing"
    )

    summary = []
    for name in args.cases.split(","):
        case = CASES[name]
        print(
            f"\ncase {case.name}: batch {case.batch}, MLP {case.inputs}->{case.width}->{case.width}"
            f"->{case.classes}, {'logits + act2 pairs' if case.two_pairs else 'logits pair'}; "
            f"{case.warmup_rounds} warm-up + {max(3, int(case.rounds * args.rounds_scale))} rounds "
            f"of {case.steps_per_block} steps per variant, interleaved"
        )
        sanity_check(case)
        samples = time_case(case, args.rounds_scale, args.no_gc)
        med = {n: statistics.median(v) for n, v in samples.items()}
        for n, v in samples.items():
            q = statistics.quantiles(v, n=4)
            print(f"  {n:<7} median {med[n]:9.1f} us/step   (IQR {q[0]:.1f} - {q[2]:.1f})")
        ratio = med["kdcore"] / med["manual"]
        overhead = med["kdcore"] - med["manual"]
        pairs = list(zip(samples["kdcore"], samples["manual"], strict=True))
        paired = statistics.median(k - m for k, m in pairs)
        paired_ratio = statistics.median(k / m for k, m in pairs)
        print(
            f"  ratio of medians kdcore/manual {ratio:.3f} (median of per-round ratios "
            f"{paired_ratio:.3f}); overhead {overhead:+.1f} us/step (median of per-round "
            f"differences {paired:+.1f} us)"
        )
        summary.append(
            (case.name, med["manual"], med["kdcore"], ratio, paired_ratio, overhead, paired)
        )
        if not args.no_breakdown:
            phases = phase_breakdown(case, args.rounds_scale)
            labels = ("zero_grad+forward", "loss", "backward", "optimizer")
            print("  per-phase medians (us), steps interleaved one by one:")
            print(f"    {'phase':<18} {'manual':>9} {'kdcore':>9} {'diff':>8}")
            for i, label in enumerate(labels):
                m, k = phases["manual"][i], phases["kdcore"][i]
                print(f"    {label:<18} {m:9.1f} {k:9.1f} {k - m:+8.1f}")

    print(
        "\nsummary (median us/step; ratio = of the medians, paired = median over rounds of the "
        "per-round ratio / difference; overhead = kdcore - manual, us/step)"
    )
    print(
        f"  {'case':<14} {'manual':>10} {'kdcore':>10} {'ratio':>7} {'paired':>7} "
        f"{'overhead':>9} {'paired':>8}"
    )
    for name, m, k, ratio, paired_ratio, overhead, paired in summary:
        flag = ""
        if name.startswith("small") and paired_ratio - 1 > SMALL_OVERHEAD_TARGET:
            flag = f"  (> {SMALL_OVERHEAD_TARGET:.0%})"
        print(
            f"  {name:<14} {m:10.1f} {k:10.1f} {ratio:7.3f} {paired_ratio:7.3f} "
            f"{overhead:+9.1f} {paired:+8.1f}{flag}"
        )

    if args.profile:
        profile_case(CASES[args.profile], args.profile_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
