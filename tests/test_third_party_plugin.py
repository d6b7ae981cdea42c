"""A third-party plugin, really pip-installed, is found through its entry point.

``tests/third_party_plugin`` is a separate distribution (``kdcore-example-plugin``) that registers
a ``cosine`` criterion. Each test installs it with pip into a folder of its own and runs a fresh
interpreter with that folder on ``PYTHONPATH``, so discovery goes through
``importlib.metadata`` exactly as for a user's ``pip install``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_SOURCE = Path(__file__).parent / "third_party_plugin"
DISTRIBUTION = "kdcore-example-plugin"
ENTRY_POINT = "example"


def _setuptools_can_build_offline() -> bool:
    # setuptools >= 70.1 builds wheels by itself; older ones also need the `wheel` package.
    if importlib.util.find_spec("setuptools") is None:
        return False
    major, minor = (int(part) for part in importlib.metadata.version("setuptools").split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``kdcore-example-plugin`` as pip installed it."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip(f"pip is not installed in {sys.prefix}")
    root = tmp_path_factory.mktemp("third_party_plugin")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = shutil.copytree(
        PLUGIN_SOURCE, root / "source", ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    target = root / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if _setuptools_can_build_offline():
        # Build with this environment's setuptools: no index needed.
        command.append("--no-build-isolation")
        env["PIP_NO_INDEX"] = "1"
    command += ["--target", str(target), str(source)]
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, check=False, timeout=300
    )
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    assert any(target.glob("kdcore_example_plugin-*.dist-info/entry_points.txt"))
    return target


def run_python(code: str, plugin_path: Path, disabled: str = "") -> dict[str, object]:
    """Run ``code`` in a fresh interpreter that sees the installed plugin; return its JSON."""
    env = {**os.environ, "PYTHONPATH": str(plugin_path), "KDCORE_DISABLE_PLUGINS": disabled}
    prelude = (
        "import json, warnings\n"
        "warnings.filterwarnings('ignore', 'Failed to initialize NumPy')\n"
        "import kdcore as kd\n"
        "warnings.simplefilter('error', kd.PluginWarning)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_installed_plugin_is_found_through_its_entry_point(plugin_path: Path) -> None:
    found = run_python(
        """
        import kdcore_example_plugin
        provider = kd.registries().criteria.provider("cosine")
        print(json.dumps({
            "plugin": provider.plugin,
            "distribution": provider.distribution,
            "module_file": kdcore_example_plugin.__file__,
            "is_registered_class": kd.registries().criteria.get("cosine")
                                   is kdcore_example_plugin.CosineLoss,
        }))
        """,
        plugin_path,
    )
    assert found["plugin"] == ENTRY_POINT
    assert found["distribution"] == DISTRIBUTION
    assert Path(str(found["module_file"])).parent == plugin_path
    assert found["is_registered_class"] is True


def test_installed_criterion_distils_by_name(plugin_path: Path) -> None:
    result = run_python(
        """
        import torch
        from torch import nn

        torch.manual_seed(0)
        student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
        model = kd.convert(
            student, [("kd_loss", {"teacher_model": teacher, "criterion": {"name": "cosine"}})]
        )
        x = torch.randn(5, 4)
        out = model(x)
        loss = model.compute_kd_loss()
        loss.backward()
        expected = (1 - torch.cosine_similarity(out, teacher(x), dim=-1)).mean()
        print(json.dumps({
            "loss_module": type(model.loss_modules[0]).__module__,
            "loss": loss.item(),
            "expected": expected.item(),
            "student_has_grad": student.weight.grad is not None,
        }))
        """,
        plugin_path,
    )
    assert result["loss_module"] == "kdcore_example_plugin"
    assert result["loss"] == pytest.approx(result["expected"], rel=1e-6)
    assert result["student_has_grad"] is True


def test_kdcore_plugins_lists_the_installed_plugin(plugin_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(plugin_path), "KDCORE_DISABLE_PLUGINS": ""}
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "kdcore", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert ["criterion", "cosine", ENTRY_POINT, DISTRIBUTION] in [
        line.split() for line in result.stdout.splitlines()
    ]


def test_disabling_the_entry_point_hides_the_plugin(plugin_path: Path) -> None:
    result = run_python(
        """
        from torch import nn

        try:
            kd.convert(
                nn.Linear(4, 3),
                [("kd_loss", {"teacher_model": nn.Linear(4, 3), "criterion": {"name": "cosine"}})],
            )
        except kd.UnknownPluginError as exc:
            message = str(exc)
        else:
            message = ""
        print(json.dumps({
            "message": message,
            "registered": "cosine" in kd.registries().criteria,
            "builtins": kd.registries().criteria.names(),
        }))
        """,
        plugin_path,
        disabled=ENTRY_POINT,
    )
    assert result["registered"] is False
    builtins = list(result["builtins"])  # type: ignore[call-overload]
    assert {"logits", "mse"} <= set(builtins)
    message = str(result["message"])
    assert message.startswith("kd_loss.criterion.name: unknown criterion 'cosine'")
    assert f"registered: {', '.join(builtins)};" in message
