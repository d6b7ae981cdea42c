"""Reading distillation configs from TOML, JSON or YAML files.

A file's top-level tables are mode names; what :func:`load_config` returns is what
``kd.convert(model, mode=...)`` takes::

    [kd_loss]
    teacher_model = { name = "callable", target = "mypkg.models:build_teacher" }
    loss_balancer = { name = "static", kd_loss_weight = 0.4 }
    [[kd_loss.criterion]]
    student = ""
    teacher = ""
    loss = { name = "logits", temperature = 3.0 }
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdcore.errors import ConfigError, ConfigTypeError, KDCoreError
from kdcore.modes import check

READERS = {".toml": "TOML", ".json": "JSON", ".yaml": "YAML", ".yml": "YAML"}


def load_config(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """Read ``path`` and check it (plugin names, keys, types) before anything is built.

    Errors name the file and the path of the bad value inside it.
    """
    path = Path(path)
    data = read_config_file(path)
    modes = []
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigTypeError(
                f"{path}: top-level {name!r} must be a table of that mode's config, "
                f"got {type(table).__name__}"
            )
        modes.append((name, table))
    if not modes:
        raise ConfigError(f"{path}: no mode tables (expected e.g. [kd_loss])")
    try:
        check(modes)
    except KDCoreError as exc:
        exc.args = (f"{path}: {exc.args[0]}", *exc.args[1:])
        raise
    return modes


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse ``path`` by its suffix into a dict; parse errors become :class:`ConfigError`."""
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unknown config format; use one of {', '.join(READERS)}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    import tomllib  # here, not at import time: most runs never read a config file

    try:
        if kind == "TOML":
            data: Any = tomllib.loads(text)
        elif kind == "JSON":
            data = json.loads(text)
        else:
            data = _load_yaml(text, path)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {kind}: {exc}") from None
    except RecursionError:  # the parsers' answer to deep nesting is not a parse error
        raise ConfigError(f"{path}: not valid {kind}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigTypeError(f"{path}: the top level must be a table of modes")
    return data


def _load_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(
            f"{path}: reading YAML needs PyYAML: pip install 'kdcore[yaml]'"
        ) from None
    try:
        return yaml.safe_load(text)  # safe_load: a config file never constructs Python objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
