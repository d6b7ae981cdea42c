"""Code a checkpoint names never runs, nor gets imported, by the back doors found in issue 10.

* A ``transformers`` teacher whose folder ships its own modeling code (``auto_map`` in its
  ``config.json``): the loader refuses it, naming the folder, without asking on stdin (where one
  "y" ran the file) and without importing it, whoever calls the loader.
* A ``"module:qualname"`` reference that reaches code through a lazy module ``__getattr__`` (or a
  metaclass ``__getattr__``): while restoring, resolving imports and calls nothing; the name is
  refused unless it is already an attribute or listed in ``trust=``.
"""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import kdcore as kd
from tests.conftest import TinyNet, crafted_manifest, make_teacher, nothing_runs, write_raw

try:
    import transformers
except ImportError:  # the loader's tests need it; the reference tests do not
    transformers = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers")
LOGITS = {"name": "logits"}


@pytest.fixture(scope="module", autouse=True)
def _warm_up(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The first restore of a process loads the plugins and imports kdcore's own modules, and
    the first transformers spec imports the loader: not a file's doing, so done before
    :func:`nothing_runs` watches."""
    config = {"teacher_model": make_teacher, "criterion": LOGITS}
    model = kd.convert(TinyNet(), [("kd_loss", config)])
    kd.restore(TinyNet(), kd.save(model, tmp_path_factory.mktemp("warm-up") / "warm.safetensors"))
    if transformers is not None:
        kd.check(
            [("kd_loss", {**config, "teacher_model": {"name": "transformers", "path": "a/b"}})]
        )


def checkpoint_naming(path: Path, **manifest: Any) -> Path:
    """A checkpoint whose manifest is :func:`crafted_manifest` with ``manifest`` changes."""
    text = json.dumps(crafted_manifest(**manifest))
    return write_raw(path, TinyNet().state_dict(), {"kdcore": text})


def first_loss(model: Any) -> Any:
    """The loss module of a converted or restored model's first criterion pair."""
    return model.loss_modules[0]


def with_loss(reference: str, teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """The crafted manifest's modes with ``reference`` as its criterion's loss."""
    modes = crafted_manifest(teacher)["modes"]
    modes[0]["config"]["criterion"][0]["loss"] = {"name": reference}
    return {"modes": modes}


# ================================================================== 1. transformers custom code

CUSTOM_CODE = """\
from pathlib import Path

Path({sentinel!r}).write_text("ran")  # importing this file is running it
"""


@pytest.fixture
def custom_code_folder(tmp_path: Path) -> Iterator[Path]:
    """A save_pretrained-like folder whose config.json maps its classes to its own .py files."""
    folder = tmp_path / "custom-teacher"
    folder.mkdir()
    sentinel = tmp_path / "SENTINEL"
    config = {
        "model_type": "kdcore-custom",
        "architectures": ["CustomModel"],
        "auto_map": {
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomModel",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (folder / name).write_text(CUSTOM_CODE.format(sentinel=str(sentinel)))
    yield folder
    assert not sentinel.exists(), "the folder's custom code ran"
    custom = ("transformers_modules", "configuration_custom", "modeling_custom")
    assert not [n for n in sys.modules if custom[0] in n or n.endswith(custom[1:])], "imported"


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every question asked on stdin; each is answered with an error (stdin is not a user)."""
    asked: list[str] = []

    def no_input(prompt: object = "") -> str:
        asked.append(str(prompt))
        raise EOFError("stdin is closed")

    monkeypatch.setattr(builtins, "input", no_input)
    yield asked
    assert asked == [], f"a question was asked on stdin: {asked}"


def assert_names_the_custom_code(error: BaseException, folder: Path) -> None:
    message = str(error)
    assert str(folder / "config.json") in message and "auto_map" in message, message
    assert "trust_remote_code=True" not in message, "kdcore refuses it: do not suggest it"


@needs_transformers
def test_restoring_a_checkpoint_whose_teacher_folder_ships_code_refuses_it_and_asks_nothing(
    tmp_path: Path, custom_code_folder: Path, prompts: list[str]
) -> None:
    teacher = {"name": "transformers", "path": str(custom_code_folder), "dtype": "float32"}
    path = checkpoint_naming(tmp_path / "run.safetensors", teacher=teacher)
    student = TinyNet()
    before = {name: value.clone() for name, value in student.state_dict().items()}
    with pytest.raises(kd.ConfigError) as caught:
        kd.restore(student, path)
    assert str(path) in str(caught.value)
    assert_names_the_custom_code(caught.value, custom_code_folder)
    assert type(student) is TinyNet
    assert all(torch.equal(before[n], v) for n, v in student.state_dict().items())
    with nothing_runs(), pytest.raises(kd.ConfigError):  # the second time, watched closely
        kd.restore(student, path)


@needs_transformers
def test_a_config_naming_a_teacher_folder_that_ships_code_is_refused_by_check_and_convert(
    custom_code_folder: Path, prompts: list[str]
) -> None:
    spec = {"name": "transformers", "path": str(custom_code_folder)}
    config = {"teacher_model": spec, "criterion": {"name": "forward_kl"}}
    for attempt in (
        lambda: kd.check([("kd_loss", config)]),  # validates without loading
        lambda: kd.convert(TinyNet(), [("kd_loss", config)]),
        lambda: kd.registries().teacher_loaders.get("transformers")(path=spec["path"]),
    ):
        with pytest.raises(kd.ConfigError) as caught:
            attempt()
        assert_names_the_custom_code(caught.value, custom_code_folder)


@needs_transformers
def test_trust_remote_code_in_a_checkpoint_is_refused_before_anything_loads(
    tmp_path: Path, prompts: list[str]
) -> None:
    from tests.test_transformers_plugin import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "teacher")
    teacher = {
        "name": "transformers",
        "path": str(tmp_path / "teacher"),
        "from_pretrained_kwargs": {"trust_remote_code": True},
    }
    path = checkpoint_naming(tmp_path / "run.safetensors", teacher=teacher)
    with nothing_runs(), pytest.raises(kd.ConfigError, match=r"\['trust_remote_code'\] is refused"):
        kd.restore(TinyNet(), path)


@needs_transformers
def test_an_auto_map_beside_a_built_in_model_type_loads_the_built_in_class_or_is_refused(
    tmp_path: Path, prompts: list[str]
) -> None:
    """Saved Phi-3 or Qwen folders keep an auto_map: transformers' own classes load them. Where
    it has none for the auto class asked for, transformers itself refuses (told not to run code),
    which today asked on stdin."""
    from tests.test_transformers_plugin import tiny_llama

    folder, sentinel = tmp_path / "teacher", tmp_path / "SENTINEL"
    tiny_llama().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
        "AutoModelForImageClassification": "modeling_custom.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text(CUSTOM_CODE.format(sentinel=str(sentinel)))
    load = kd.registries().teacher_loaders.get("transformers")
    assert type(load(path=str(folder))) is transformers.LlamaForCausalLM
    with pytest.raises(kd.ConfigError) as caught:
        load(path=str(folder), auto_class="AutoModelForImageClassification")
    message = str(caught.value)
    assert str(folder) in message and "auto_map" in message, message
    assert "trust_remote_code=True" not in message
    assert not sentinel.exists()


@needs_transformers
def test_the_loader_tells_transformers_never_to_run_code_for_a_hub_id_too(
    monkeypatch: pytest.MonkeyPatch, prompts: list[str]
) -> None:
    """A hub id cannot be inspected without the network, so transformers must refuse itself."""
    calls: list[dict[str, Any]] = []

    def offline(name: str, **kwargs: Any) -> Any:
        calls.append(kwargs)
        raise OSError(f"{name} is not in the cache (offline)")

    for auto_class in ("AutoModelForCausalLM", "AutoModel"):
        monkeypatch.setattr(getattr(transformers, auto_class), "from_pretrained", offline)
        spec = {"name": "transformers", "path": "owner/teacher", "auto_class": auto_class}
        with pytest.raises(kd.ConfigError, match="not in the cache"):
            kd.convert(TinyNet(), [("kd_loss", {"teacher_model": spec, "criterion": LOGITS})])
    assert [call.get("trust_remote_code", "unset") for call in calls] == [False, False]


@needs_transformers
def test_a_folder_whose_config_is_not_json_is_refused_naming_it(
    tmp_path: Path, prompts: list[str]
) -> None:
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text('{"auto_map": ')
    spec = {"name": "transformers", "path": str(tmp_path / "teacher")}
    with pytest.raises(kd.ConfigError, match="config.json") as caught:
        kd.check([("kd_loss", {"teacher_model": spec, "criterion": {"name": "logits"}})])
    assert str(tmp_path / "teacher" / "config.json") in str(caught.value)


# ================================================================== 2. references and imports
LAZY_PACKAGE = '''\
"""A package that imports its submodule on first attribute access, as torch does."""

import importlib

CALLS = []


def __getattr__(name):
    CALLS.append(name)
    if name == "heavy":
        return importlib.import_module(".heavy", __name__)
    raise AttributeError(name)


class _LazyMeta(type):
    """A class whose missing attributes are looked up by importing code."""

    def __getattr__(cls, name):
        CALLS.append(f"{cls.__name__}.{name}")
        return getattr(importlib.import_module(".heavy", __name__), name)


class Lazy(metaclass=_LazyMeta):
    pass
'''

HEAVY_MODULE = """\
from pathlib import Path

from kdcore import LogitsDistillationLoss

Path({sentinel!r}).write_text("imported")  # importing this module is running its code


class Loss(LogitsDistillationLoss):
    '''An nn.Module: trusted once found, so only the lookup itself may be refused.'''
"""


@pytest.fixture
def lazy_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``kdlazypkg`` (imported, as the user's own code would be) and its unimported ``heavy``."""
    package = tmp_path / "packages" / "kdlazypkg"
    package.mkdir(parents=True)
    sentinel = tmp_path / "SENTINEL"
    (package / "__init__.py").write_text(LAZY_PACKAGE)
    (package / "heavy.py").write_text(HEAVY_MODULE.format(sentinel=str(sentinel)))
    monkeypatch.syspath_prepend(str(package.parent))
    import kdlazypkg  # type: ignore[import-not-found]

    try:
        yield kdlazypkg, sentinel
    finally:
        for name in ("kdlazypkg", "kdlazypkg.heavy"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "reference", ["kdlazypkg:heavy.Loss", "kdlazypkg:Lazy.Loss", "kdlazypkg:missing"]
)
def test_restore_resolves_no_lazy_attribute_and_imports_nothing(
    tmp_path: Path, lazy_package: Any, reference: str
) -> None:
    package, sentinel = lazy_package
    path = checkpoint_naming(tmp_path / "lazy.safetensors", **with_loss(reference))
    with nothing_runs(), pytest.raises(kd.UntrustedReferenceError) as caught:
        kd.restore(TinyNet(), path)
    message = str(caught.value)
    assert str(path) in message and repr(reference) in message
    assert f"trust=[{reference!r}]" in message
    assert package.CALLS == [], "a lazy __getattr__ was called"
    assert "kdlazypkg.heavy" not in sys.modules and not sentinel.exists()


@pytest.mark.parametrize("reference", ["kdlazypkg:heavy.Loss", "kdlazypkg:Lazy.Loss"])
def test_a_lazy_reference_resolves_when_trusted_or_in_the_users_own_config(
    tmp_path: Path, lazy_package: Any, reference: str
) -> None:
    """The other outcome: the same lookups work when the user asks for them."""
    package, sentinel = lazy_package
    config = {"teacher_model": make_teacher, "criterion": {"name": reference}}
    converted = kd.convert(TinyNet(), [("kd_loss", config)])  # the user's own config
    assert type(first_loss(converted)).__name__ == "Loss" and package.CALLS
    assert sentinel.exists()

    sys.modules.pop("kdlazypkg.heavy")
    del package.heavy  # as if never imported
    sentinel.unlink()
    package.CALLS.clear()
    path = checkpoint_naming(tmp_path / "lazy.safetensors", **with_loss(reference))
    restored = kd.restore(TinyNet(), path, trust=[reference])
    assert type(first_loss(restored)).__name__ == "Loss" and sentinel.exists()


def test_a_reference_already_imported_by_the_user_still_restores(
    tmp_path: Path, lazy_package: Any
) -> None:
    package, _ = lazy_package
    import kdlazypkg.heavy  # type: ignore[import-not-found]  # noqa: F401

    path = checkpoint_naming(tmp_path / "lazy.safetensors", **with_loss("kdlazypkg:heavy.Loss"))
    restored = kd.restore(TinyNet(), path)
    assert type(first_loss(restored)).__name__ == "Loss" and package.CALLS == []


TORCH_LAZY = """\
import json, sys
from pathlib import Path

import kdcore as kd
from tests.conftest import TinyNet, make_teacher
from tests.test_reliability_code_execution import checkpoint_naming, with_loss

folder = Path(sys.argv[1])
config = {"teacher_model": make_teacher, "criterion": {"name": "logits"}}
model = kd.convert(TinyNet(), [("kd_loss", config)])
kd.restore(TinyNet(), kd.save(model, folder / "warm.safetensors"))
result = {"imported_by_kdcore": "torch._dynamo" in sys.modules, "errors": []}
modules = set(sys.modules)
for reference in sys.argv[2:]:
    path = checkpoint_naming(folder / "lazy.safetensors", **with_loss(reference))
    try:
        kd.restore(TinyNet(), path)
    except kd.KDCoreError as error:
        result["errors"].append([type(error).__name__, str(error)])
    else:
        result["errors"].append(None)
result["new_modules"] = sorted(set(sys.modules) - modules)
print(json.dumps(result))
"""


def test_a_reference_through_torchs_lazy_modules_imports_nothing(tmp_path: Path) -> None:
    """In a fresh process, where kdcore has not imported torch._dynamo (checked), a checkpoint
    naming a class inside it (an nn.Module once imported) is refused and imports nothing."""
    references = ["torch:_dynamo.eval_frame.OptimizedModule", "torch:_inductor.config"]
    run = subprocess.run(
        [sys.executable, "-c", TORCH_LAZY, str(tmp_path), *references],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["imported_by_kdcore"] is False
    assert result["new_modules"] == []
    for reference, error in zip(references, result["errors"], strict=True):
        assert error is not None and error[0] == "UntrustedReferenceError", error
        assert repr(reference) in error[1] and f"trust=[{reference!r}]" in error[1]


class Factories:
    """Teacher factories reached through a class, for the lookup that binds methods by hand."""

    @classmethod
    @kd.teacher_factory
    def build(cls) -> TinyNet:
        return make_teacher()

    @staticmethod
    @kd.teacher_factory
    def make() -> TinyNet:
        return make_teacher()


@pytest.mark.parametrize("name", ["build", "make"])
def test_a_name_nested_in_an_imported_class_restores_as_before(tmp_path: Path, name: str) -> None:
    """A loss class held by a class, and marked class or static methods, need no trust=."""
    Factories.Loss = kd.LogitsDistillationLoss  # type: ignore[attr-defined]
    teacher = {"name": "callable", "target": f"{__name__}:Factories.{name}"}
    manifest = with_loss(f"{__name__}:Factories.Loss", teacher)
    path = checkpoint_naming(tmp_path / "plain.safetensors", **manifest)
    restored = kd.restore(TinyNet(), path)
    assert type(first_loss(restored)) is kd.LogitsDistillationLoss
    assert torch.equal(restored.teacher_model.fc1.weight, make_teacher().fc1.weight)
