"""The teacher-loader template: build a model class and load its kd.save'd weights."""

MODULE = '''\
"""kdcore teacher loader ``$name``: builds ``model`` ("package.module:Class") with ``kwargs``
and, given ``path``, loads the weights ``kd.save`` wrote there."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

import kdcore
from kdcore.plugin import Registry, resolve


def load_teacher(
    model: str, path: str | None = None, kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """The teacher ``model`` names, built with ``kwargs``, with the weights at ``path``."""
    # resolve() applies kd.restore's trust rules: a checkpoint cannot make it run other code.
    cls = resolve(model, what="teacher class")
    teacher = cls(**dict(kwargs or {}))
    return kdcore.restore(teacher, path) if path is not None else teacher


def validate_teacher(
    model: str, path: str | None = None, kwargs: Mapping[str, Any] | None = None
) -> None:
    """What ``kdcore check`` runs instead of loading: cheap checks, kdcore errors."""
    resolve(model, what="teacher class")
    if path is not None and not Path(path).exists():
        raise kdcore.ConfigError(f"no teacher weights at {path!r}")


def canonical_teacher(
    model: str, path: str | None = None, kwargs: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The arguments as a checkpoint records them: a relative ``path`` made absolute, so that
    ``kd.restore`` finds the weights from any directory."""
    spec: dict[str, Any] = {"model": model, "kwargs": dict(kwargs or {})}
    if path is not None:
        spec["path"] = str(Path(path).expanduser().absolute())
    return spec


load_teacher.validate = validate_teacher  # type: ignore[attr-defined]
load_teacher.canonical = canonical_teacher  # type: ignore[attr-defined]


@kdcore.hookimpl
def kdcore_register_teacher_loaders(registry: Registry[Any]) -> None:
    registry.add("$name", load_teacher)
'''

TESTS = """\
import pytest

import kdcore as kd
from kdcore.testing import check_teacher_loader

TINY_TEACHER = {"model": "kdcore.testing.models:TinyNet", "kwargs": {"width": 16, "seed": 1}}


def test_${name}_keeps_the_contracts_of_kdcores_teacher_loaders(kd_plugin_host):
    check_teacher_loader("$name", kwargs=TINY_TEACHER)


def test_a_relative_path_is_recorded_absolute(kd_plugin_host, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kd.save(kd_plugin_host.registries.teacher_loaders.get("$name")(**TINY_TEACHER), "t.safetensors")
    config = {"teacher_model": {"name": "$name", **TINY_TEACHER, "path": "t.safetensors"},
              "criterion": {"name": "mse"}}
    from kdcore.testing.models import TinyNet

    model = kd.convert(TinyNet(), [("kd_loss", config)])
    (record,) = model.mode_records
    assert record.config["teacher_model"]["path"] == str(tmp_path / "t.safetensors")


def test_a_missing_weights_file_is_a_config_error(kd_plugin_host):
    config = {"teacher_model": {"name": "$name", **TINY_TEACHER, "path": "nope.safetensors"},
              "criterion": {"name": "mse"}}
    with pytest.raises(kd.ConfigError, match="nope.safetensors"):
        kd.check([("kd_loss", config)])
"""

USAGE = """\
Use it by name in a job file:
`teacher_model = { name = "$name", model = "mypkg.models:Net", path = "teacher.safetensors" }`.
"""
