"""What a ``kdcore distill`` checkpoint records besides the model, and what ``--resume`` checks.

Next to each checkpoint ``step-<N>.safetensors`` (a ``step-<N>`` folder under FSDP2) the loop
writes ``step-<N>.json``: the step, the CPU RNG state, the number of processes and the job as
it ran (``"job"``: the ``[train]`` table with its defaults filled in, and the mode tables as
written). Resuming compares that job with the current one and refuses any change but those of
:data:`MAY_CHANGE` (a run can be extended, logged and checkpointed differently, or continued
in another folder) unless
forced, so that a resumed run is the run it continues.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from kdcore import ConfigError
from kdcore.training.config import TRAIN_TABLE, TrainConfig

#: Settings that may differ between a checkpoint's job and the job resuming it: how long the
#: run goes on, and what it logs and writes where, but not what it trains.
MAY_CHANGE = frozenset(
    f"{TRAIN_TABLE}.{name}"
    for name in (
        "steps",
        "epochs",
        "log_every",
        "checkpoint_every",
        "eval_every",
        "output",
        "loggers",
    )
)
CHECKPOINT_NAME = re.compile(r"step-(\d+)")


@attrs.define
class SavedState:
    """A checkpoint's ``step-<N>.json``."""

    step: int
    rng: list[int]
    job: dict[str, Any] | None  # None: not recorded (written before kdcore recorded it)


def state_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def job_record(modes: list[tuple[str, Any]], config: TrainConfig) -> dict[str, Any] | None:
    """The job as JSON data: ``[train]`` with its defaults, then the mode tables. None when a
    mode holds what JSON cannot (a teacher module given in Python, say)."""
    job = {TRAIN_TABLE: attrs.asdict(config), **dict(modes)}
    try:
        return json.loads(json.dumps(job, allow_nan=False))
    except (TypeError, ValueError):
        return None


def write_state(checkpoint: Path, step: int, rng: list[int], world_size: int, job: Any) -> None:
    state = {"step": step, "rng": rng, "world_size": world_size, "job": job}
    state_path(checkpoint).write_text(json.dumps(state), encoding="utf-8")


def read_state(checkpoint: Path) -> SavedState:
    """The state saved with ``checkpoint``; a one-line error saying what to pass instead when
    ``checkpoint`` is not one that ``kdcore distill`` saved."""
    sidecar = state_path(checkpoint)
    if not sidecar.is_file():
        if not checkpoint.exists():
            problem = "no such file or folder"
        elif CHECKPOINT_NAME.fullmatch(checkpoint.stem):
            problem = f"its {sidecar.name} (step and RNG state) is missing"
        else:
            problem = "not a checkpoint that kdcore distill saves during a run"
        raise ConfigError(f"--resume {checkpoint}: {problem}; {_what_to_pass(checkpoint.parent)}")
    try:
        saved = json.loads(sidecar.read_text(encoding="utf-8"))
        return SavedState(int(saved["step"]), list(saved["rng"]), saved.get("job"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume {checkpoint}: {sidecar} is damaged ({exc!r})") from None


def check_job(
    checkpoint: Path, recorded: dict[str, Any] | None, job: Any, force: bool
) -> list[str]:
    """Refuse to resume ``checkpoint`` with a job other than the one that saved it; return the
    changes ``force`` lets through (``path: old -> new``)."""
    if recorded is None or job is None:
        return []
    saved_modes = sorted(set(recorded) - {TRAIN_TABLE})
    modes = sorted(set(job) - {TRAIN_TABLE})
    if saved_modes != modes:
        saved = ", ".join(saved_modes) or "none: a plain training run, such as a teacher's"
        raise ConfigError(
            f"--resume {checkpoint}: saved by a job with other distillation modes ({saved}) "
            f"than this one ({', '.join(modes) or 'none'}); resume from a checkpoint this job "
            "saved, or run it without --resume to start it"
        )
    changes = [
        f"{path}: {_shown(old)} -> {_shown(new)}"
        for path, old, new in differences(recorded, job)
        if path not in MAY_CHANGE
    ]
    if changes and not force:
        raise ConfigError(
            f"--resume {checkpoint}: the job differs from the one that saved it:\n  "
            + "\n  ".join(changes)
            + "\nrestore those settings, or pass --force to resume with the new ones "
            f"(these may change without --force: {', '.join(sorted(MAY_CHANGE))})"
        )
    return changes


def differences(old: Any, new: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(path, old, new)`` for each value that differs, with config paths
    (``kd_loss.criterion[0].loss.temperature``); a missing value is ``...``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            where = f"{path}.{key}" if path else str(key)
            yield from differences(old.get(key, ...), new.get(key, ...), where)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from differences(a, b, f"{path}[{index}]")
    elif old != new:
        yield path, old, new


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of the highest step in ``folder`` that has its ``.json``."""
    found = []
    for sidecar in folder.glob("step-*.json") if folder.is_dir() else []:
        match = CHECKPOINT_NAME.fullmatch(sidecar.stem)
        for checkpoint in (sidecar.with_suffix(".safetensors"), sidecar.with_suffix("")):
            if match and checkpoint.exists():
                found.append((int(match.group(1)), checkpoint))
    return max(found)[1] if found else None


def _what_to_pass(folder: Path) -> str:
    latest = latest_checkpoint(folder)
    if latest is None:
        return "pass a step-<N> checkpoint that kdcore distill saved, with its .json"
    return f"pass a step-<N> checkpoint that kdcore distill saved, such as --resume {latest}"


def _shown(value: Any) -> str:
    return "(not set)" if value is ... else json.dumps(value)
