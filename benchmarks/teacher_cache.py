"""Offline distillation: the size of a teacher cache, its write overhead and its training speed.

1. Bits per kept entry (index + value) at V = 32,000 and 151,936, k = 64, for a naive layout
   (int64 index + float32 value), a Megatron-like one (17-bit index + bfloat16; 17 bits address
   only 131,072 entries), kdcore's lossless ``float32`` and ``bfloat16`` modes (ceil(log2 V)-bit
   indices) and its ``compressed`` mode, measured on the shards it writes (per-position value
   parameters included; the per-position bookkeeping, two float32 log-sum-exps and an int64
   position, is shown apart as bytes per position). With it, the relative difference of the
   ``topk_kl`` loss (tail bucket) from the compressed cache against the lossless one, on
   teacher logits drawn as ``3 * randn`` and a student as the teacher plus noise.
2. Write overhead: ``kd.cache_teacher`` against the teacher's forward pass alone over the same
   batches (a small causal LM: embedding, MLP blocks, an lm head), medians of interleaved
   repeats; the fingerprint of the teacher's weights, taken once per run whatever the data
   set's size, is shown apart.
3. Step time online / offline: a training step of a student with its teacher in the loop
   (``topk_kl``) against the same step with the ``cached`` teacher; the teacher has about 10x
   the student's parameters.

Nothing is asserted: read the figures.

    python benchmarks/teacher_cache.py [--vocab 8000] [--steps 4] [--write-repeats 4] [--cpu-time]
                                       [--teacher 512x4]
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import kdcore as kd
from kdcore import llm
from kdcore._teacher_cache import weights_fingerprint
from kdcore.plugin import TeacherCache

K = 64


class TinyLM(nn.Module):
    """Embedding, ``layers`` residual MLP blocks of width ``hidden``, an lm head."""

    def __init__(self, vocab: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
            for _ in range(layers)
        )
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)  # type: ignore[no-any-return]


class Table(nn.Module):
    """A "teacher" that answers each example id with fixed logits."""

    def __init__(self, logits: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.logits[int(i)] for i in x[:, 0]])


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shard_bits(folder: Path, names: tuple[str, ...]) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / "shard-00000.safetensors"), "pt") as shard:
        for name in names:
            tensor = shard.get_slice(name)
            dtype = tensor.get_dtype()
            width = {"F32": 32, "BF16": 16, "U8": 8, "I64": 64}[dtype]
            total += math.prod(tensor.get_shape()) * width
    return total


def sizes(root: Path, positions: int) -> None:
    print(f"bits per kept entry (index + value), k = {K}:")
    print(f"{'layout':<22}{'V = 32,000':>14}{'V = 151,936':>14}   topk_kl loss vs lossless")
    rows: dict[str, list[str]] = {
        "naive int64+float32": [f"{64 + 32:.1f}"] * 2,
        "Megatron-like 17+bf16": [f"{17 + 16:.1f}"] * 2,
    }
    gaps: dict[str, list[str]] = {}
    per_position: list[str] = []
    for vocab in (32_000, 151_936):
        generator = torch.Generator().manual_seed(0)
        teacher_logits = 3 * torch.randn(positions, vocab, generator=generator)
        student_logits = teacher_logits + torch.randn(positions, vocab, generator=generator)
        inputs = torch.arange(positions)[:, None]  # one position per example, keyed by its id
        lookup = dict(zip(inputs[:, 0].tolist(), teacher_logits, strict=True))

        losses = {}
        table = Table(lookup)
        for compression in ("float32", "bfloat16", "compressed"):
            folder = root / f"{compression}-{vocab}"
            kd.cache_teacher(table, [inputs], folder, top_k=K, compression=compression)
            names = (
                ("index_low", "index_high", "values", "value_top", "value_step")
                if compression == "compressed"
                else ("indices", "values")
            )
            bits = shard_bits(folder, names) / (positions * K)
            rows.setdefault(f"kdcore {compression}", []).append(f"{bits:.1f}")
            if compression == "float32":
                other = shard_bits(folder, ("logsumexp", "tail", "positions")) / positions / 8
                per_position.append(f"{other:.0f}")
            cache = TeacherCache(folder)
            sparse = cache.lookup(inputs)
            criterion = kd.registries().criteria.get("topk_kl")(k=K, tail_bucket=True)
            losses[compression] = float(criterion(student_logits, sparse))
        for compression in ("bfloat16", "compressed"):
            gap = abs(losses[compression] / losses["float32"] - 1)
            gaps.setdefault(f"kdcore {compression}", []).append(f"{gap:.1e}")
    for name, values in rows.items():
        gap = " / ".join(gaps.get(name, ["0 (exact)" if name == "kdcore float32" else "-"]))
        print(f"{name:<22}{values[0]:>14}{values[1]:>14}   {gap}")
    print(f"per-position bookkeeping: {' / '.join(per_position)} bytes (log-sum-exps, position)")


CLOCK = time.perf_counter  # --cpu-time: time.process_time


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeats):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return sorted(times)[len(times) // 2]


def speed(
    root: Path, vocab: int, steps: int, write_repeats: int, teacher_shape: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    hidden, layers = teacher_shape
    teacher = TinyLM(vocab, hidden=hidden, layers=layers).eval()
    student = TinyLM(vocab, hidden=96, layers=1)
    ratio = parameters(teacher) / parameters(student)
    batches = [
        {
            "input_ids": torch.randint(0, vocab, (8, 128)),
            "labels": torch.randint(0, vocab, (8, 128)),
        }
        for _ in range(steps)
    ]

    written = [  # more batches than a timed training pass: the write's fixed costs amortised
        {
            "input_ids": torch.randint(0, vocab, (8, 128)),
            "labels": torch.randint(0, vocab, (8, 128)),
        }
        for _ in range(steps * write_repeats)
    ]

    def forward_only() -> None:
        with torch.inference_mode():
            for batch in written:
                teacher(batch["input_ids"])

    folder = root / "speed"
    counter = iter(range(1_000_000))

    def write() -> None:
        kd.cache_teacher(teacher, written, folder / str(next(counter)), top_k=K)

    forward_times, write_times = [], []
    for _ in range(3):  # interleaved, so that a busy spell on a shared machine hits both
        forward_times.append(timed(forward_only, 1))
        write_times.append(timed(write, 1))
    forward_time, write_time = sorted(forward_times)[1], sorted(write_times)[1]
    fingerprint = timed(lambda: weights_fingerprint(teacher), 3)
    print(
        f"\nwrite overhead (V = {vocab}, teacher hidden {hidden} x {layers} blocks, "
        f"{parameters(teacher) / 1e6:.1f}M parameters, {len(written)} batches of 8 x 128): "
        f"teacher forward "
        f"{forward_time:.2f} s, kd.cache_teacher {write_time:.2f} s: "
        f"+{100 * (write_time / forward_time - 1):.0f} % "
        f"(+{100 * ((write_time - fingerprint) / forward_time - 1):.0f} % without the "
        f"{1000 * fingerprint:.0f} ms weights fingerprint, once per run); "
        f"{1e6 * (write_time - fingerprint - forward_time) / (len(written) * 8 * 128):.1f} us "
        "per position"
    )
    kd.cache_teacher(teacher, batches, folder / "train", top_k=K)
    cached = folder / "train"
    criterion = {"name": "topk_kl", "k": K, "tail_bucket": True}

    def trainer(teacher_spec: object) -> object:
        model = kd.convert(
            copy.deepcopy(student),
            [("kd_loss", {"teacher_model": teacher_spec, "criterion": criterion})],
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def epoch() -> None:
            for batch in batches:
                model(input_ids=batch["input_ids"])
                loss = model.compute_kd_loss(labels=llm.shift_labels(batch["labels"]))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()

        return epoch

    online = timed(trainer(teacher), 2) / steps  # type: ignore[arg-type]
    offline = timed(trainer({"name": "cached", "path": str(cached)}), 2) / steps  # type: ignore[arg-type]
    print(
        f"step time (teacher {ratio:.1f}x the student's parameters): "
        f"online {1000 * online:.0f} ms, offline {1000 * offline:.0f} ms: "
        f"online / offline = {online / offline:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary of the speed runs")
    parser.add_argument("--steps", type=int, default=4, help="batches per timed pass")
    parser.add_argument("--positions", type=int, default=256, help="positions of the size runs")
    parser.add_argument(
        "--write-repeats", type=int, default=4, help="the write run caches steps x this batches"
    )
    parser.add_argument(
        "--teacher",
        default="512x4",
        help="the speed runs' teacher, HIDDENxBLOCKS: the write's extra work is per position and "
        "vocabulary entry, so its share falls as the teacher's forward per position grows",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the work (this process's CPU time, one thread), not the wall clock: steady "
        "on a shared machine, where other jobs' load makes wall-clock ratios noise",
    )
    args = parser.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        torch.set_num_threads(1)
    warnings.simplefilter("ignore", kd.NotRecordableWarning)  # the teacher instance is not data
    with tempfile.TemporaryDirectory() as tmp:
        sizes(Path(tmp), args.positions)
        hidden, layers = (int(n) for n in args.teacher.split("x"))
        speed(Path(tmp), args.vocab, args.steps, args.write_repeats, (hidden, layers))


if __name__ == "__main__":
    main()
