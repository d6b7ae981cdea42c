"""Configs as data: TOML, JSON and YAML files, checked before anything is built."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kdcore as kd
from tests.conftest import TinyNet

TOML = """
[kd_loss]
teacher_model = { name = "callable", target = "tests.conftest:make_teacher" }
loss_balancer = { name = "static", kd_loss_weight = [0.2, 0.2] }
[[kd_loss.criterion]]
student = ""
teacher = ""
loss = { name = "logits", temperature = 3.0 }
[[kd_loss.criterion]]
student = "fc2"
teacher = "fc2"
loss = { name = "mse" }
"""

DATA = {
    "kd_loss": {
        "teacher_model": {"name": "callable", "target": "tests.conftest:make_teacher"},
        "loss_balancer": {"name": "static", "kd_loss_weight": [0.2, 0.2]},
        "criterion": [
            {"student": "", "teacher": "", "loss": {"name": "logits", "temperature": 3.0}},
            {"student": "fc2", "teacher": "fc2", "loss": {"name": "mse"}},
        ],
    }
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_toml_json_and_yaml_give_the_same_modes(tmp_path: Path) -> None:
    import yaml

    toml_modes = kd.load_config(write(tmp_path, "c.toml", TOML))
    json_modes = kd.load_config(write(tmp_path, "c.json", json.dumps(DATA)))
    yaml_modes = kd.load_config(write(tmp_path, "c.yaml", yaml.safe_dump(DATA)))
    assert toml_modes == json_modes == yaml_modes == [("kd_loss", DATA["kd_loss"])]


def test_a_loaded_config_converts_and_trains(tmp_path: Path, batch: torch.Tensor) -> None:
    model = kd.convert(TinyNet(), kd.load_config(write(tmp_path, "c.toml", TOML)))
    output = model(batch)
    losses = model.compute_kd_loss(student_loss=output.sum(), skip_balancer=True)
    assert list(losses) == ["student_loss", "LogitsDistillationLoss_0", "MSELoss_1"]
    assert model.loss_balancer.weights == [0.2, 0.2]


def test_typo_in_a_plugin_argument_names_file_path_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", TOML.replace("temperature", "temprature"))
    with pytest.raises(kd.ConfigError) as info:
        kd.load_config(path)
    assert str(info.value).startswith(
        f"{path}: kd_loss.criterion[0].loss.temprature: unknown key; did you mean 'temperature'?"
    )


def test_unknown_top_level_key_of_a_mode(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", TOML.replace("loss_balancer =", "los_balancer ="))
    with pytest.raises(
        kd.ConfigError, match=r"kd_loss\.los_balancer: unknown key; did you mean 'loss_balancer'"
    ):
        kd.load_config(path)


def test_unknown_mode_table(tmp_path: Path) -> None:
    path = write(
        tmp_path, "c.toml", TOML.replace("[kd_loss]", "[kd_los]").replace("kd_loss.", "kd_los.")
    )
    with pytest.raises(
        kd.UnknownPluginError, match="unknown mode 'kd_los'.*did you mean 'kd_loss'"
    ):
        kd.load_config(path)


def test_wrong_type_is_named_with_its_path(tmp_path: Path) -> None:
    text = TOML.replace("[kd_loss]\n", '[kd_loss]\nexpose_minimal_state_dict = "yes"\n')
    path = write(tmp_path, "c.toml", text)
    with pytest.raises(
        kd.ConfigTypeError, match=r"kd_loss\.expose_minimal_state_dict: expected bool, got str"
    ):
        kd.load_config(path)


def test_unknown_teacher_loader_and_missing_target(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", TOML.replace('name = "callable"', 'name = "transformers"'))
    # As if kdcore-transformers were not installed (the test command installs it).
    without_plugin = kd.PluginHost(blocked=["transformers"])
    with (
        kd.use_host(without_plugin),
        pytest.raises(
            kd.UnknownPluginError,
            match="unknown teacher loader 'transformers'.*pip install kdcore-transformers",
        ),
    ):
        kd.load_config(path)
    path = write(tmp_path, "d.toml", TOML.replace("make_teacher", "make_teachr"))
    with pytest.raises(
        kd.ConfigError, match=r"'make_teachr' not found; did you mean 'make_teacher'"
    ):
        kd.load_config(path)


def test_checking_does_not_build_the_teacher(tmp_path: Path) -> None:
    module = tmp_path / "exploding_teacher.py"
    module.write_text("def build():\n    raise RuntimeError('built')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        path = write(
            tmp_path,
            "c.toml",
            TOML.replace("tests.conftest:make_teacher", "exploding_teacher:build"),
        )
        assert kd.load_config(path)[0][0] == "kd_loss"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("exploding_teacher", None)


def test_check_against_a_student_finds_bad_layer_names() -> None:
    modes = [
        (
            "kd_loss",
            {
                **DATA["kd_loss"],
                "criterion": [{"student": "fc_1", "teacher": "fc1", "loss": {"name": "mse"}}],
                "loss_balancer": None,
            },
        )
    ]
    with pytest.raises(
        kd.UnknownLayerError,
        match=r"criterion\[0\]\.student: the student \(TinyNet\) has no layer 'fc_1'; did you mean 'fc1'",
    ):
        kd.check(modes, student=TinyNet())


def test_check_describes_what_would_be_built() -> None:
    lines = kd.check([("kd_loss", DATA["kd_loss"])], student=TinyNet())
    text = "\n".join(lines)
    assert "teacher loader 'callable'" in text
    assert "LogitsDistillationLoss_0: student '<output>' <- teacher '<output>'" in text
    assert "MSELoss_1: student 'fc2' <- teacher 'fc2'" in text
    assert "StaticLossBalancer(kd_loss_weight=[0.2, 0.2])" in text


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(kd.ConfigError, match="not valid TOML"):
        kd.load_config(write(tmp_path, "c.toml", "[kd_loss\n"))
    with pytest.raises(kd.ConfigError, match="not valid JSON"):
        kd.load_config(write(tmp_path, "c.json", "{"))
    with pytest.raises(kd.ConfigError, match="unknown config format; use one of .toml"):
        kd.load_config(write(tmp_path, "c.ini", ""))
    with pytest.raises(kd.ConfigError, match="cannot read the config"):
        kd.load_config(tmp_path / "missing.toml")
    with pytest.raises(kd.ConfigError, match="no mode tables"):
        kd.load_config(write(tmp_path, "e.json", "{}"))
    with pytest.raises(kd.ConfigTypeError, match="top-level 'kd_loss' must be a table"):
        kd.load_config(write(tmp_path, "f.json", '{"kd_loss": 3}'))


def test_yaml_never_constructs_python_objects(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "kd_loss: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(kd.ConfigError, match="not valid YAML"):
        kd.load_config(path)


def test_python_objects_and_data_mix_in_one_config(batch: torch.Tensor) -> None:
    config = {**DATA["kd_loss"], "teacher_model": TinyNet(width=16)}
    config["criterion"] = [
        *config["criterion"][:1],
        {"student": "fc2", "teacher": "fc2", "loss": kd.MSELoss()},
    ]
    model = kd.convert(TinyNet(), [("kd_loss", config)])
    model(batch)
    assert model.compute_kd_loss(student_loss=torch.tensor(0.0)).dim() == 0


def test_check_passes_the_real_loss_keys_to_the_balancer() -> None:
    config = {
        **DATA["kd_loss"],
        "loss_balancer": {"name": "logits_magnitude", "logits_loss": "LogitsDistillationLoss_0"},
    }
    assert any("LogitsMagnitudeBalancer" in line for line in kd.check([("kd_loss", config)]))
