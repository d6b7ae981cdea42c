"""Hostile configs: `kdcore check` on a file you did not write, alias bombs, numbers out of
range and keys given twice. Each is refused (or checked) quickly with a kdcore error that names
the file and the config path, and a static check imports and calls nothing the file names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import kdcore as kd
from kdcore.cli import main

# The bombs below expand to 10**30 values or more: without a guard they never finish. The bound
# is far above a guarded refusal (milliseconds) so that a loaded machine does not fail it.
UNBOUNDED_WORK_S = 30.0

# A module that leaves a sentinel file when it is imported: the code a config could make run.
EVIL_MODULE = """
from pathlib import Path

Path(__file__).with_name("imported.sentinel").write_text("ran")


def build_teacher():
    raise AssertionError("called")


class Loss:
    def __init__(self, strength=1.0):
        raise ValueError("Loss was called")
"""

EVIL_CONFIG = """
[kd_loss]
teacher_model = { name = "callable", target = "evil_factory:build_teacher" }
loss_balancer = { name = "static", kd_loss_weight = [0.5, 0.5] }
[[kd_loss.criterion]]
student = ""
teacher = ""
loss = { name = "logits", temperature = 2.0 }
[[kd_loss.criterion]]
student = "fc2"
teacher = "fc2"
loss = { name = "evil_factory:Loss", strength = 2.0 }
"""


@pytest.fixture
def evil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with ``evil_factory.py`` on ``sys.path``; returns the sentinel's path."""
    (tmp_path / "evil_factory.py").write_text(EVIL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "imported.sentinel"
    sys.modules.pop("evil_factory", None)


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_check_by_default_imports_and_calls_nothing_the_config_names(tmp_path: Path) -> None:
    (tmp_path / "evil_factory.py").write_text(EVIL_MODULE)
    config = _write(tmp_path, "evil.toml", EVIL_CONFIG)
    script = textwrap.dedent(
        f"""
        import sys
        from kdcore.cli import main
        from kdcore import registries
        registries()  # the installed plugins load as for any command
        before = set(sys.modules)
        status = main(["check", {str(config)!r}])
        new = sorted(set(sys.modules) - before)
        foreign = [n for n in new if {str(tmp_path)!r} in str(getattr(sys.modules[n], "__file__", ""))]
        print("STATUS", status, "FOREIGN", foreign, "EVIL", "evil_factory" in sys.modules)
        """
    )
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *inherited]))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "STATUS 0 FOREIGN [] EVIL False" in result.stdout, result.stdout + result.stderr
    assert not (tmp_path / "imported.sentinel").exists()
    assert (
        "not imported, not called: teacher factory 'evil_factory:build_teacher', "
        "criterion class 'evil_factory:Loss'" in result.stdout
    )
    assert (
        "Loss_1: student 'fc2' <- teacher 'fc2': criterion class 'evil_factory:Loss' "
        "(not imported)" in result.stdout
    )
    assert "static check: nothing the config names was imported or called" in result.stdout


