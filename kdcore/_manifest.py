"""The checkpoint manifest: its JSON, parsed strictly, and every problem for which
``kd.restore`` refuses it (``kd.inspect`` reports them all).

The manifest is a :class:`Manifest`, written and read by the project's converter: the types
are the schema, and a damaged manifest's problems are the leaves of the converter's error tree.
"""

from __future__ import annotations

import functools
import json
import operator
import reprlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from kdcore._checkpoint_backend import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointVersionError,
)
from kdcore._converter import project_converter
from kdcore._record import ModeRecord
from kdcore._strict_json import DuplicateKeyError, no_duplicate_keys

if TYPE_CHECKING:
    import cattrs

FORMAT = "kdcore.checkpoint"
FORMAT_VERSION = 1


@attrs.frozen(kw_only=True)
class Manifest:
    """What a checkpoint's JSON manifest holds (``kd.save`` writes it; keys it does not know
    are left alone, as before)."""

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    kdcore_version: str | None = None
    student_class: str | None = None
    #: the applied modes, in order
    modes: list[ModeRecord]
    #: ``{alias: stored name}`` of tied tensors
    aliases: dict[str, str]
    #: the optimizer's scalars and groups (see :mod:`kdcore._optimizer_state`)
    optimizer: dict[str, Any] | None = None


#: The manifest's containers, and the JSON container each must be: cattrs would iterate a
#: dict's keys as a list, or a string's characters as a tuple. Inner types first: a hook takes
#: its elements' hooks when it is made.
_JSON_CONTAINERS: list[tuple[Any, type]] = [
    (tuple[str, str], list),
    (tuple[tuple[str, str], ...], list),
    (dict[str, str], dict),
    (dict[str, Any], dict),
    (ModeRecord, dict),
    (list[ModeRecord], list),
]


@functools.cache
def _manifest_converter() -> cattrs.Converter:
    converter = project_converter().copy(forbid_extra_keys=False)
    for cls, container in _JSON_CONTAINERS:
        hook = _only(container, converter.get_structure_hook(cls))
        converter.register_structure_hook_func(functools.partial(operator.eq, cls), hook)
    return converter


def _only(container: type, structure: Any) -> Any:
    def hook(value: Any, cls: Any) -> Any:
        if not isinstance(value, container):
            raise TypeError(f"expected a {container.__name__}, got {type(value).__name__}")
        if attrs.has(cls):  # kd.save writes every key of a record: an absent one is damage
            for field in attrs.fields(cls):
                if field.name not in value:  # type: ignore[operator]  # a dict, checked above
                    raise KeyError(field.name)
        return structure(value, cls)

    return hook


def manifest_text(manifest: Manifest) -> str:
    """The manifest as JSON (NaN allowed: an optimizer's scalars may hold it)."""
    return json.dumps(_manifest_converter().unstructure(manifest), allow_nan=True)


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
    try:
        _manifest_converter().structure(manifest, Manifest)
    except Exception as exc:
        problems = [_problem(where, manifest) for where in _error_places(exc)]
        return [(CheckpointFormatError, problem) for problem in dict.fromkeys(problems)]
    return []


def _error_places(exc: BaseException, where: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Where (attribute names, indices, keys) each leaf of a cattrs error tree lies."""
    from cattrs.errors import (
        AttributeValidationNote,
        ClassValidationError,
        IterableValidationError,
    )

    if not isinstance(exc, (ClassValidationError, IterableValidationError)):
        return [where]
    noted, unnoted = exc.group_exceptions()
    places = []
    for inner, note in noted:
        step = note.name if isinstance(note, AttributeValidationNote) else note.index
        places += _error_places(inner, (*where, step))
    for inner in unnoted:
        places += _error_places(inner, where)
    return places


def _problem(where: tuple[Any, ...], manifest: dict[str, Any]) -> str:
    """The problem at ``where``, said in terms of the manifest's JSON."""
    key, *inner = where or ("",)
    if key == "modes" and inner:
        index = inner[0]
        mode = manifest["modes"][index]
        missing = mode.get("missing") if isinstance(mode, dict) else None
        if inner[1:2] == ["missing"] and len(inner) > 2 and isinstance(missing, list):
            return (
                f"manifest modes[{index}].missing holds {reprlib.repr(missing[inner[2]])}; "
                "expected [config path, reason] pairs of strings"
            )
        return f"manifest modes[{index}] is malformed"
    if key == "aliases" and inner:
        return "manifest 'aliases' must map names to names"
    return f"manifest {key!r} has the wrong type"


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
