"""What ``import kdcore`` and the first plugin use load: cattrs only once a config is structured."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LOADED = """
import json, sys
{code}
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""


def top_level_modules_after(code: str) -> list[str]:
    """The top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", LOADED.format(code=code)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("import kdcore", id="import"),
        pytest.param(
            "import kdcore as kd\nkd.LogitsDistillationLoss(temperature=2.0)", id="first-use"
        ),
    ],
)
def test_cattrs_is_imported_only_to_structure_a_config(code: str) -> None:
    assert "cattrs" not in top_level_modules_after(code)


def test_structuring_a_config_imports_cattrs() -> None:
    # The checks above are only worth something if cattrs does load when a config is structured.
    code = """
import torch
import kdcore as kd
config = {"teacher_model": torch.nn.Linear(2, 2), "criterion": {"name": "logits"}}
kd.convert(torch.nn.Linear(2, 2), [("kd_loss", config)])
"""
    assert "cattrs" in top_level_modules_after(code)
