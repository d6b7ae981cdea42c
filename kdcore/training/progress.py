"""What ``kdcore distill`` shows while it trains: a progress bar, notes, and a final summary.

On a terminal the bar is redrawn in place (``\\r``) at most ten times a second::

    step 120/600 [###-------------]  loss 0.41  student_loss 0.30  9,870 examples/s  ETA 0:00:03

Anywhere else (a log file, CI) the same fields come as plain lines every ``log_every`` steps and
at the last step, so that logs stay readable. No dependency: tqdm is not needed for this.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

BAR_WIDTH = 16
REDRAW_SECONDS = 0.1


def format_duration(seconds: float) -> str:
    """``H:MM:SS``; ``?`` when unknown."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def format_losses(parts: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.4f}" for name, value in parts.items())


class Progress:
    """Progress of steps ``start+1 .. total``: :meth:`update` after each step, :meth:`note`
    for a line of its own (a checkpoint saved), :meth:`close` at the end.

    ``stream`` is written to directly when ``tty`` (in-place bar); otherwise lines go through
    ``say`` every ``every`` steps. Example::

        progress = Progress(total=100, start=0, every=10, say=print)
        for step in range(1, 101):
            progress.update(step, {"loss": 0.5}, examples=32)
        progress.close()
    """

    def __init__(
        self,
        *,
        total: int,
        start: int,
        every: int,
        say: Callable[[str], None],
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
        columns: int | None = None,
    ) -> None:
        self.total, self.start, self.every, self.say = total, start, every, say
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        # A bar wider than the terminal would wrap, and \r would only go back to its last row.
        self.columns = columns or shutil.get_terminal_size().columns
        self.began = clock()
        self.examples = 0
        self._drawn = 0.0  # when the bar was last drawn
        self._width = 0  # characters of the bar on screen, to blank on redraw

    def rate(self) -> float:
        """Examples a second over this run so far."""
        elapsed = self.clock() - self.began
        return self.examples / elapsed if elapsed > 0 else 0.0

    def eta(self, step: int) -> float:
        done = step - self.start
        if done <= 0:
            return float("inf")
        return (self.clock() - self.began) / done * (self.total - step)

    def line(self, step: int, parts: dict[str, float]) -> str:
        shown = format_losses(parts)
        rate = f"{self.rate():,.0f} examples/s"
        eta = f"ETA {format_duration(self.eta(step))}"
        if self.tty:
            filled = BAR_WIDTH * step // max(self.total, 1)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            return f"step {step}/{self.total} [{bar}]  {shown}  {rate}  {eta}"
        return f"step {step}/{self.total}  {shown}  {rate}  {eta}"

    def update(self, step: int, parts: dict[str, float], *, examples: int) -> None:
        self.examples += examples
        last = step == self.total
        if not self.tty:
            if step % self.every == 0 or last:
                self.say(self.line(step, parts))
            return
        now = self.clock()
        if last or now - self._drawn >= REDRAW_SECONDS:
            self._draw(self.line(step, parts)[: self.columns - 1])
            self._drawn = now

    def note(self, text: str) -> None:
        """A line of its own; on a terminal it replaces the bar, which the next update redraws."""
        if self.tty and self._width:
            self._draw(text)
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
            return
        self.say(text)

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def _draw(self, text: str) -> None:
        pad = " " * max(0, self._width - len(text))
        self.stream.write(f"\r{text}{pad}")
        self.stream.flush()
        self._width = len(text)


def summary(
    *,
    steps: int,
    seconds: float,
    examples_per_second: float,
    first: dict[str, float] | None,
    last: dict[str, float] | None,
    validation: list[tuple[int, float]],
) -> list[str]:
    """The lines printed when training ends: time, each loss from first to last step of this
    run, and the validation accuracy (with its best step)."""
    lines = [
        f"done: {steps} steps in {format_duration(seconds)} ({seconds:.1f} s), "
        f"{examples_per_second:,.0f} examples/s"
    ]
    if first and last:
        width = max(len(name) for name in last)
        for name, value in last.items():
            lines.append(f"  {name:<{width}}  {first.get(name, float('nan')):.4f} -> {value:.4f}")
    if validation:
        step, accuracy = validation[-1]
        best_step, best = max(validation, key=lambda point: (point[1], -point[0]))
        lines.append(
            f"  validation accuracy {accuracy:.4f} at step {step} "
            f"(best {best:.4f} at step {best_step})"
        )
    else:
        lines.append("  validation accuracy n/a (no validation data)")
    return lines
