"""mkdocs hook: the plugin catalog, one page per plugin kind, generated from the registries of
the plugins installed where the site is built, so that it lists what users get and cannot
drift from the code. ``catalog_pages()`` is what the tests check."""

from __future__ import annotations

import inspect
import re
from typing import Any

import attrs

import kdcore as kd

_SPHINX_ROLE = re.compile(r":\w+:`~?([^`]+)`")

#: page -> (registry attribute, title, what the page says first)
KINDS = {
    "catalog/criteria.md": (
        "criteria",
        "Criteria",
        "A criterion compares a student output with a teacher output. Name one in a config as "
        '`{"name": "<name>", **arguments}`; see [losses.md](../losses.md) for the formulas.',
    ),
    "catalog/balancers.md": (
        "balancers",
        "Loss balancers",
        "A balancer combines the KD losses and the student's loss into the one loss trained: "
        '`"loss_balancer": {"name": "<name>", **arguments}`.',
    ),
    "catalog/teacher-loaders.md": (
        "teacher_loaders",
        "Teacher loaders",
        'A teacher loader builds the teacher from a spec: `"teacher_model": {"name": "<name>", '
        "**arguments}`.",
    ),
    "catalog/checkpoint-backends.md": (
        "checkpoint_backends",
        "Checkpoint backends",
        'A backend writes and reads checkpoints: `kd.save(model, path, backend="<name>")`; '
        "`kd.restore` finds the backend by the file's content.",
    ),
    "catalog/loggers.md": (
        "loggers",
        "Run loggers",
        'A logger gets the records of a `kdcore distill` run: `[train] loggers = ["<name>", '
        '{ name = "<name>", ... }]`; see [logging a run](../configs.md#logging-a-run).',
    ),
    "catalog/modes.md": (
        "modes",
        "Modes",
        'A mode converts a model: `kd.convert(student, [("<name>", config)])`.',
    ),
}


def catalog_pages() -> dict[str, str]:
    """Each catalog page's markdown, from the current plugin host's registries."""
    registries = kd.registries()
    pages = {}
    for page, (attribute, title, intro) in KINDS.items():
        registry = getattr(registries, attribute)
        lines = [f"# {title}", "", intro, "", _generated_note(), ""]
        lines += ["| name | provided by | object |", "|---|---|---|"]
        entries = sorted(registry.items(), key=lambda item: item[0])
        for name, obj, provider in entries:
            lines.append(f"| [`{name}`](#{_anchor(name)}) | {provider} | `{_reference(obj)}` |")
        for name, obj, provider in entries:
            lines += ["", f"## `{name}` {{#{_anchor(name)}}}", ""]
            lines += [f"`{_reference(obj)}`, registered by {provider}.", ""]
            summary = _summary(obj)
            if summary:
                lines += [summary, ""]
            lines += _parameters(obj)
        pages[page] = "\n".join(lines) + "\n"
    return pages


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for page, markdown in catalog_pages().items():
        files.append(File.generated(config, page, content=markdown))
    return files


def _generated_note() -> str:
    return (
        "!!! note\n    Generated from the plugins installed where this site was built "
        "(`kdcore plugins` lists yours)."
    )


def _anchor(name: str) -> str:
    return name.replace("_", "-")


def _reference(obj: Any) -> str:
    target = obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj)
    return f"{target.__module__}:{target.__qualname__}"


def _summary(obj: Any) -> str:
    target = obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj)
    # Its own docstring, not one inherited from a base class; else its module's.
    own = target.__doc__ if "__doc__" in vars(target) or inspect.isfunction(target) else None
    module = inspect.getmodule(target)
    doc = inspect.cleandoc(own or (module.__doc__ if module is not None else None) or "")
    first = doc.split("\n\n")[0].replace("\n", " ")
    return _SPHINX_ROLE.sub(lambda match: f"`{match.group(1).split('.')[-1]}`", first).replace(
        "``", "`"
    )


def _parameters(obj: Any) -> list[str]:
    """The keyword arguments a config may give: the constructor's or function's parameters, or
    a mode's config class fields."""
    config_class = getattr(obj, "config_class", None)
    if attrs.has(config_class) if config_class is not None else False:
        rows = [
            (field.name, "required" if field.default is attrs.NOTHING else _default(field.default))
            for field in attrs.fields(config_class)
        ]
    elif inspect.isclass(obj) or inspect.isfunction(obj):
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):
            return []
        rows = [
            (p.name, "required" if p.default is p.empty else f"`{p.default!r}`")
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
    else:
        return []
    if not rows:
        return ["Takes no arguments."]
    return ["| argument | default |", "|---|---|", *(f"| `{n}` | {d} |" for n, d in rows)]


def _default(default: Any) -> str:
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return "(a new one each time)"
    return f"`{default!r}`"
