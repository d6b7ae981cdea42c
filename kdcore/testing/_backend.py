"""``check_backend``: the contracts every checkpoint backend keeps."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import kdcore as kd
from kdcore.plugin import CheckpointError, inspect_checkpoint
from kdcore.testing._report import Checker, ContractReport, expect
from kdcore.testing._restores import expect_restored_in_a_fresh_process
from kdcore.testing._setup import Setup

BACKEND_CONTRACTS = (
    "round_trip",
    "detects_its_own_format_only",
    "overwrite_keeps_the_newest",
    "inspect_counts_the_tensors",
    "damage_is_a_checkpoint_error",
    "restores_in_a_fresh_process",
)


def check_backend(
    name: str, *, options: Mapping[str, Any] | None = None, skip: Iterable[str] = ()
) -> ContractReport:
    """Check the checkpoint backend registered as ``name`` (saving with ``options``) against
    the contracts kdcore's own backends keep."""
    options = dict(options or {})
    setup = Setup()
    checker = Checker(f"checkpoint backend {name!r}", frozenset(skip))

    def model() -> Any:
        return setup.convert({"name": "mse"})

    def save(target: Any, path: Path) -> Path:
        return kd.save(target, path, backend=name, **options)

    def round_trip() -> None:
        with _folder() as folder:
            saved = model()
            path = save(saved, folder / "checkpoint")
            restored = kd.restore(setup.build_student(), path)
            expected, got = saved.state_dict(), restored.state_dict()
            differing = [
                k for k in expected if k not in got or not torch.equal(expected[k], got[k])
            ]
            expect(not differing, f"restored tensors differ from the saved ones: {differing[:5]}")

    def detects_its_own_format_only() -> None:
        backend = kd.registries().checkpoint_backends.get(name)
        with _folder() as folder:
            path = save(model(), folder / "checkpoint")
            expect(backend.detect(path), f"detect() does not recognise {path.name}, its own save")
            stranger = folder / "not-a-checkpoint.bin"
            stranger.write_bytes(b"\x00" * 64)
            expect(not backend.detect(stranger), "detect() claims a file of 64 zero bytes")
            expect(not backend.detect(folder / "missing"), "detect() claims a missing path")

    def overwrite_keeps_the_newest() -> None:
        with _folder() as folder:
            first, second = model(), model()
            with torch.no_grad():
                for parameter in second.parameters():
                    parameter.add_(1.0)
            save(first, folder / "checkpoint")
            path = save(second, folder / "checkpoint")
            restored = kd.restore(setup.build_student(), path)
            expect(
                torch.equal(restored.state_dict()["fc1.weight"], second.state_dict()["fc1.weight"]),
                "after saving twice to the same path, restore gave the first save's weights",
            )

    def inspect_counts_the_tensors() -> None:
        with _folder() as folder:
            saved = model()
            summary = inspect_checkpoint(save(saved, folder / "checkpoint"))
            expect(not summary["problems"], f"inspect_checkpoint found {summary['problems']}")
            counted = summary["tensor_groups"].get("student", {}).get("tensors")
            expected = len(saved.student_state_dict())
            expect(
                counted == expected,
                f"inspect_checkpoint counts {counted} student tensors, the model has {expected}",
            )

    def damage_is_a_checkpoint_error() -> None:
        with _folder() as folder:
            path = save(model(), folder / "checkpoint")
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            largest = max(files, key=lambda p: p.stat().st_size)
            largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
            try:
                kd.restore(setup.build_student(), path)
            except CheckpointError:
                pass
            except Exception as exc:
                expect(
                    False,
                    f"restoring a checkpoint whose largest file ({largest.name}) was cut in half "
                    f"should raise a kdcore CheckpointError, got {type(exc).__name__}: {exc}",
                )
            else:
                expect(False, f"a checkpoint whose {largest.name} was cut in half restored")

    def restores_in_a_fresh_process() -> None:
        expect_restored_in_a_fresh_process(setup, model(), backend=name, **options)

    for contract in BACKEND_CONTRACTS:
        checker.run(contract, locals()[contract])
    return checker.report(BACKEND_CONTRACTS)


@contextmanager
def _folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="kdcore-contract-") as folder:
        yield Path(folder)
