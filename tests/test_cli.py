"""The ``kdcore`` command line: ``kdcore plugins`` and the behaviour every subcommand shares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

import kdcore as kd
from kdcore import cli
from kdcore.cli import main


class CosineCriterionPlugin:
    """A plugin registered directly: one criterion with a name of its own."""

    @staticmethod
    @kd.hookimpl
    def kdcore_register_criteria(registry: Any) -> None:
        registry.add("cosine", object)


class ClashingPlugin:
    """Registers a criterion under a name the built-ins already use."""

    @staticmethod
    @kd.hookimpl
    def kdcore_register_criteria(registry: Any) -> None:
        registry.add("logits", object)


class BrokenPlugin:
    @staticmethod
    @kd.hookimpl
    def kdcore_register_balancers(registry: Any) -> None:
        raise RuntimeError("boom")


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["plugins", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def test_plugins_lists_each_builtin_name_with_its_kind_plugin_and_distribution(
    builtin_host: kd.PluginHost, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plugins"]) == 0
    table = rows(capsys.readouterr().out)
    assert table[0] == ["KIND", "NAME", "PLUGIN", "DISTRIBUTION"]
    assert ["criterion", "logits", "criteria", "kdcore"] in table
    assert ["loss", "balancer", "static", "balancers", "kdcore"] in table
    assert ["teacher", "loader", "callable", "teacher_loaders", "kdcore"] in table
    assert ["mode", "kd_loss", "core", "kdcore"] in table


def test_plugins_text_output_aligns_columns(
    builtin_host: kd.PluginHost, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["plugins"])
    lines = capsys.readouterr().out.splitlines()
    table = lines[: lines.index("")] if "" in lines else lines
    header = table[0]
    for column in ("NAME", "PLUGIN", "DISTRIBUTION"):
        start = header.index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in table)


def test_plugins_names_kinds_with_nothing_registered(capsys: pytest.CaptureFixture[str]) -> None:
    host = kd.PluginHost(use_entry_points=False, plugins=[("cosine_plugin", CosineCriterionPlugin)])
    with kd.use_host(host):
        assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "Nothing registered: balancers, teacher loaders, checkpoint backends" in out


def test_plugins_json_lists_every_registry_with_providers(
    builtin_host: kd.PluginHost, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_json(capsys)
    assert set(report["registries"]) == {
        "criteria",
        "balancers",
        "teacher_loaders",
        "checkpoint_backends",
        "modes",
        "loggers",
    }
    logits = next(e for e in report["registries"]["criteria"] if e["name"] == "logits")
    assert logits == {
        "name": "logits",
        "kind": "criterion",
        "plugin": "criteria",
        "distribution": "kdcore",
        "object": "kdcore_builtins.criteria:LogitsDistillationLoss",
    }
    assert report["conflicts"] == []
    assert report["warnings"] == []


def test_plugins_json_matches_the_registries(
    builtin_host: kd.PluginHost, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_json(capsys)
    for registry_name, entries in report["registries"].items():
        registry = getattr(kd.registries(), registry_name)
        assert [(e["name"], e["plugin"], e["distribution"]) for e in entries] == [
            (name, provider.plugin, provider.distribution) for name, _, provider in registry.items()
        ]


def test_plugins_attributes_a_directly_registered_plugin(
    capsys: pytest.CaptureFixture[str],
) -> None:
    host = kd.PluginHost(use_entry_points=False, plugins=[("cosine_plugin", CosineCriterionPlugin)])
    with kd.use_host(host):
        report = run_json(capsys)
    assert report["registries"]["criteria"] == [
        {
            "name": "cosine",
            "kind": "criterion",
            "plugin": "cosine_plugin",
            "distribution": "<registered directly>",
            "object": "builtins:object",
        }
    ]


def test_plugins_lists_conflicts_with_both_providers(capsys: pytest.CaptureFixture[str]) -> None:
    host = kd.PluginHost(blocked=(), plugins=[("clash", ClashingPlugin)])
    with kd.use_host(host):
        assert main(["plugins"]) == 0
        out = capsys.readouterr().out
        report = run_json(capsys)
    assert "Conflicts" in out
    conflict_line = next(line for line in out.splitlines() if line.startswith("  criterion"))
    assert conflict_line.split()[:2] == ["criterion", "logits"]
    assert "criteria (kdcore)" in conflict_line and "clash (<registered directly>)" in conflict_line
    assert report["conflicts"] == [
        {
            "registry": "criteria",
            "kind": "criterion",
            "name": "logits",
            "providers": [
                {"plugin": "criteria", "distribution": "kdcore"},
                {"plugin": "clash", "distribution": "<registered directly>"},
            ],
        }
    ]
    assert all(e["name"] != "logits" for e in report["registries"]["criteria"])


def test_plugins_reports_load_problems_instead_of_failing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    host = kd.PluginHost(use_entry_points=False, plugins=[("broken", BrokenPlugin)])
    with kd.use_host(host):
        assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "Problems while loading plugins:" in out
    assert "'broken'" in out and "kdcore_register_balancers" in out and "boom" in out


def test_plugins_lists_disabled_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    with kd.use_host(kd.PluginHost(blocked=("balancers",))):
        assert main(["plugins"]) == 0
        out = capsys.readouterr().out
        report = run_json(capsys)
    assert "Disabled plugins (KDCORE_DISABLE_PLUGINS): balancers" in out
    assert report["disabled"] == ["balancers"]
    assert report["registries"]["balancers"] == []


def test_plugins_verbose_shows_registered_objects(
    builtin_host: kd.PluginHost, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["plugins", "--verbose"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["KIND", "NAME", "PLUGIN", "DISTRIBUTION", "OBJECT"]
    assert "kdcore._distillation_modes:DistillationMode instance" in out


def test_no_subcommand_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "plugins" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugns"]) == 2
    assert "invalid choice: 'plugns'" in capsys.readouterr().err


def test_help_returns_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--help"]) == 0
    assert "KDCORE_DISABLE_PLUGINS" in capsys.readouterr().out


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kdcore {kd.__version__}"


def test_kdcore_errors_become_a_message_and_exit_status_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(args: Any) -> int:
        raise kd.ConfigError("bad value", path="kd_loss.criterion")

    monkeypatch.setattr(cli, "_run_plugins", refuse)
    assert main(["plugins"]) == 1
    assert capsys.readouterr().err.strip() == "kdcore plugins: error: kd_loss.criterion: bad value"


def test_python_dash_m_kdcore_runs_the_cli() -> None:
    env = {**os.environ, "KDCORE_DISABLE_PLUGINS": ""}
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "kdcore", "plugins", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    names = [e["name"] for e in json.loads(result.stdout)["registries"]["criteria"]]
    assert "logits" in names
