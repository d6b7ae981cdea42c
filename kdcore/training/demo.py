"""The job ``kdcore distill`` runs with no config: distill a digit classifier, no download.

The UCI hand-written digits (1,797 8x8 images, CC BY 4.0, E. Alpaydin and C. Kaynak; see
``data/ATTRIBUTION.md``), split with a fixed seed into training and held-out test images. A
teacher MLP learns from every training label; two tiny students see only a few labels: one
trained alone, one distilled from the teacher on all training images (the others unlabelled).
Everything runs through :func:`kdcore.training.loop.train`, as a config job would.
"""

from __future__ import annotations

import csv
import gzip
import io
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from kdcore.training.config import TrainConfig
from kdcore.training.loop import IGNORE_LABEL, evaluate, train

PIXELS, CLASSES = 64, 10
TEST_IMAGES = 497  # 1,300 training images


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images as ``(x, y)``: ``x`` float in [0, 1] of shape (1797, 64)."""
    raw = resources.files("kdcore.training").joinpath("data/digits.csv.gz").read_bytes()
    rows = list(csv.reader(io.StringIO(gzip.decompress(raw).decode("ascii"))))
    values = torch.tensor([[float(v) for v in row] for row in rows])
    return values[:, :PIXELS] / 16.0, values[:, PIXELS].long()


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.width, self.depth = width, depth
        layers: list[nn.Module] = []
        inputs = PIXELS
        for _ in range(depth):
            layers += [nn.Linear(inputs, width), nn.ReLU()]
            inputs = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(inputs, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_demo(
    *,
    labels: int = 100,
    student_width: int = 8,
    teacher_steps: int = 600,
    student_steps: int = 1500,
    output: str | Path | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Run the demo, print its table, return the numbers. Smaller steps for a quick check."""
    start = time.perf_counter()
    x, y = load_digits()
    # The split and the labelled images come from a stream of their own: drawn from a training
    # seed, the labelled images would be exactly the first batches that seed's shuffle makes.
    draw = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=draw)
    test, training = order[:TEST_IMAGES], order[TEST_IMAGES:]
    x_train, y_train = x[training], y[training]
    test_set = TensorDataset(x[test], y[test])
    few = torch.full_like(y_train, IGNORE_LABEL)
    keep = torch.randperm(len(x_train), generator=draw)[:labels]
    few[keep] = y_train[keep]

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(output) if output is not None else Path(scratch)

        def config(name: str, steps: int, seed: int) -> TrainConfig:
            return TrainConfig(
                student="kdcore.training.demo:MLP",
                data="kdcore.training.demo:load_digits",
                optimizer="adam",
                learning_rate=3e-3,
                steps=steps,
                batch_size=64,
                log_every=10**9,
                eval_every=0,  # the table evaluates once, at the end
                output=str(folder / name),
                seed=seed,
            )

        quiet: dict[str, Any] = dict(log=None)
        teacher = train(
            [],
            config("teacher", teacher_steps, 0),
            student=lambda: MLP(width=256, depth=2),
            data=lambda: (TensorDataset(x_train, y_train), test_set),
            save=False,
            **quiet,
        )
        alone = train(
            [],
            config("alone", student_steps, 1),
            student=lambda: MLP(width=student_width, depth=1),
            data=lambda: (TensorDataset(x_train[keep], y_train[keep]), test_set),
            save=False,
            **quiet,
        )
        teacher_model = teacher.student.eval().requires_grad_(False)
        modes = [
            (
                "kd_loss",
                {
                    "teacher_model": teacher_model,
                    "criterion": {
                        "name": "logits",
                        "temperature": 4.0,
                        "reduction": "batchmean",
                    },
                    "loss_balancer": {"name": "static", "kd_loss_weight": 0.7},
                },
            )
        ]
        distilled = train(
            modes,
            config("distilled", student_steps, 1),
            student=lambda: MLP(width=student_width, depth=1),
            data=lambda: (TensorDataset(x_train, few), test_set),
            save=output is not None,
            **quiet,
        )
        check = config("eval", 1, 0)
        rows = [
            (
                f"teacher ({len(x_train):,} labels)",
                evaluate(teacher.student, test_set, check),
                parameters(teacher.student),
                teacher.seconds,
            ),
            (
                f"student alone ({labels} labels)",
                evaluate(alone.student, test_set, check),
                parameters(alone.student),
                alone.seconds,
            ),
            (
                f"student distilled ({labels} labels)",
                evaluate(distilled.student, test_set, check),
                parameters(distilled.student),
                distilled.seconds,
            ),
        ]
    seconds = time.perf_counter() - start
    if log is not None:
        log(
            f"UCI digits: {len(x_train):,} training images, {len(test):,} held-out test images "
            "(CC BY 4.0, Alpaydin & Kaynak)"
        )
        log(f"{'model':<34}{'test accuracy':>14}{'parameters':>12}{'train s':>9}")
        for name, accuracy, count, took in rows:
            log(f"{name:<34}{accuracy:>14.3f}{count:>12,}{took:>9.1f}")
        log(f"wall time {seconds:.1f} s")
    return {"rows": rows, "seconds": seconds}
