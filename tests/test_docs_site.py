"""The documentation site's generated parts: the plugin catalog lists every registered name with
its arguments, and the reference renders the docstrings' reST as Markdown. (CI builds the site
with ``mkdocs build --strict``; these tests need no mkdocs.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from torch import nn

import kdcore as kd

HOOKS = Path(__file__).parents[1] / "docs" / "_hooks"


def hook(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"kdcore_docs_{name}", HOOKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return hook("catalog").catalog_pages()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("page", "registry"),
    [
        ("catalog/criteria.md", "criteria"),
        ("catalog/balancers.md", "balancers"),
        ("catalog/teacher-loaders.md", "teacher_loaders"),
        ("catalog/checkpoint-backends.md", "checkpoint_backends"),
        ("catalog/loggers.md", "loggers"),
        ("catalog/modes.md", "modes"),
    ],
)
def test_the_catalog_lists_every_registered_name(
    pages: dict[str, str], page: str, registry: str
) -> None:
    names = getattr(kd.registries(), registry).names()
    assert names
    for name in names:
        assert f"## `{name}`" in pages[page], f"{page} does not list {name!r}"


def test_the_catalog_gives_each_criterion_its_arguments_and_defaults(
    pages: dict[str, str],
) -> None:
    section = pages["catalog/criteria.md"].split("## `forward_kl`")[1].split("\n## ")[0]
    assert "| `temperature` | `1.0` |" in section
    assert "plugin 'divergences' (distribution 'kdcore')" in section
    modes = pages["catalog/modes.md"].split("## `kd_loss`")[1]
    assert "| `teacher_model` | required |" in modes


def test_a_plugin_registered_later_appears_in_the_catalog() -> None:
    class ExtraLoss(nn.Module):
        """A loss of a third party."""

        def __init__(self, scale: float = 2.0) -> None:
            super().__init__()

    class Extra:
        @kd.hookimpl
        def kdcore_register_criteria(self, registry: Any) -> None:
            registry.add("extra_loss", ExtraLoss)

    with kd.use_host(kd.PluginHost(plugins=[("extra", Extra())], blocked=())):
        pages = hook("catalog").catalog_pages()
    section = pages["catalog/criteria.md"].split("## `extra_loss`")[1].split("\n## ")[0]
    assert "A loss of a third party." in section and "| `scale` | `2.0` |" in section


def test_the_catalog_shows_a_plugins_own_docstring_not_its_base_class() -> None:
    class QuietBalancer(kd.DistillationLossBalancer):  # no docstring of its own
        def forward(self, loss_dict: dict[str, Any]) -> Any:
            return sum(loss_dict.values())

    class Extra:
        @kd.hookimpl
        def kdcore_register_balancers(self, registry: Any) -> None:
            registry.add("quiet", QuietBalancer)

    with kd.use_host(kd.PluginHost(plugins=[("extra", Extra())], blocked=())):
        pages = hook("catalog").catalog_pages()
    section = pages["catalog/balancers.md"].split("## `quiet`")[1].split("\n## ")[0]
    base = (kd.DistillationLossBalancer.__doc__ or "").strip().splitlines()[0]
    assert base not in section


def test_rest_in_docstrings_becomes_markdown() -> None:
    pytest.importorskip("griffe")  # the docs extra installs it
    markdown_of = hook("rest_docstrings").markdown_of
    text = "Use it so::\n\n    model = kd.convert(s)\n\n    loss = 1\n\nSee :class:`~kdcore.Foo` and ``x``."
    assert markdown_of(text) == (
        "Use it so:\n\n```python\nmodel = kd.convert(s)\n\nloss = 1\n```\n\n"
        "See `kdcore.Foo` and `x`."
    )


@pytest.mark.parametrize(
    ("line", "shown"),
    [("Use it so::", "Use it so:"), ("names. ::", "names."), ("::", "")],
)
def test_a_literal_block_marker_reads_as_rest_renders_it(line: str, shown: str) -> None:
    pytest.importorskip("griffe")
    markdown_of = hook("rest_docstrings").markdown_of
    assert markdown_of(f"{line}\n\n    code").splitlines()[0] == shown
