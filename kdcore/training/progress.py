"""What ``kdcore distill`` shows while it trains: a progress bar, notes, and a final summary.

On a terminal a tqdm bar is redrawn in place at most ten times a second::

    step 120/600 [###     ]  loss 0.4100  student_loss 0.3000  9,870 examples/s  ETA 0:00:03

The line always fits the terminal (its width read at each redraw; ``COLUMNS`` overrides it): when
it is too narrow, whole fields are left out, never cut, keeping them in this order of priority:
``step N/total``, the ETA, examples/s, ``loss``, the other loss components in their order, and
last the bar (shown only with room for at least :data:`BAR_MIN` characters). Anywhere else (a log
file, CI) every field comes as a plain line every ``log_every`` steps and at the last step, so
that logs stay readable. tqdm is imported only when a bar is drawn: ``import kdcore`` does not
load it.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

BAR_MIN = 10  # narrower, a bar says no more than "step N/total" does
BAR_MAX = 30
REDRAW_SECONDS = 0.1
SEPARATOR = "  "


def format_duration(seconds: float) -> str:
    """``H:MM:SS``; ``?`` when unknown."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def format_losses(parts: dict[str, float]) -> str:
    return SEPARATOR.join(f"{name} {value:.4f}" for name, value in parts.items())


class Progress:
    """Progress of steps ``start+1 .. total``: :meth:`update` after each step, :meth:`note`
    for a line of its own (a checkpoint saved), :meth:`close` at the end.

    ``stream`` gets the bar when ``tty`` (default: whether it is a terminal); otherwise lines go
    through ``say`` every ``every`` steps. ``columns`` fixes the terminal width. Example::

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
        self.columns = columns
        self.began = clock()
        self.examples = 0
        self._drawn = 0.0  # when the bar was last drawn
        self._bar: Any = None  # the tqdm bar, made at the first draw

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
        """Every field, as a log line."""
        return SEPARATOR.join(
            [f"step {step}/{self.total}", format_losses(parts), *self._speed(step)]
        )

    def fitted(self, step: int, parts: dict[str, float], columns: int) -> str:
        """The bar's line for a terminal ``columns`` wide, as a tqdm ``bar_format`` (with
        ``{bar:N}`` where the bar goes). Fields are kept by priority while they fit."""
        room = columns - 1  # writing the last column makes some terminals wrap the line
        rate, eta = self._speed(step)
        losses = [f"{name} {value:.4f}" for name, value in parts.items()]
        head = f"step {step}/{self.total}"
        width = len(head)
        fields = [eta, rate, *losses]
        kept: list[str] = []
        for field in fields:
            if width + len(SEPARATOR) + len(field) > room:
                break
            kept.append(field)
            width += len(SEPARATOR) + len(field)
        # On the line: the losses, then the speed, as in a log line.
        tail = "".join(SEPARATOR + f for f in [*kept[2:], *kept[1:2], *kept[:1]])
        bar = min(BAR_MAX, room - width - len(" []"))
        if bar < BAR_MIN or len(kept) < len(fields):
            return _literal(head + tail)
        return f"{_literal(head)} [{{bar:{bar}}}]{_literal(tail)}"

    def update(self, step: int, parts: dict[str, float], *, examples: int) -> None:
        self.examples += examples
        last = step == self.total
        if not self.tty:
            if step % self.every == 0 or last:
                self.say(self.line(step, parts))
            return
        now = self.clock()
        if last or now - self._drawn >= REDRAW_SECONDS:
            self._draw(step, parts)
            self._drawn = now

    def note(self, text: str) -> None:
        """A line of its own; on a terminal it goes above the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
            return
        self.say(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()  # leaves the last line on the screen
            self._bar = None

    def _speed(self, step: int) -> tuple[str, str]:
        return f"{self.rate():,.0f} examples/s", f"ETA {format_duration(self.eta(step))}"

    def _draw(self, step: int, parts: dict[str, float]) -> None:
        columns = self.columns or shutil.get_terminal_size().columns
        text = self.fitted(step, parts, columns)
        if self._bar is None:
            from tqdm import tqdm

            # tqdm draws the bar as it makes it, then formats and redraws ours (which fits).
            self._bar = tqdm(total=self.total, initial=step, file=self.stream, bar_format=text)
            return
        self._bar.bar_format, self._bar.n = text, step
        self._bar.refresh()


def _literal(text: str) -> str:
    """``text`` as a literal part of a tqdm ``bar_format`` (a ``str.format`` template)."""
    return text.replace("{", "{{").replace("}", "}}")


def summary(
    *,
    steps: int,
    seconds: float,
    examples_per_second: float,
    first: dict[str, float] | None,
    last: dict[str, float] | None,
    validation: list[tuple[int, float]],
    resumed_at: int | None = None,
) -> list[str]:
    """The lines printed when training ends: time, each loss from the first to the last step,
    and the validation accuracy (with its best step). After a resume (``resumed_at``), ``first``
    and ``validation`` cover the whole run; time and speed are those of the resumed part."""
    speed = (
        f"in {format_duration(seconds)} ({seconds:.1f} s), {examples_per_second:,.0f} examples/s"
    )
    if resumed_at is None:
        lines = [f"done: {steps} steps {speed}"]
    else:
        since = f"the {steps - resumed_at} since resuming at step {resumed_at}"
        lines = [f"done: {steps} steps; {since} {speed}"]
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
