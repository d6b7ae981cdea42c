"""griffe extension for the API reference: kdcore's docstrings use reST's ``::`` literal blocks
and ``:role:`target``` cross references, which the site renders as Markdown. Turn the first
into fenced code and the second into inline code, so the reference reads as the source does."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":[\w:]+:`~?([^`]+)`")
_DOUBLE_BACKTICKS = re.compile(r"``([^`]+)``")


def markdown_of(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.rstrip().endswith("::"):
            # reST: "text::" reads "text:", "text ::" reads "text", a lone "::" nothing.
            stripped = line.rstrip()
            lead = stripped[:-2]
            out.append(lead.rstrip() if lead.endswith(" ") or not lead.strip() else lead + ":")
            block, index = _literal_block(lines, index + 1)
            out += ["", "```python", *block, "```", ""]
            continue
        out.append(_DOUBLE_BACKTICKS.sub(r"`\1`", _ROLE.sub(_short, line)))
        index += 1
    return "\n".join(out)


def _short(match: re.Match[str]) -> str:
    return f"`{match.group(1)}`"


def _literal_block(lines: list[str], start: int) -> tuple[list[str], int]:
    """The indented lines after a ``::`` (blank lines inside kept), dedented; and where they end."""
    index = start
    while index < len(lines) and not lines[index].strip():
        index += 1
    block: list[str] = []
    while index < len(lines) and (not lines[index].strip() or lines[index].startswith(" ")):
        block.append(lines[index])
        index += 1
    while block and not block[-1].strip():
        block.pop()
    indent = min((len(b) - len(b.lstrip()) for b in block if b.strip()), default=0)
    return [b[indent:] for b in block], index


class RestDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_of(obj.docstring.value)
