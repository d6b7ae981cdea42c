"""Generated configs, well-formed or broken in one place: only kdcore's documented config errors
come out (ConfigError, ConfigTypeError, UnknownPluginError, UnknownLayerError), each naming the
path of the bad value."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, example, given, settings

import kdcore as kd
from tests.conftest import TinyNet

DOCUMENTED = (kd.ConfigError, kd.UnknownPluginError, kd.UnknownLayerError)

CRITERIA = [
    {"name": "logits", "temperature": 2.0},
    {"name": "logits"},
    {"name": "mse"},
    {"name": "mse", "reduction": "sum"},
]


@st.composite
def well_formed(draw: st.DrawFn) -> dict[str, Any]:
    """A valid kd_loss config as data (what a config file holds)."""
    layers = draw(
        st.lists(
            st.sampled_from([("", ""), ("fc1", "fc1"), ("fc2", "fc2")]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    criterion = [
        {
            "student": student,
            "teacher": teacher,
            "loss": draw(st.sampled_from(CRITERIA)) if student == "" else {"name": "mse"},
        }
        for student, teacher in layers
    ]
    config: dict[str, Any] = {
        "teacher_model": {"name": "callable", "target": "tests.conftest:make_teacher"},
        "criterion": criterion,
    }
    if len(criterion) > 1 or draw(st.booleans()):
        weights = [round(0.9 / len(criterion), 3)] * len(criterion)
        config["loss_balancer"] = {"name": "static", "kd_loss_weight": weights}
    if draw(st.booleans()):
        config["expose_minimal_state_dict"] = draw(st.booleans())
    return config


def locations(value: Any, path: str = "") -> list[tuple[str, list[Any]]]:
    """(config path, key path) of every value inside ``value``."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}"
            found.append((here, [key]))
            found += [(p, [key, *keys]) for p, keys in locations(item, here)]
    elif isinstance(value, list):
        for index, item in enumerate(value):
            here = f"{path}[{index}]"
            found.append((here, [index]))
            found += [(p, [index, *keys]) for p, keys in locations(item, here)]
    return found


WRONG_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.just({"name": "no-such-plugin"}),
    st.just({"name": "os:system"}),
    st.just([[]]),
)


def typo(key: str, draw: st.DrawFn) -> str:
    if not key:
        return "x"
    index = draw(st.integers(0, len(key) - 1))
    change = draw(st.sampled_from(["drop", "double", "swap"]))
    if change == "drop":
        return key[:index] + key[index + 1 :] or "x"
    if change == "double":
        return key[:index] + key[index] + key[index:]
    return key[:index] + chr((ord(key[index]) - 96) % 26 + 97) + key[index + 1 :]


@st.composite
def broken(draw: st.DrawFn) -> tuple[dict[str, Any], str, str]:
    """A valid config broken in one place: (config, the broken value's path, how)."""
    config = draw(well_formed())
    broken_config = copy.deepcopy(config)
    path, keys = draw(st.sampled_from(locations(broken_config, "kd_loss")))
    parent: Any = broken_config
    for key in keys[:-1]:
        parent = parent[key]
    how = draw(st.sampled_from(["wrong value", "typo in key", "nested wrong"]))
    last = keys[-1]
    if how == "typo in key" and isinstance(last, str):
        new_key = typo(last, draw)
        if new_key in parent:
            new_key += "_x"
        parent[new_key] = parent.pop(last)
        path = path.rsplit(".", 1)[0]  # a renamed key: its parent is where the mistake is
    elif how == "nested wrong":
        parent[last] = {"inner": {"deeper": [draw(WRONG_VALUES)]}}
    else:
        parent[last] = draw(WRONG_VALUES)
    return broken_config, path, how


def _error_path(error: Exception) -> str:
    message = str(error)
    return message.split(": ", 1)[0]


def _related(found: str, broken_at: str, message: str = "") -> bool:
    """The error points at the broken value, a value inside it, or a value around it; or, when
    the break left a valid criterion of another length (one function reference in place of a
    list, say), at the balancer whose weights no longer count the losses."""
    if broken_at.startswith(found) or found.startswith(broken_at):
        return True
    return (
        broken_at.startswith("kd_loss.criterion")
        and found == "kd_loss.loss_balancer"
        and "weight(s) but there are" in message
    )


@settings(max_examples=300, deadline=None, derandomize=True)
@given(config=well_formed())
def test_well_formed_configs_pass_the_check(config: dict[str, Any]) -> None:
    kd.check([("kd_loss", config)], student=TinyNet())


