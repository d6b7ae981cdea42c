"""Broken plugins next to working ones: kdcore still imports, the built-ins and the other plugins
still work, and every warning names the entry point and its distribution.

(tests/test_plugin_manager.py covers one failure of each kind in isolation; here each failure
sits next to kdcore's own plugins and a working third-party one, and a real model is converted.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import kdcore as kd
from kdcore import PluginHost, PluginWarning
from tests.conftest import TinyNet, make_teacher
from tests.test_plugin_manager import COSINE, make_distribution

BROKEN = {
    "raises at import": ("raise RuntimeError('boom at import')\n", r"failed to import.*boom"),
    "misses a dependency": ("import no_such_dependency_xyz\n", r"failed to import.*no_such"),
    "has a syntax error": ("def broken(:\n", r"failed to import.*SyntaxError"),
    "exits at import": ("raise SystemExit(3)\n", r"failed to import.*SystemExit"),
    "raises at registration": (
        """
        import kdcore

        @kdcore.hookimpl
        def kdcore_register_criteria(registry):
            raise ValueError("bad registration")
        """,
        r"raised in kdcore_register_criteria: ValueError\('bad registration'\)",
    ),
    "registers a non-string name": (
        """
        import kdcore

        @kdcore.hookimpl
        def kdcore_register_criteria(registry):
            registry.add(42, object)
        """,
        r"registered a criterion under 42; names must be non-empty strings",
    ),
    "clashes with a built-in name": (
        """
        import kdcore
        from torch import nn

        @kdcore.hookimpl
        def kdcore_register_criteria(registry):
            registry.add("mse", nn.L1Loss)
        """,
        r"the criterion 'mse' is registered by plugin 'criteria' \(distribution 'kdcore'\) and "
        r"plugin 'broken' \(distribution 'acme-kd'\)",
    ),
}


@pytest.fixture
def plugin_root(tmp_path: Path) -> Any:
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith(("acme", "other"))]:
        del sys.modules[name]


@pytest.mark.parametrize("failure", list(BROKEN))
def test_a_broken_plugin_leaves_kdcore_and_the_other_plugins_working(
    plugin_root: Path, failure: str
) -> None:
    source, match = BROKEN[failure]
    make_distribution(plugin_root, "acme-kd", {"broken": source})
    make_distribution(plugin_root, "other-kd", {"cosine": COSINE})
    host = PluginHost(search_path=[str(plugin_root), *sys.path], blocked=())
    with pytest.warns(PluginWarning, match=match) as caught:
        registries = host.registries
    assert any("'acme-kd'" in str(w.message) and "'broken'" in str(w.message) for w in caught)
    assert "cosine" in registries.criteria  # the other third-party plugin
    with kd.use_host(host):  # and the built-ins: a real model converts and trains
        model = kd.convert(
            TinyNet(),
            [
                (
                    "kd_loss",
                    {
                        "teacher_model": make_teacher,
                        "criterion": [
                            {"student": "", "teacher": "", "loss": {"name": "logits"}},
                            {"student": "", "teacher": "", "loss": {"name": "cosine"}},
                        ],
                        "loss_balancer": {"name": "static", "kd_loss_weight": [0.3, 0.3]},
                    },
                )
            ],
        )
        model(torch.randn(3, 4))
        assert torch.isfinite(model.compute_kd_loss(student_loss=torch.tensor(1.0)))
    if failure == "clashes with a built-in name":
        with pytest.raises(kd.PluginConflictError, match="'acme-kd'"):
            registries.criteria.get("mse")


def test_kdcore_imports_and_works_with_a_broken_plugin_installed(plugin_root: Path) -> None:
    """In a fresh process with the broken distribution on sys.path, as a user would have it."""
    make_distribution(plugin_root, "acme-kd", {"broken": "raise SystemExit('plugin exits')\n"})
    code = (
        "import warnings, kdcore as kd\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    names = kd.registries().criteria.names()\n"
        "print('logits' in names, [str(w.message) for w in caught])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": f"{plugin_root}:{Path(__file__).parent.parent}", "PATH": ""},
    )
    assert result.stdout.startswith("True")
    assert "plugin 'broken' (distribution 'acme-kd') failed to import" in result.stdout


def test_a_distribution_without_a_name_does_not_break_loading(plugin_root: Path) -> None:
    make_distribution(plugin_root, "other-kd", {"cosine": COSINE})
    info = plugin_root / "nameless-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kdcore]\nghost = no_such_module_xyz\n")
    with pytest.warns(PluginWarning, match=r"'ghost' \(distribution '<unnamed>'\) failed"):
        registries = PluginHost(search_path=[str(plugin_root)], blocked=()).registries
    assert registries.criteria.names() == ["cosine"]


def test_a_name_of_the_wrong_type_in_a_config_is_a_config_error() -> None:
    with pytest.raises(kd.ConfigTypeError, match=r"kd_loss\.teacher_model\.name: expected the"):
        kd.check([("kd_loss", {"teacher_model": {"name": []}, "criterion": {"name": "mse"}})])
