"""The core's modes: they need no built-in plugin, ``kd.export`` asks the model, and a third
party can write the same distillation mode from the public names (tests/third_party_mode)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kdcore as kd
from tests.conftest import TinyNet, make_teacher

THIRD_PARTY_MODE = Path(__file__).parent / "third_party_mode"
# Every entry point of kdcore's own distribution ("modes" only while an older install lists it).
BUILTIN_PLUGINS = [
    "criteria",
    "divergences",
    "feature_criteria",
    "balancers",
    "teacher_loaders",
    "checkpoint_backends",
]


def fake_distribution(root: Path, dist: str, entry_points: dict[str, str]) -> None:
    """An installed-looking ``dist`` (its dist-info only) with ``kdcore`` entry points."""
    info = root / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = ["[kdcore]", *(f"{name} = {module}" for name, module in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def third_party_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[kd.PluginHost]:
    """The built-ins and ``kdcore-example-mode``, found through its entry point, not installed."""
    fake_distribution(tmp_path, "kdcore-example-mode", {"example_mode": "kdcore_example_mode"})
    monkeypatch.syspath_prepend(str(THIRD_PARTY_MODE))
    host = kd.PluginHost(search_path=[str(tmp_path), *sys.path], blocked=())
    with kd.use_host(host):
        yield host
    sys.modules.pop("kdcore_example_mode", None)


def distil(student: nn.Module, mode: str, **config: Any) -> kd.DistillationModel:
    config = {"teacher_model": make_teacher(), "criterion": nn.MSELoss(), **config}
    model = kd.convert(student, [(mode, config)])
    assert isinstance(model, kd.DistillationModel)
    return model


# ------------------------------------------------------------ no built-in plugin needed
@pytest.mark.parametrize("blocked", [*BUILTIN_PLUGINS, ",".join(BUILTIN_PLUGINS)])
def test_convert_and_export_work_with_builtin_plugins_disabled(
    blocked: str, batch: torch.Tensor
) -> None:
    with kd.use_host(kd.PluginHost(blocked=blocked.split(","))):
        student = TinyNet()
        model = distil(student, "kd_loss")
        model(batch)
        assert model.compute_kd_loss().dim() == 0
        exported = kd.export(model)
    assert exported is student and type(exported) is TinyNet


def test_kdcore_disable_plugins_blocking_every_builtin_plugin_keeps_convert_and_export() -> None:
    code = """
import torch, kdcore as kd
from torch import nn
student = nn.Linear(4, 3)
model = kd.convert(student, [("kd_loss", {"teacher_model": nn.Linear(4, 3),
                                          "criterion": nn.MSELoss()})])