#: A break that leaves a valid criterion of another length: one function by reference in place of
#: two layer pairs. The error is then the balancer's weight count (found by the generator only when
#: some modules happened to be imported: hypothesis draws constants from loaded modules).
ONE_REFERENCE_FOR_TWO_PAIRS = (
    {
        "teacher_model": {"name": "callable", "target": "tests.conftest:make_teacher"},
        "criterion": {"name": "os:system"},
        "loss_balancer": {"name": "static", "kd_loss_weight": [0.45, 0.45]},
    },
    "kd_loss.criterion",
    "wrong value",
)


@settings(max_examples=1200, deadline=None, derandomize=True)
@given(case=broken())
@example(case=ONE_REFERENCE_FOR_TWO_PAIRS)
def test_a_config_broken_anywhere_raises_a_documented_error_naming_its_path(
    case: tuple[dict[str, Any], str, str],
) -> None:
    config, broken_at, _ = case
    try:
        kd.check([("kd_loss", config)], student=TinyNet())
    except DOCUMENTED as error:
        found = _error_path(error)
        assert found.startswith("kd_loss"), error
        assert _related(found, broken_at, str(error)), (broken_at, str(error))
        if isinstance(error, kd.ConfigError):
            assert error.path == found
    # Some breaks are still valid configs (a weight changed to another number, say).


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=broken())
def test_convert_raises_the_same_documented_errors_and_leaves_the_student_alone(
    case: tuple[dict[str, Any], str, str],
) -> None:
    config, broken_at, _ = case
    student = TinyNet()
    try:
        kd.convert(student, [("kd_loss", config)])
    except DOCUMENTED as error:
        assert _related(_error_path(error), broken_at, str(error)), (broken_at, str(error))
        assert type(student) is TinyNet


MODE_LISTS = st.one_of(
    st.lists(
        st.tuples(
            st.text(max_size=8),
            st.none() | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
        ),
        max_size=3,
    ),
    st.lists(st.text(max_size=8), max_size=3),
    st.just("kd_los"),
    st.just([("kd_loss", "not a mapping")]),
    st.just([("kd_loss", [1, 2])]),
    st.just([[1, 2, 3]]),
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(modes=MODE_LISTS)
def test_malformed_mode_lists_raise_documented_errors(modes: Any) -> None:
    try:
        kd.check(modes)
    except DOCUMENTED as error:
        assert _error_path(error).startswith(
            ("mode", "kd_loss", "layerwise_kd", "export_student")
        ) or (
            error.args
            and str(error).split(":")[0] in {name for name, *_ in modes if isinstance(name, str)}
        ), str(error)


def _toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars, arrays and inline tables are close enough to TOML


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=broken(), suffix=st.sampled_from([".json", ".yaml"]))
def test_config_files_broken_anywhere_name_the_file_and_the_path(
    tmp_path: Path, case: tuple[dict[str, Any], str, str], suffix: str
) -> None:
    config, broken_at, _ = case
    path = tmp_path / f"config{suffix}"
    path.write_text(json.dumps({"kd_loss": config}))  # JSON is YAML too
    try:
        kd.load_config(path)
    except DOCUMENTED as error:
        assert str(error).startswith(f"{path}: kd_loss"), str(error)
        assert _related(str(error).split(": ", 2)[1], broken_at), (broken_at, str(error))


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("deep.json", '{"kd_loss": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ("deep.yaml", "kd_loss: " + "[" * 10_000 + "]" * 10_000, "nested too deeply"),
        ("deep.toml", "[kd_loss]\na = " + "[" * 10_000 + "]" * 10_000, "nested too deeply"),
        ("binary.toml", b"\xff\xfe[kd_loss]", "not UTF-8 text"),
        ("code.yaml", "kd_loss: !!python/object/apply:os.system ['true']", "not valid YAML"),
        ("list.json", "[1, 2]", "the top level must be a table of modes"),
        ("scalar.json", '{"kd_loss": 3}', "top-level 'kd_loss' must be a table"),
        ("empty.toml", "", "no mode tables"),
        ("typo.json", '{"kd_los": {}}', r"mode\[0\]: unknown mode 'kd_los'"),
    ],
)
def test_damaged_config_files_raise_config_errors(
    tmp_path: Path, name: str, content: str | bytes, match: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(DOCUMENTED, match=match) as info:
        kd.load_config(path)
    assert str(info.value).startswith(str(path))
