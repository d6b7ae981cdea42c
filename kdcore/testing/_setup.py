"""The end-to-end set-up a check trains and checkpoints, described by references so that a
fresh Python process can rebuild it (``python -m kdcore.testing._setup`` restores one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

import kdcore as kd
from kdcore.plugin import resolve

TINY_NET = "kdcore.testing.models:TinyNet"
TINY_CONV_NET = "kdcore.testing.models:TinyConvNet"


@attrs.frozen
class Setup:
    """A student and a teacher (``"module:qualname"`` references and their keyword arguments),
    the pair of layers the criterion compares (``""``: the whole model), a batch shape and the
    ``labels`` given to losses that take them (``-100`` marks an ignored example).

    The teacher's keyword arguments should fix its weights (the tiny models take ``seed=``):
    it is rebuilt from them when a checkpoint is restored.
    """

    student: str = TINY_NET
    student_kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    teacher: str = TINY_NET
    teacher_kwargs: Mapping[str, Any] = attrs.field(factory=lambda: {"width": 16, "seed": 1})
    layers: tuple[str, str] = ("", "")
    batch_shape: tuple[int, ...] = (5, 4)
    labels: tuple[int, ...] | None = (0, 2, -100, 1, 2)

    def build_student(self) -> nn.Module:
        student: nn.Module = resolve(self.student, what="student")(**self.student_kwargs)
        return student

    def teacher_spec(self) -> dict[str, Any]:
        return {"name": "callable", "target": self.teacher, "kwargs": dict(self.teacher_kwargs)}

    def convert(
        self,
        criterion: Any,
        loss_balancer: Any = None,
        *,
        teacher: Any = None,
        mode: str = "kd_loss",
        student: nn.Module | None = None,
    ) -> Any:
        """A new student from the set-up (or the ``student`` given) converted by ``mode`` with
        ``criterion`` (one loss, applied to ``layers``, or a list of ``{"student", "teacher",
        "loss"}`` entries); the teacher is the set-up's spec unless ``teacher`` is given."""
        if not isinstance(criterion, list):
            student_layer, teacher_layer = self.layers
            criterion = [{"student": student_layer, "teacher": teacher_layer, "loss": criterion}]
        config = {
            "teacher_model": self.teacher_spec() if teacher is None else teacher,
            "criterion": criterion,
            "loss_balancer": loss_balancer,
        }
        return kd.convert(student or self.build_student(), [(mode, config)])

    def batch(self) -> torch.Tensor:
        return torch.randn(self.batch_shape, generator=torch.Generator().manual_seed(7))

    def training_loss(self, model: Any) -> torch.Tensor:
        """One training forward and ``compute_kd_loss``, the same in every process: seeded, so
        criteria that draw random numbers (MGD's masks) draw the same ones."""
        model.train()
        torch.manual_seed(11)
        output = model(self.batch())
        kwargs: dict[str, Any] = {}
        if self.labels is not None and model.accepts_loss_kwarg("labels"):
            kwargs["labels"] = torch.tensor(self.labels)
        if model.loss_balancer is not None:
            kwargs["student_loss"] = output.float().pow(2).mean()
        return model.compute_kd_loss(**kwargs)  # type: ignore[no-any-return]


def unstructure(setup: Setup) -> dict[str, Any]:
    data = attrs.asdict(setup)
    data["student_kwargs"] = dict(setup.student_kwargs)
    data["teacher_kwargs"] = dict(setup.teacher_kwargs)
    return data


def restored_loss_in_fresh_process(setup: Setup, checkpoint: Path) -> float:
    """Restore ``checkpoint`` into a fresh student in a new interpreter and return its loss.

    Nothing of this process carries over (no registered instance, no imported module): what
    the checkpoint recorded and the installed plugins must be enough.
    """
    request = json.dumps({"setup": unstructure(setup), "checkpoint": str(checkpoint)})
    done = subprocess.run(
        [sys.executable, "-m", "kdcore.testing._setup", request],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    if done.returncode != 0:
        last_lines = "\n".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"restoring in a fresh process failed:\n{last_lines}")
    return float.fromhex(done.stdout.strip().splitlines()[-1])


def _restore_here(request: str) -> None:
    data = json.loads(request)
    setup_data = data["setup"]
    setup = Setup(
        **{
            **setup_data,
            "layers": tuple(setup_data["layers"]),
            "batch_shape": tuple(setup_data["batch_shape"]),
            "labels": None if setup_data["labels"] is None else tuple(setup_data["labels"]),
        }
    )
    model = kd.restore(setup.build_student(), data["checkpoint"])
    print(float(setup.training_loss(model).item()).hex())


if __name__ == "__main__":
    _restore_here(sys.argv[1])
