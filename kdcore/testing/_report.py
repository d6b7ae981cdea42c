"""Running contracts and reporting them: every contract runs, every failure is named."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs


class ContractFailure(AssertionError):
    """One or more contracts failed; ``failures`` holds ``(contract, what went wrong)`` pairs.

    An ``AssertionError``, so pytest reports it as a test failure with the whole list.
    """

    def __init__(self, subject: str, failures: list[tuple[str, str]]) -> None:
        self.subject = subject
        self.failures = failures
        lines = [f"{subject} breaks {len(failures)} contract(s):"]
        lines += [f"  - {name}: {problem}" for name, problem in failures]
        super().__init__("\n".join(lines))


@attrs.frozen
class ContractReport:
    """What a passing check ran: the contracts kept and those that did not apply (with why)."""

    subject: str
    passed: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


class Violation(Exception):
    """A contract's expectation was not met; the message says what was expected and seen."""


def expect(condition: bool, message: str) -> None:
    """Fail the running contract with ``message`` (what was expected) unless ``condition``."""
    if not condition:
        raise Violation(message)


class NotApplicable(Exception):
    """The contract does not apply to this plugin (no ``reduction`` argument, say)."""


class Checker:
    """Runs named contracts one after another, so one failure does not hide the next."""

    def __init__(self, subject: str, skip: frozenset[str]) -> None:
        self.subject = subject
        self.skip = skip
        self.passed: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.failures: list[tuple[str, str]] = []

    def run(self, name: str, contract: Callable[[], Any]) -> None:
        if name in self.skip:
            self.skipped.append((name, "skipped by the caller"))
            return
        with self._reporting(name):
            contract()
            self.passed.append(name)

    @contextmanager
    def _reporting(self, name: str) -> Iterator[None]:
        try:
            yield
        except NotApplicable as exc:
            self.skipped.append((name, str(exc)))
        except Violation as exc:
            self.failures.append((name, str(exc)))
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self.failures.append(
                (name, f"raised {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})")
            )

    def report(self, known: tuple[str, ...]) -> ContractReport:
        unknown = self.skip - set(known)
        if unknown:
            raise ValueError(
                f"skip names no contract of this check: {sorted(unknown)}; the contracts are "
                f"{', '.join(known)}"
            )
        if self.failures:
            raise ContractFailure(self.subject, self.failures)
        return ContractReport(self.subject, tuple(self.passed), tuple(self.skipped))
