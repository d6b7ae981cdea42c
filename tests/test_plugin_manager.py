"""Plugin discovery and registration, each test with a fresh host.

Entry points are tested without installs: each test writes a ``*.dist-info`` folder with an
``entry_points.txt`` into a temporary folder and points the host's ``search_path`` at it.
"""

from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import kdcore as kd
from kdcore import PluginHost, PluginWarning
from kdcore.plugin import Provider, Registry


def make_distribution(root: Path, dist: str, plugins: dict[str, str]) -> None:
    """A fake installed distribution ``dist`` whose entry points ``name = module`` carry code."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = ["[kdcore]"]
    for name, source in plugins.items():
        module = f"{dist.replace('-', '_')}_{name}"
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        lines.append(f"{name} = {module}")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


COSINE = """
    import kdcore
    from torch import nn

    class CosineLoss(nn.Module):
        def forward(self, s, t):
            return 1 - nn.functional.cosine_similarity(s, t).mean()

    @kdcore.hookimpl
    def kdcore_register_criteria(registry):
        registry.add("cosine", CosineLoss)
"""


@pytest.fixture
def plugin_root(tmp_path: Path) -> Any:
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("acme") or m.startswith("other")]:
        del sys.modules[name]


def host_for(root: Path, **kwargs: Any) -> PluginHost:
    return PluginHost(search_path=[str(root)], blocked=kwargs.pop("blocked", ()), **kwargs)


def test_import_kdcore_loads_no_plugin() -> None:
    import subprocess

    code = "import sys, kdcore; print(any(m.startswith('kdcore_builtins') for m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_builtin_names_are_registered_through_entry_points() -> None:
    registries = PluginHost(blocked=()).registries
    assert {"logits", "mft", "mgd", "mse"} <= set(registries.criteria.names())
    assert "static" in registries.balancers.names()
    assert "callable" in registries.teacher_loaders.names()
    assert {"kd_loss", "layerwise_kd", "export_student"} <= set(registries.modes.names())
    assert registries.criteria.provider("logits") == Provider("criteria", "kdcore")


def test_public_classes_resolve_through_the_registry() -> None:
    registries = kd.registries()
    assert kd.LogitsDistillationLoss is registries.criteria.get("logits")
    assert kd.StaticLossBalancer is registries.balancers.get("static")
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        kd.Nope  # noqa: B018


def test_third_party_entry_point_is_found(plugin_root: Path) -> None:
    make_distribution(plugin_root, "acme-kd", {"cosine": COSINE})
    registries = host_for(plugin_root).registries
    assert registries.criteria.names() == ["cosine"]
    assert registries.criteria.provider("cosine") == Provider("cosine", "acme-kd")


def test_plugin_with_fewer_hook_arguments_is_accepted(plugin_root: Path) -> None:
    source = """
        import kdcore
        calls = []

        @kdcore.hookimpl
        def kdcore_register_modes():
            calls.append(1)
    """
    make_distribution(plugin_root, "acme-kd", {"quiet": source})
    host_for(plugin_root).registries  # noqa: B018
    assert sys.modules["acme_kd_quiet"].calls == [1]


def test_name_registered_by_two_plugins_is_an_error_naming_both(plugin_root: Path) -> None:
    make_distribution(plugin_root, "acme-kd", {"cosine": COSINE})
    make_distribution(plugin_root, "other-kd", {"cos": COSINE})
    with pytest.warns(PluginWarning, match="'cosine' is registered by plugin 'cosine'"):
        registries = host_for(plugin_root).registries
    with pytest.raises(kd.PluginConflictError) as info:
        registries.criteria.get("cosine")
    message = str(info.value)
    assert "'acme-kd'" in message and "'other-kd'" in message
    assert "KDCORE_DISABLE_PLUGINS" in message


def test_same_plugin_registering_a_name_twice_is_reported(plugin_root: Path) -> None:
    source = COSINE + '        registry.add("cosine", CosineLoss)\n'
    make_distribution(plugin_root, "acme-kd", {"twice": source})
    with pytest.warns(PluginWarning, match="registered the criterion 'cosine' twice"):
        host_for(plugin_root).registries  # noqa: B018


def test_unknown_name_lists_registered_names_and_suggests(plugin_root: Path) -> None:
    make_distribution(plugin_root, "acme-kd", {"cosine": COSINE})
    registries = host_for(plugin_root).registries
    with pytest.raises(
        kd.UnknownPluginError,
        match="unknown criterion 'cosin'; registered: cosine; did you mean 'cosine'",
    ):
        registries.criteria.get("cosin")


def test_plugin_failing_to_import_warns_and_others_still_load(plugin_root: Path) -> None:
    make_distribution(plugin_root, "acme-kd", {"broken": "raise RuntimeError('boom')\n"})
    make_distribution(plugin_root, "other-kd", {"cosine": COSINE})
    with pytest.warns(
        PluginWarning, match=r"plugin 'broken' \(distribution 'acme-kd'\) failed to import.*boom"
    ):
        registries = host_for(plugin_root).registries
    assert registries.criteria.names() == ["cosine"]


def test_plugin_whose_hook_raises_warns_and_others_still_load(plugin_root: Path) -> None:
    source = """
        import kdcore

        @kdcore.hookimpl
        def kdcore_register_criteria(registry):
            raise ValueError("bad registration")
    """
    make_distribution(plugin_root, "acme-kd", {"raises": source})
    make_distribution(plugin_root, "other-kd", {"cosine": COSINE})
    with pytest.warns(
        PluginWarning,
        match=r"'raises' \(distribution 'acme-kd'\) raised in kdcore_register_criteria",
    ):
        registries = host_for(plugin_root).registries
    assert registries.criteria.names() == ["cosine"]


def test_misspelled_hook_is_reported(plugin_root: Path) -> None:
    source = """
        import kdcore

        @kdcore.hookimpl
        def kdcore_register_criterion(registry):
            pass
    """
    make_distribution(plugin_root, "acme-kd", {"typo": source})
    with pytest.warns(PluginWarning, match="unknown hook 'kdcore_register_criterion'"):
        host_for(plugin_root).registries  # noqa: B018


def test_hook_with_a_wrong_signature_is_refused(plugin_root: Path) -> None:
    source = """
        import kdcore

        @kdcore.hookimpl
        def kdcore_register_criteria(registry, extra):
            pass
    """
    make_distribution(plugin_root, "acme-kd", {"wrong": source})
    with pytest.warns(PluginWarning, match=r"'wrong' \(distribution 'acme-kd'\) was not loaded"):
        host_for(plugin_root).registries  # noqa: B018


def test_disable_plugins_environment_variable_blocks_entry_points(
    plugin_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_distribution(plugin_root, "acme-kd", {"cosine": COSINE, "broken": "raise ImportError\n"})
    monkeypatch.setenv("KDCORE_DISABLE_PLUGINS", "broken, cosine")
    registries = PluginHost(search_path=[str(plugin_root)]).registries  # no warning: not imported
    assert registries.criteria.names() == []
    assert "acme_kd_broken" not in sys.modules


def test_plugins_load_lazily_and_once(plugin_root: Path) -> None:
    make_distribution(plugin_root, "acme-kd", {"cosine": COSINE})
    host = host_for(plugin_root)
    assert "acme_kd_cosine" not in sys.modules
    first = host.registries
    assert "acme_kd_cosine" in sys.modules
    assert host.registries is first


def test_direct_registration_and_use_host(batch: Any) -> None:
    from torch import nn

    class Plugin:
        @staticmethod
        @kd.hookimpl
        def kdcore_register_criteria(registry: Registry[Any]) -> None:
            registry.add("l1", nn.L1Loss)

    host = PluginHost(plugins=[("mine", Plugin())], blocked=())
    with kd.use_host(host):
        assert kd.registries().criteria.provider("l1") == Provider("mine", "<registered directly>")
        assert "logits" in kd.registries().criteria  # entry points still load
    assert "l1" not in kd.registries().criteria


def test_registering_after_loading_is_refused() -> None:
    host = PluginHost(blocked=())
    host.registries  # noqa: B018
    with pytest.raises(kd.PluginError, match="already loaded"):
        host.register(object(), "late")


def test_loading_order_is_deterministic(plugin_root: Path) -> None:
    make_distribution(plugin_root, "zeta-kd", {"a": COSINE.replace('"cosine"', '"z"')})
    make_distribution(plugin_root, "acme-kd", {"b": COSINE.replace('"cosine"', '"a"')})
    host = host_for(plugin_root)
    host.registries  # noqa: B018
    assert list(host.providers) == ["kdcore:core", "acme-kd:b", "zeta-kd:a"]


def test_a_load_that_failed_fails_the_same_way_when_retried() -> None:
    class Clash:
        @kd.hookimpl
        def kdcore_register_criteria(self, registry: Any) -> None:
            registry.add("mse", nn.MSELoss)  # a built-in name: a conflict warning

    host = PluginHost(plugins=[("clash", Clash())], blocked=())
    for _ in range(2):  # the warning made an error, as writing-a-plugin.md suggests
        with warnings.catch_warnings():
            warnings.simplefilter("error", PluginWarning)
            with pytest.raises(PluginWarning, match="'mse' is registered by"):
                host.registries  # noqa: B018 (the load is what is tested)
