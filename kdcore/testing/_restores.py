"""The contract every plugin kind shares: what was saved comes back in a fresh process."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import kdcore as kd
from kdcore.testing._report import expect
from kdcore.testing._setup import Setup, restored_loss_in_fresh_process


def expect_restored_in_a_fresh_process(setup: Setup, model: Any, **save_options: Any) -> None:
    """Train ``model`` a step, save it, and expect a fresh interpreter to restore it into a new
    student that computes the same next loss (so configs, weights and state all came back)."""
    setup.training_loss(model).backward()
    with tempfile.TemporaryDirectory(prefix="kdcore-contract-") as folder:
        checkpoint = Path(folder) / "checkpoint"
        kd.save(model, checkpoint, **save_options)
        expected = setup.training_loss(model).item()  # after the save: state may advance
        restored = restored_loss_in_fresh_process(setup, checkpoint)
    expect(
        math.isclose(restored, expected, rel_tol=1e-6, abs_tol=1e-9),
        f"the model restored in a fresh process computes loss {restored!r}, the saved one "
        f"{expected!r}: what was recorded or saved does not rebuild it",
    )