def test_check_with_import_says_it_runs_the_config_code(
    evil: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(tmp_path, "evil.toml", EVIL_CONFIG)
    assert main(["check", str(config), "--import"]) == 1  # Loss() raises: it was called
    out, err = capsys.readouterr()
    assert "this imports the modules the config names and calls the classes it names" in out
    assert "criterion 'evil_factory:Loss' refused its arguments: Loss was called" in err
    assert evil.exists()
    help_text = subprocess.run(
        [sys.executable, "-m", "kdcore", "check", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "--import" in help_text and "their code runs" in help_text.replace("\n", " ")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("temperature = 2.0", "temprature = 2.0"),
            "kd_loss.criterion[0].loss.temprature: unknown key; did you mean 'temperature'?",
        ),
        (("[0.5, 0.5]", "[0.5]"), "kd_loss.loss_balancer: kd_loss_weight=[0.5] gives 1 weight"),
        (
            ('"evil_factory:Loss"', '"evil factory:Loss"'),
            "kd_loss.criterion[1].loss.name: criterion class must look like 'package.module:name'",
        ),
        (
            (
                'target = "evil_factory:build_teacher"',
                'target = "evil_factory:build_teacher", x = 1',
            ),
            "kd_loss.teacher_model.x: unknown key (teacher loader 'callable' takes: target, args, "
            "kwargs)",
        ),
        (('name = "logits"', 'name = "logit"'), "unknown criterion 'logit'"),
    ],
)
def test_the_static_check_still_finds_mistakes_without_importing(
    evil: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: tuple[str, str],
    message: str,
) -> None:
    config = _write(tmp_path, "evil.toml", EVIL_CONFIG.replace(*change))
    assert main(["check", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"kdcore check: error: {config}: " in err
    assert message in err
    assert "evil_factory" not in sys.modules and not evil.exists()


def test_kd_check_without_imports_lists_the_references(evil: Path) -> None:
    modes = [
        (
            "kd_loss",
            {
                "teacher_model": {"name": "callable", "target": "evil_factory:build_teacher"},
                "criterion": {"name": "evil_factory:Loss"},
            },
        )
    ]
    lines = kd.check(modes, imports=False)
    assert lines[-1] == (
        "not imported, not called: teacher factory 'evil_factory:build_teacher', "
        "criterion class 'evil_factory:Loss'"
    )
    assert "evil_factory" not in sys.modules and not evil.exists()
    with pytest.raises(kd.ConfigError, match="evil_factory"):
        kd.load_config(_write(evil.parent, "evil.toml", EVIL_CONFIG))  # imports by default
    assert evil.exists()


# ---------------------------------------------------------------------------- alias bombs

# The classic "billion laughs", where kd.check's description used to repr() it: 10**9 strings.
BILLION_LAUGHS = """\
kd_loss:
  criterion: {name: mse}
  teacher_model:
    name: callable
    target: "tests.conftest:make_teacher"
    kwargs:
      a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
      b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
      c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
      d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
      e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
      f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
      g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
      h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
      i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("laughs.yaml", BILLION_LAUGHS, r"aliases expand the file by [\d,]+ values"),
        (
            "merge.yaml",
            "a0: &a0 {x: 1, y: 2}\n"
            + "".join(
                f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}], k{i}: 1}}\n" for i in range(1, 40)
            )
            + "kd_loss: *a39\n",
            r"aliases expand the file by [\d,]+ values",
        ),
        ("loop.yaml", "kd_loss: &a {criterion: [*a]}\n", r"kd_loss.criterion\[0\]: a YAML alias"),
    ],
)
def test_yaml_alias_bombs_are_refused_quickly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, match: str
) -> None:
    path = _write(tmp_path, name, text)
    start = time.perf_counter()
    with pytest.raises(kd.ConfigError, match=match) as info:
        kd.load_config(path)
    assert time.perf_counter() - start < UNBOUNDED_WORK_S
    assert str(info.value).startswith(f"{path}: ")
    start = time.perf_counter()
    assert main(["check", str(path)]) == 1
    assert time.perf_counter() - start < UNBOUNDED_WORK_S
    assert len(capsys.readouterr().err) < 500


def test_a_few_aliases_and_merge_keys_are_still_fine(tmp_path: Path) -> None:
    text = """\
    kd_loss:
      teacher_model: {name: callable, target: "tests.conftest:make_teacher"}
      loss_balancer: {name: static, kd_loss_weight: [0.25, 0.25, 0.25]}
      criterion:
        - {student: fc1, teacher: fc1, loss: &mse {name: mse}}
        - {student: fc2, teacher: fc2, loss: *mse}
        - {student: "", teacher: "", loss: {<<: *mse, reduction: sum}}
    """
    ((_, table),) = kd.load_config(_write(tmp_path, "anchors.yaml", text))
    assert table["criterion"][1]["loss"] == {"name": "mse"}
    assert table["criterion"][2]["loss"] == {"name": "mse", "reduction": "sum"}


def _shared(levels: int) -> list[Any]:
    """A list that repr() would print as 10**levels items: a bomb built in Python."""
    value: list[Any] = ["lol"]
    for _ in range(levels):
        value = [value] * 10
    return value


BASE = {
    "teacher_model": {"name": "callable", "target": "tests.conftest:make_teacher"},
    "criterion": {"name": "mse"},
}
PLACES = [
    ({"expose_minimal_state_dict": "BOMB"}, "kd_loss.expose_minimal_state_dict: "),
    ({"criterion": {"name": "logits", "temperature": "BOMB"}}, "kd_loss.criterion: "),
    ({"teacher_model": ("tests.conftest:make_teacher", "BOMB")}, "kd_loss.teacher_model: "),
    ({"loss_balancer": {"name": "static", "kd_loss_weight": "BOMB"}}, "kd_loss.loss_balancer: "),
]


def _with(config: dict[str, Any], bomb: Any) -> dict[str, Any]:
    def put(value: Any) -> Any:
        if value == "BOMB":
            return bomb
        if isinstance(value, dict):
            return {key: put(item) for key, item in value.items()}
        if isinstance(value, tuple):
            return tuple(put(item) for item in value)
        return value

    return {**BASE, **put(config)}


@pytest.mark.parametrize(("config", "where"), PLACES)
def test_python_configs_that_expand_to_billions_of_values_are_refused_quickly(
    config: dict[str, Any], where: str
) -> None:
    start = time.perf_counter()
    with pytest.raises(kd.ConfigError) as info:
        kd.check([("kd_loss", _with(config, _shared(30)))])
    assert time.perf_counter() - start < UNBOUNDED_WORK_S
    assert str(info.value) == (
        "kd_loss: holds more than 1,000,000 values (a part shared by several places counts "
        "each time)"
    )


@pytest.mark.parametrize(("config", "where"), PLACES)
def test_large_values_in_messages_are_cut(config: dict[str, Any], where: str) -> None:
    with pytest.raises(kd.ConfigError) as info:
        kd.check([("kd_loss", _with(config, _shared(5)))])  # 100,000 values: allowed
    assert str(info.value).startswith(where)
    assert len(str(info.value)) < 1200


def test_large_values_in_the_description_are_cut() -> None:
    teacher = {"name": "callable", "target": "tests.conftest:make_teacher", "kwargs": _shared(5)}
    lines = kd.check([("kd_loss", {"teacher_model": teacher, "criterion": {"name": "mse"}})])
    assert all(len(line) < 300 for line in lines)
    for bad in ([("export_student", {"x": _shared(5)})], [_shared(5)]):
        with pytest.raises(kd.ConfigError) as info:
            kd.check(bad)
        assert len(str(info.value)) < 300


def test_a_huge_legal_list_from_a_json_file_gives_a_short_message(tmp_path: Path) -> None:
    data = {"kd_loss": {**BASE, "expose_minimal_state_dict": list(range(500_000))}}
    path = _write(tmp_path, "big.json", json.dumps(data))
    with pytest.raises(kd.ConfigTypeError, match="kd_loss.expose_minimal_state_dict") as info:
        kd.load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert len(str(info.value)) < 300


# ------------------------------------------------------------------------- numbers and keys

CONFIGS = {
    "json": '{"kd_loss": {"teacher_model": {"name": "callable", "target": '
    '"tests.conftest:make_teacher"}, "criterion": [{"student": "", "teacher": "", '
    '"loss": {"name": "logits", "temperature": NUMBER}}]}}',
    "toml": '[kd_loss]\nteacher_model = { name = "callable", target = '
    '"tests.conftest:make_teacher" }\n[[kd_loss.criterion]]\nstudent = ""\nteacher = ""\n'
    'loss = { name = "logits", temperature = NUMBER }\n',
    "yaml": "kd_loss:\n  teacher_model: {name: callable, target: 'tests.conftest:make_teacher'}\n"
    "  criterion:\n  - {student: '', teacher: '', loss: {name: logits, temperature: NUMBER}}\n",
}
WHERE = "kd_loss.criterion[0].loss.temperature"


@pytest.mark.parametrize("suffix", sorted(CONFIGS))
@pytest.mark.parametrize(
    ("number", "match"),
    [
        ("1.0e+400", r"1.0e\+400 is out of range"),
        ("1" + "0" * 5000, "an integer of .* digits is out of range"),
        ("1" + "0" * 400, "int too large to convert to float"),
        ("-1" + "0" * 5000, "an integer of .* digits is out of range"),
    ],
)
def test_numbers_out_of_range_name_the_file_and_the_path(
    tmp_path: Path, suffix: str, number: str, match: str
) -> None:
    path = _write(tmp_path, f"run.{suffix}", CONFIGS[suffix].replace("NUMBER", number))
    with pytest.raises(kd.ConfigError, match=match) as info:
        kd.load_config(path)
    where = WHERE if "int too large" not in match else WHERE.rpartition(".")[0]
    assert str(info.value).startswith(f"{path}: {where}: "), str(info.value)
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("top.json", '{"kd_loss": {}, "kd_loss": {}}', "kd_loss"),
        (
            "nested.json",
            '{"kd_loss": {"criterion": [{"loss": {"name": "mse", "name": "logits"}}]}}',
            "kd_loss.criterion[0].loss.name",
        ),
        ("top.yaml", "kd_loss: {}\nkd_loss: {}\n", "kd_loss"),
        (
            "nested.yaml",
            "kd_loss:\n  criterion:\n  - loss: {name: mse, name: logits}\n",
            "kd_loss.criterion[0].loss.name",
        ),
    ],
)
def test_keys_given_twice_are_refused(tmp_path: Path, name: str, text: str, where: str) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(kd.ConfigError) as info:
        kd.load_config(path)
    assert str(info.value) == f"{path}: {where}: the key is given twice"
