"""A clean install's commands print no warnings."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def kdcore_stderr(*arguments: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: a second thread only waits
    env.pop("PYTHONWARNINGS", None)
    result = subprocess.run(
        [sys.executable, "-m", "kdcore", *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return result.stderr


def test_kdcore_depends_on_numpy_which_torch_warns_about_on_import() -> None:
    # torch's wheels do not require NumPy but print "Failed to initialize NumPy" without it.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "numpy" in [requirement.split(">")[0].strip() for requirement in project["dependencies"]]


def test_help_prints_no_warning() -> None:
    assert kdcore_stderr("--help") == ""


@pytest.mark.slow
def test_the_demo_prints_no_warning() -> None:
    assert kdcore_stderr("distill", "--quick") == ""
