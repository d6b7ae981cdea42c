"""kdcore's quick start: distill a small classifier from a larger one, on data made here.

The task: 10 classes of points in 32 dimensions, each class a mixture of 3 Gaussian blobs.
The teacher learns from 6,000 labelled points; the students see only 300 labels, the distilled
one also sees the teacher's soft predictions on all 6,000 points. Fixed seeds; a few seconds on
2 CPU cores. Run: python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kdcore as kd

CLASSES, DIMENSIONS, BLOBS = 10, 32, 3


def make_data(points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)  # the same blobs for every split
    centres = torch.randn(CLASSES, BLOBS, DIMENSIONS, generator=generator) * 0.65
    generator.manual_seed(seed)
    labels = torch.randint(CLASSES, (points,), generator=generator)
    blob = torch.randint(BLOBS, (points,), generator=generator)
    noise = torch.randn(points, DIMENSIONS, generator=generator)
    return centres[labels, blob] + noise, labels


class MLP(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.width, self.depth = width, depth  # kept so that checkpoints can record the model
        layers: list[nn.Module] = []
        inputs = DIMENSIONS
        for _ in range(depth):
            layers += [nn.Linear(inputs, width), nn.ReLU()]
            inputs = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(inputs, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    labelled: torch.Tensor,
    epochs: int,
) -> nn.Module:
    model = kd.convert(
        student,
        [
            (
                "kd_loss",
                {
                    "teacher_model": teacher,
                    "criterion": kd.LogitsDistillationLoss(temperature=4.0, reduction="batchmean"),
                    "loss_balancer": kd.StaticLossBalancer(kd_loss_weight=0.7),
                },
            )
        ],
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(128):
            output = model(x[batch])
            mask = labelled[batch]  # the cross-entropy sees only the labelled points
            if mask.any():
                student_loss = F.cross_entropy(output[mask], y[batch][mask])
            else:
                student_loss = output.sum() * 0
            loss = model.compute_kd_loss(student_loss=student_loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    x_train, y_train = make_data(6000, seed=1)
    x_test, y_test = make_data(3000, seed=2)
    labelled = torch.zeros(len(x_train), dtype=torch.bool)
    labelled[torch.randperm(len(x_train))[:300]] = True

    teacher = MLP(width=256, depth=3)
    train(teacher, x_train, y_train, epochs=15)

    torch.manual_seed(1)
    alone = MLP(width=16, depth=1)
    train(alone, x_train[labelled], y_train[labelled], epochs=150)

    torch.manual_seed(1)
    model = distill(MLP(width=16, depth=1), teacher, x_train, y_train, labelled, epochs=15)

    with tempfile.TemporaryDirectory() as folder:  # a checkpoint round trip, as a run would do
        path = kd.save(model, Path(folder) / "distilled.safetensors")
        restored = kd.restore(MLP(width=16, depth=1), path, teacher_model=teacher)
        assert torch.equal(restored.head.weight, model.head.weight)
    distilled = kd.export(model)

    def parameters(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    print(f"{'model':<32}{'test accuracy':>14}{'parameters':>12}")
    for name, net in (
        ("teacher (6,000 labels)", teacher),
        ("student alone (300 labels)", alone),
        ("student distilled (300 labels)", distilled),
    ):
        print(f"{name:<32}{accuracy(net, x_test, y_test):>14.3f}{parameters(net):>12,}")
    print(f"wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
