"""The checkpoint manifest: its JSON, parsed strictly, and every problem for which
``kd.restore`` refuses it (``kd.inspect`` reports them all).
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any

from kdcore._checkpoint_backend import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointVersionError,
)
from kdcore.strict_json import DuplicateKeyError, no_duplicate_keys

FORMAT = "kdcore.checkpoint"
FORMAT_VERSION = 1


def parse_manifest(text: str, path: Path) -> dict[str, Any]:
    """Check the manifest's shape and version; return it as a dict."""
    manifest = manifest_json(text, path)
    for error, problem in manifest_problems(manifest):
        raise error(path, problem)
    return manifest  # type: ignore[no-any-return]


def manifest_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys)
    except DuplicateKeyError as exc:
        raise CheckpointFormatError(
            path, f"duplicate key {exc.args[0]!r} in the manifest"
        ) from None
    except (TypeError, ValueError) as exc:
        raise CheckpointFormatError(path, f"the manifest is not valid JSON ({exc})") from None
    except RecursionError:  # json gives up on deep nesting with RecursionError, not ValueError
        raise CheckpointFormatError(path, "the manifest nests too deeply") from None


def manifest_problems(manifest: Any) -> list[tuple[type[CheckpointError], str]]:
    """Each problem of a parsed manifest, in the order ``parse_manifest`` reports the first."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return [(CheckpointFormatError, "has no kdcore manifest (not written by kd.save)")]
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        return [(CheckpointFormatError, f"format_version must be an integer, got {version!r}")]
    if version > FORMAT_VERSION:  # the rest may mean something else in that format
        problem = (
            f"was written by kdcore {manifest.get('kdcore_version')!r} in checkpoint format "
            f"{version}; this kdcore ({kdcore_version()}) reads up to format {FORMAT_VERSION}: "
            "upgrade kdcore"
        )
        return [(CheckpointVersionError, problem)]
    problems: list[tuple[type[CheckpointError], str]] = []

    def bad(problem: str) -> None:
        problems.append((CheckpointFormatError, problem))

    expected_types: dict[str, type | tuple[type, ...]] = {
        "modes": list,
        "aliases": dict,
        "optimizer": (dict, type(None)),
    }
    for key, types in expected_types.items():
        if not isinstance(manifest.get(key), types):
            bad(f"manifest {key!r} has the wrong type")
    modes = manifest.get("modes")
    for index, mode in enumerate(modes if isinstance(modes, list) else []):
        valid = (
            isinstance(mode, dict)
            and isinstance(mode.get("name"), str)
            and isinstance(mode.get("config"), (dict, type(None)))
            and isinstance(mode.get("missing"), list)
            and isinstance(mode.get("teacher_weights"), bool)
        )
        if not valid:
            bad(f"manifest modes[{index}] is malformed")
            continue
        for entry in mode["missing"]:
            if not (
                isinstance(entry, list)
                and len(entry) == 2
                and all(isinstance(e, str) for e in entry)
            ):
                bad(
                    f"manifest modes[{index}].missing holds {reprlib.repr(entry)}; expected "
                    "[config path, reason] pairs of strings"
                )
                break
    aliases = manifest.get("aliases")
    if isinstance(aliases, dict) and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        bad("manifest 'aliases' must map names to names")
    return problems


def recorded_config_problems(manifest: dict[str, Any]) -> list[str]:
    """What ``inspect`` shows of each mode's config, in the form ``kd.save`` records it; the
    rest of a config is checked by ``kd.restore`` when it rebuilds the model."""
    problems = []
    for index, mode in enumerate(manifest["modes"]):
        config = mode["config"] or {}
        criterion = config.get("criterion")
        pairs_ok = isinstance(criterion, list) and all(
            isinstance(pair, dict)
            and set(pair) == {"student", "teacher", "loss"}
            and isinstance(pair["student"], str)
            and isinstance(pair["teacher"], str)
            for pair in criterion
        )
        if "criterion" in config and criterion is not None and not pairs_ok:
            problems.append(
                f"manifest modes[{index}].config.criterion is {reprlib.repr(criterion)}, not a "
                "list of {student, teacher, loss} pairs"
            )
    optimizer = manifest.get("optimizer")  # a manifest may leave it out
    if optimizer is not None and not isinstance(optimizer.get("class"), str):
        problems.append("manifest 'optimizer' names no class")
    return problems


def kdcore_version() -> str:
    from kdcore import __version__

    return __version__