model(torch.randn(2, 4))
model.compute_kd_loss().backward()
assert kd.export(model) is student and type(student) is nn.Linear
print(sorted(kd.registries().criteria.names()), kd.registries().modes.names())
"""
    env = {**os.environ, "KDCORE_DISABLE_PLUGINS": ",".join(BUILTIN_PLUGINS)}
    result = subprocess.run(
        [sys.executable, "-W", "error::kdcore.PluginWarning", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "[] ['export_student', 'kd_loss', 'layerwise_kd']"


def test_a_missing_criterion_names_the_disabled_plugin() -> None:
    with (
        kd.use_host(kd.PluginHost(blocked=["criteria"])),
        pytest.raises(kd.UnknownPluginError) as caught,
    ):
        distil(TinyNet(), "kd_loss", criterion={"name": "logits"})
    assert "unknown criterion 'logits'" in str(caught.value)
    assert "disabled by KDCORE_DISABLE_PLUGINS, which may provide it: plugin 'criteria'" in str(
        caught.value
    )


def test_a_plugin_provided_name_says_which_plugin_is_disabled() -> None:
    with (
        kd.use_host(kd.PluginHost(blocked=["balancers"])),
        pytest.raises(AttributeError, match="plugin 'balancers' \\(distribution 'kdcore'\\)"),
    ):
        kd.StaticLossBalancer  # noqa: B018


def test_export_does_not_look_up_a_mode(batch: torch.Tensor) -> None:
    class Clash:
        @staticmethod
        @kd.hookimpl
        def kdcore_register_modes(registry: Any) -> None:
            registry.add("export_student", object())

    with (
        pytest.warns(kd.PluginWarning, match="'export_student' is registered by plugin 'core'"),
        kd.use_host(kd.PluginHost(blocked=(), plugins=[("clash", Clash)])) as host,
    ):
        host.registries  # noqa: B018
    with kd.use_host(host):
        student = TinyNet()
        assert kd.export(distil(student, "kd_loss")) is student
    assert type(student) is TinyNet


def test_the_core_modes_cannot_be_disabled() -> None:
    modes = kd.PluginHost(blocked=["core", "modes"]).registries.modes
    assert {"kd_loss", "layerwise_kd", "export_student"} <= set(modes.names())
    assert modes.provider("kd_loss") == kd.registries().modes.provider("kd_loss")


def test_layerwise_distillation_model_is_a_core_class() -> None:
    assert kd.LayerwiseDistillationModel.__module__ == "kdcore._layerwise"
    assert issubclass(kd.LayerwiseDistillationModel, kd.DistillationModel)


# ------------------------------------------------------------ the same tests for a third party
MODES = ["kd_loss", "example_kd"]


@pytest.mark.parametrize("mode", MODES)
def test_mode_distils_the_student(
    third_party_host: kd.PluginHost, mode: str, batch: torch.Tensor
) -> None:
    student, teacher = TinyNet(), make_teacher()
    model = distil(student, mode, teacher_model=teacher)
    output = model(batch)
    loss = model.compute_kd_loss()
    assert torch.allclose(loss, nn.functional.mse_loss(output, teacher(batch)))
    loss.backward()
    assert student.fc1.weight.grad is not None and teacher.fc1.weight.grad is None


@pytest.mark.parametrize("mode", MODES)
def test_mode_is_exported_back_to_the_student_class(
    third_party_host: kd.PluginHost, mode: str
) -> None:
    student = TinyNet()
    keys = set(student.state_dict())
    exported = kd.export(distil(student, mode))
    assert exported is student and type(exported) is TinyNet
    assert set(exported.state_dict()) == keys


@pytest.mark.parametrize("mode", MODES)
def test_mode_refuses_a_distillation_model(third_party_host: kd.PluginHost, mode: str) -> None:
    model = distil(TinyNet(), mode)
    with pytest.raises(kd.ConfigError, match=f"{mode}: the model is already a distillation"):
        distil(model, mode)


@pytest.mark.parametrize("mode", MODES)
def test_mode_leaves_the_student_untouched_on_a_bad_layer(
    third_party_host: kd.PluginHost, mode: str
) -> None:
    student = TinyNet()
    with pytest.raises(kd.UnknownLayerError, match="fc3"):
        distil(student, mode, criterion={("fc3", "fc2"): nn.MSELoss()})
    assert type(student) is TinyNet and list(student._modules) == ["fc1", "fc2"]


@pytest.mark.parametrize("mode", MODES)
def test_mode_is_undone_when_a_later_step_fails(third_party_host: kd.PluginHost, mode: str) -> None:
    student = TinyNet()
    config = {"teacher_model": make_teacher(), "criterion": nn.MSELoss()}
    with pytest.raises(kd.ConfigError, match="already a distillation model"):
        kd.convert(student, [(mode, config), ("kd_loss", config)])
    assert type(student) is TinyNet and list(student._modules) == ["fc1", "fc2"]


@pytest.mark.parametrize("mode", MODES)
def test_mode_is_recorded_and_restored_by_name(
    third_party_host: kd.PluginHost, mode: str, batch: torch.Tensor, tmp_path: Path
) -> None:
    model = distil(TinyNet(), mode, teacher_model=make_teacher, criterion={"name": "mse"})
    assert [record.name for record in model.mode_records] == [mode]
    kd.save(model, tmp_path / "ckpt")
    restored = kd.restore(TinyNet(), tmp_path / "ckpt")
    assert type(restored) is type(model) and [r.name for r in restored.mode_records] == [mode]
    assert torch.equal(restored(batch), model(batch))


@pytest.mark.parametrize("mode", MODES)
def test_mode_is_checked_and_described(third_party_host: kd.PluginHost, mode: str) -> None:
    config = {"teacher_model": make_teacher, "criterion": {("fc1", "fc9"): {"name": "mse"}}}
    with pytest.raises(kd.UnknownLayerError, match="fc1"):
        kd.check([(mode, config)], student=nn.Linear(4, 3))
    lines = kd.check([(mode, {**config, "criterion": {"name": "mse"}})])
    assert lines[0] == f"{mode}:" and "MSELoss_0" in lines[2]


def test_the_third_party_mode_is_attributed_to_its_distribution(
    third_party_host: kd.PluginHost,
) -> None:
    provider = kd.registries().modes.provider("example_kd")
    assert (provider.plugin, provider.distribution) == ("example_mode", "kdcore-example-mode")


def test_the_third_party_mode_uses_only_public_kdcore_names() -> None:
    source = (THIRD_PARTY_MODE / "kdcore_example_mode.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import", "from"))]
    assert (
        imports
        == textwrap.dedent(
            """\
        from __future__ import annotations
        from typing import Any
        from torch import nn
        import kdcore as kd
        from kdcore.plugin import describe_distillation, plan_distillation, record_distillation"""
        ).splitlines()
    )
