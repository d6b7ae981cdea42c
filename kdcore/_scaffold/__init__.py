"""``kdcore new-plugin``: a ready plugin package, written from the templates in this folder.

One template module per plugin kind holds the plugin module and its tests; the packaging files
are common. Nothing is downloaded: the package depends on kdcore and nothing else.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from kdcore._errors import ConfigError, did_you_mean
from kdcore._scaffold import _backend, _balancer, _criterion, _teacher_loader

#: kind -> the template module (MODULE, TESTS, USAGE)
KINDS = {
    "criterion": _criterion,
    "balancer": _balancer,
    "teacher-loader": _teacher_loader,
    "backend": _backend,
}

_NAME = re.compile(r"[a-z][a-z0-9_]*")

PYPROJECT = Template("""\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$distribution"
version = "0.1.0"
description = "A kdcore $kind plugin: $name"
requires-python = ">=3.11"
dependencies = ["kdcore"]

# kdcore finds plugins through this entry-point group; the entry point's name is the plugin's.
[project.entry-points.kdcore]
$name = "$module"

[tool.setuptools]
py-modules = ["$module"]
""")

README = Template("""\
# $distribution

A kdcore $kind plugin that registers `$name`, made by `kdcore new-plugin $name --kind $kind`.

```console
$$ pip install -e .           # kdcore finds it through its entry point
$$ kdcore plugins             # lists "$name" under $distribution
$$ python -m pytest tests     # kdcore.testing's contracts and the plugin's own tests
```

$usage
Edit `$module.py`; `tests/test_$module.py` checks it against the contracts kdcore's own plugins
keep (`kdcore.testing`), so a broken change fails with the contract's name.
""")


def new_plugin(name: str, kind: str, folder: Path) -> Path:
    """Write the package ``kdcore-<name>`` for a ``kind`` plugin registering ``name`` into
    ``folder``; return the package folder. Refuses a bad name or kind, or an existing folder."""
    if kind not in KINDS:
        raise ConfigError(
            f"unknown plugin kind {kind!r}; the kinds are {', '.join(KINDS)}"
            f"{did_you_mean(kind, KINDS)}"
        )
    given, name = name, name.removeprefix("kdcore-").removeprefix("kdcore_").replace("-", "_")
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"plugin name {given!r} must be a lower-case Python identifier (letters, digits, "
            "'_' or '-', starting with a letter), e.g. 'cosine'"
        )
    _refuse_a_taken_name(name, kind)
    template = KINDS[kind]
    values = {
        "name": name,
        "kind": kind,
        "module": f"kdcore_{name}",
        "distribution": f"kdcore-{name.replace('_', '-')}",
        "Name": "".join(part.capitalize() for part in name.split("_")),
    }
    package = folder / values["distribution"]
    if package.exists() and any(package.iterdir()):
        raise ConfigError(f"{package} exists and is not empty; choose another --directory")
    files = {
        "pyproject.toml": PYPROJECT.substitute(values),
        "README.md": README.substitute(values, usage=Template(template.USAGE).substitute(values)),
        f"{values['module']}.py": Template(template.MODULE).substitute(values),
        f"tests/test_{values['module']}.py": Template(template.TESTS).substitute(values),
    }
    for relative, text in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


#: kind -> the registry its plugin fills
_REGISTRIES = {
    "criterion": "criteria",
    "balancer": "balancers",
    "teacher-loader": "teacher_loaders",
    "backend": "checkpoint_backends",
}


def _refuse_a_taken_name(name: str, kind: str) -> None:
    """A name another installed plugin registers would clash with it (both unusable)."""
    import kdcore as kd

    registry = getattr(kd.registries(), _REGISTRIES[kind])
    if name in registry:
        raise ConfigError(
            f"{registry.kind} {name!r} is already registered by {registry.provider(name)}; "
            "choose another name (kdcore plugins lists the names in use)"
        )
