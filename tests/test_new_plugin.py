"""``kdcore new-plugin``: a package that installs, is listed by ``kdcore plugins``, and whose
own tests (kdcore.testing's contracts, a save and a restore in a fresh process) pass."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdcore.cli import main

KINDS = ["criterion", "balancer", "teacher-loader", "backend"]


def kit_installed() -> bool:
    """Whether pytest loads kdcore's fixtures by itself (the pytest11 entry point is installed;
    a checkout whose metadata predates it names the plugin with -p instead)."""
    return any(
        entry_point.value == "kdcore.testing.pytest_plugin"
        for entry_point in importlib.metadata.entry_points(group="pytest11")
    )


def run(*args: str, cwd: Path, site: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("kind", KINDS)
def test_new_plugin_writes_a_package(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["new-plugin", "kdcore-my-thing", "--kind", kind, "--directory", str(tmp_path)]) == 0
    )
    package = tmp_path / "kdcore-my-thing"
    files = sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "kdcore_my_thing.py",
        "pyproject.toml",
        "tests/test_kdcore_my_thing.py",
    ]
    pyproject = (package / "pyproject.toml").read_text()
    assert '[project.entry-points.kdcore]\nmy_thing = "kdcore_my_thing"' in pyproject
    assert 'registry.add("my_thing"' in (package / "kdcore_my_thing.py").read_text()
    assert (
        "from kdcore.testing import check_"
        in (package / "tests/test_kdcore_my_thing.py").read_text()
    )
    assert f"wrote {package / 'pyproject.toml'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["Bad Name"], "plugin name 'Bad Name' must be a lower-case Python identifier"),
        (["x", "--kind", "critrion"], "unknown plugin kind 'critrion'.*did you mean 'criterion'"),
    ],
)
def test_new_plugin_refuses_bad_input_and_writes_nothing(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["new-plugin", *argv, "--directory", str(tmp_path)]) == 1
    assert list(tmp_path.iterdir()) == []
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(("name", "kind"), [("logits", "criterion"), ("static", "balancer")])
def test_new_plugin_refuses_a_name_an_installed_plugin_registers(
    tmp_path: Path, name: str, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["new-plugin", name, "--kind", kind, "--directory", str(tmp_path)]) == 1
    assert f"{name!r} is already registered by plugin" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_new_plugin_leaves_an_existing_package_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "kdcore-cosine").mkdir()
    (tmp_path / "kdcore-cosine" / "mine.py").write_text("# my work\n")
    assert main(["new-plugin", "cosine", "--directory", str(tmp_path)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "kdcore-cosine").iterdir()] == ["mine.py"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_the_scaffold_installs_is_listed_and_passes_its_own_tests(
    tmp_path: Path, kind: str
) -> None:
    name = f"scaffolded_{kind.replace('-', '_')}"
    assert main(["new-plugin", name, "--kind", kind, "--directory", str(tmp_path)]) == 0
    package = tmp_path / f"kdcore-{name.replace('_', '-')}"
    site = tmp_path / "site"
    install = run(
        "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
        "--target", str(site), str(package),
        cwd=tmp_path,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr

    listed = run("-m", "kdcore", "plugins", "--json", cwd=tmp_path, site=site)
    assert listed.returncode == 0, listed.stderr
    assert (name, package.name) in {
        (entry["name"], entry["distribution"])
        for entries in json.loads(listed.stdout)["registries"].values()
        for entry in entries
    }

    # The generated tests include the fresh-process restore: a config naming the plugin
    # converts, saves and restores with nothing but the installed package.
    load = [] if kit_installed() else ["-p", "kdcore.testing.pytest_plugin"]
    tests = run(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", *load, "tests", cwd=package, site=site
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert " passed" in tests.stdout and "failed" not in tests.stdout
