"""``kdcore distill``'s progress bar (tqdm): one line redrawn in place that fits the terminal,
whole fields left out by priority when it is narrow, and tqdm loaded only to draw it."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from kdcore.training import load_job, train
from kdcore.training.progress import Progress
from tests.test_distill import one_thread, write_job  # noqa: F401 (a fixture)
from tests.test_import_time import top_level_modules_after

LOSSES = {"loss": 0.41, "student_loss": 0.3, "LogitsDistillationLoss_0": 0.52, "FitNetLoss_1": 2.5}


class Terminal(io.StringIO):
    """What a terminal receives: redraws start with a carriage return."""

    def isatty(self) -> bool:
        return True

    def lines(self) -> list[str]:
        """What each redraw shows (tqdm pads a shorter line with blanks over the longer one)."""
        return [line.rstrip() for line in re.split(r"[\r\n]", self.getvalue()) if line.strip()]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drawn(columns: int, parts: dict[str, float] = LOSSES) -> str:
    """The line drawn at step 120 of 600, 2 s in, 64 examples a step, ``columns`` wide."""
    screen, clock = Terminal(), FakeClock()
    progress = Progress(
        total=600, start=0, every=1, say=print, stream=screen, clock=clock, columns=columns
    )
    for step in range(1, 120):  # too fast to be drawn
        progress.update(step, parts, examples=64)
    clock.now = 2.0
    progress.update(120, parts, examples=64)
    (line,) = set(screen.lines())
    return line


def test_a_job_s_lines_fit_an_80_column_terminal_with_eta_and_examples_per_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    modes, config = load_job(write_job(tmp_path, steps=6, every=3))
    screen = Terminal()
    train(modes, config, stream=screen)
    lines = screen.lines()
    bars = [line for line in lines if line.startswith("step ")]
    assert bars[-1].startswith("step 6/6 ") and "checkpoint saved to" in "".join(lines)
    for line in bars:  # notes are lines of their own, which may wrap
        assert len(line) < 80, line
        assert re.search(r"  [\d,]+ examples/s  ETA \d:\d\d:\d\d$", line), line
    assert "done: 6 steps" in capsys.readouterr().out  # the summary is printed below


def test_on_a_wide_terminal_the_bar_and_every_field_show() -> None:
    line = drawn(200)
    assert re.fullmatch(
        r"step 120/600 \[#{6} {24}\]  loss 0\.4100  student_loss 0\.3000  "
        r"LogitsDistillationLoss_0 0\.5200  FitNetLoss_1 2\.5000  3,840 examples/s  ETA 0:00:08",
        line,
    )


@pytest.mark.parametrize("columns", range(10, 161))
def test_a_narrow_terminal_leaves_out_whole_fields_by_priority(columns: int) -> None:
    priority = [
        "step 120/600",
        "ETA 0:00:08",
        "3,840 examples/s",
        "loss 0.4100",
        "student_loss 0.3000",
        "LogitsDistillationLoss_0 0.5200",
        "FitNetLoss_1 2.5000",
    ]
    line = drawn(columns)
    fields = re.sub(r" \[[ 0-9#]+\]", "", line).split("  ")
    assert len(line) < max(columns, len(priority[0]) + 1)
    assert set(fields) <= set(priority)  # none cut
    assert sorted(fields, key=priority.index) == priority[: len(fields)]  # the first ones
    if "[" in line:
        assert set(fields) == set(priority)  # the bar comes last


def test_a_note_goes_above_the_bar_which_stays_on_screen() -> None:
    screen, clock = Terminal(), FakeClock()
    progress = Progress(
        total=4, start=0, every=1, say=print, stream=screen, clock=clock, columns=100
    )
    for step in range(1, 5):
        clock.now += 0.5
        progress.update(step, {"loss": 1.0 / step}, examples=10)
        if step == 2:
            progress.note("checkpoint saved")
    progress.close()
    text = screen.getvalue()
    assert text.endswith("\n") and text.count("\n") == 2  # after the note, and at the close
    assert "\rcheckpoint saved\n" in text
    last = text.rstrip("\n").rsplit("\r", 1)[-1]
    assert re.fullmatch(r"step 4/4 \[#{30}\]  loss 0\.2500  20 examples/s  ETA 0:00:00", last)


def test_kdcore_imports_tqdm_only_to_draw_a_bar() -> None:
    # torch itself imports tqdm when it is installed (torch.hub), so what is checked is that
    # kdcore, its training loop and its command line import without it.
    code = "import sys\nsys.modules['tqdm'] = None\nimport kdcore, kdcore.cli, kdcore.training"
    assert "kdcore" in top_level_modules_after(code)
