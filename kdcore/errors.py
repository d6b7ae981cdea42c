"""kdcore's exceptions.

Each subclasses the built-in exception users already catch for that kind of mistake
(``ValueError``, ``TypeError``, ``KeyError``), so ``except ValueError`` keeps working, while
``except kdcore.KDCoreError`` catches everything kdcore raises on purpose.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KDCoreError(Exception):
    """Base class of every error kdcore raises for something a user or plugin did."""


class ConfigError(KDCoreError, ValueError):
    """A config value is missing, malformed or inconsistent; ``path`` says where it came from."""

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class ConfigTypeError(ConfigError, TypeError):
    """A config value has the wrong type (a list where a dict belongs, say)."""


class UnknownNameError(KDCoreError, KeyError):
    """A name that no registry, layer or mode knows."""

    def __init__(self, message: str, *, name: str) -> None:
        self.name = name
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class UnknownLayerError(UnknownNameError):
    """A criterion names a layer that the model does not have."""


class UnknownPluginError(UnknownNameError):
    """A plugin name (criterion, balancer, teacher loader, backend, mode) nobody registered."""


class PluginConflictError(KDCoreError, ValueError):
    """Two plugins registered the same name; kdcore refuses to pick one silently."""


class PluginError(KDCoreError, RuntimeError):
    """A plugin misbehaved (for instance it registered a name twice itself)."""


class DistillationStateError(KDCoreError, RuntimeError):
    """The model is not in a state that allows the call (no captured output, say)."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate closest to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A "; did you mean 'x'?" suffix, or "" when nothing is close."""
    match = closest(name, candidates)
    return f"; did you mean {match!r}?" if match is not None else ""
