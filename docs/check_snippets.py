"""Run every snippet of the docs pages and the README in order:
``python docs/check_snippets.py [page.md ...]``.

Each page runs in a fresh temporary folder, removed afterwards, its Python blocks in one
interpreter (in ``__main__``, so that ``"__main__:name"`` references resolve), in order. Markers,
written as HTML comments on the line just before a fenced block, say what else to do with a block:

    <!-- file: NAME -->   write the block to NAME (relative to the page's folder)
    <!-- skip -->         do not run the block
    <!-- run -->          run the (shell) block as it is, in the page's folder
    <!-- run: CMD -->     run CMD instead of the block shown ("{repo}" is the repository root)
    <!-- hidden           (a comment left open) the Python block up to the closing ``-->``
    ```python             runs but is not shown: it defines what the next visible block
    ...                   takes as given (a student, some data)
    ```
    -->

Unmarked blocks other than ``python`` (console, text, toml...) are shown, not run.
``-v`` prints every page's output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```(\w+)\s*$")
MARK = re.compile(r"^<!--\s*(file|skip|run)(?::\s*(.*?))?\s*-->\s*$|^<!--\s*(hidden)\s*$")

DRIVER = r"""
import json, os, subprocess, sys
steps = json.load(open(sys.argv[1]))
namespace = sys.modules["__main__"].__dict__
for kind, arg, code in steps:
    if kind == "file":
        os.makedirs(os.path.dirname(arg) or ".", exist_ok=True)
        with open(arg, "w") as file:
            file.write(code)
    elif kind == "run":
        print("$", arg, flush=True)
        result = subprocess.run(arg, shell=True, text=True, capture_output=True)
        print(result.stdout + result.stderr, flush=True)
        if result.returncode:
            raise SystemExit(f"shell step failed ({result.returncode}): {arg}")
    else:
        print(">>> python block", flush=True)
        exec(compile(code, "<snippet>", "exec"), namespace)
"""


def blocks(text: str) -> Iterator[tuple[str, str, tuple[str, str | None] | None]]:
    """(language, code, marker) for each fenced block with a language."""
    lines = text.splitlines()
    index, marker = 0, None
    while index < len(lines):
        line = lines[index]
        mark, fence = MARK.match(line), FENCE.match(line)
        if mark:
            marker = (mark.group(1) or mark.group(3), mark.group(2))
        elif fence:
            body = []
            index += 1
            while not lines[index].startswith("```"):
                body.append(lines[index])
                index += 1
            yield fence.group(1), "\n".join(body) + "\n", marker
            marker = None
        elif line.strip():
            marker = None
        index += 1


def steps_of(page: Path) -> list[tuple[str, str, str]]:
    steps = []
    for language, code, marker in blocks(page.read_text(encoding="utf-8")):
        kind, argument = marker if marker else (None, None)
        if kind == "skip":
            continue
        if kind == "file":
            steps.append(("file", argument or "", code))
        elif kind == "run":
            command = (argument or code).replace("{repo}", str(REPO))
            steps.append(("run", command, ""))
        elif language == "python":
            steps.append(("python", "", code))
    return steps


def check(page: Path, verbose: bool) -> bool:
    with tempfile.TemporaryDirectory(prefix=f"kdcore-docs-{page.stem}-") as folder:
        return check_in(page, Path(folder), verbose)


def check_in(page: Path, work: Path, verbose: bool) -> bool:
    steps = steps_of(page)
    (work / "_steps.json").write_text(json.dumps(steps))
    (work / "_driver.py").write_text(DRIVER)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INDEX": "1",
    }
    env.pop("PYTHONPATH", None)
    env.pop("KDCORE_DISABLE_PLUGINS", None)
    result = subprocess.run(
        [sys.executable, "_driver.py", "_steps.json"],
        cwd=work,
        env=env,
        text=True,
        capture_output=True,
        timeout=900,
        check=False,
    )
    ok = result.returncode == 0
    print(f"{'ok  ' if ok else 'FAIL'} {page.name}: {len(steps)} steps")
    if verbose or not ok:
        print(textwrap.indent(result.stdout[-8000:] + result.stderr[-8000:], "    "))
    return ok


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    pages = [Path(a) for a in argv if not a.startswith("-")] or PAGES
    results = [check(page, verbose) for page in pages]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
