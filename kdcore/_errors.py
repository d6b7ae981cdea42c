"""kdcore's exceptions.

Each subclasses the built-in exception users already catch for that kind of mistake
(``ValueError``, ``TypeError``, ``KeyError``), so ``except ValueError`` keeps working, while
``except kdcore.KDCoreError`` catches everything kdcore raises on purpose.
"""

from __future__ import annotations

import difflib
import itertools
import reprlib
from collections.abc import Iterable, Mapping

#: At most this many characters of one value go into a message or a description.
SHOWN_CHARACTERS = 200


class KDCoreError(Exception):
    """Base class of every error kdcore raises for something a user or plugin did."""


class ConfigError(KDCoreError, ValueError):
    """A config value is missing, malformed or inconsistent; ``path`` says where it came from."""

    def __init__(self, message: str, *, path: str = "") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class ConfigTypeError(ConfigError, TypeError):
    """A config value has the wrong type (a list where a dict belongs, say)."""


class CriterionError(ConfigError, RuntimeError):
    """A criterion refused the outputs of its layer pair (their shapes do not fit it, say);
    ``path`` is its config entry. Also a ``RuntimeError``, as torch's shape errors are."""


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


class _BoundedRepr(reprlib.Repr):
    """``repr`` that stops after a few items per container and a few levels, so that rendering
    a config with a huge or shared structure (a YAML alias bomb built in Python) costs little."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 4
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = 8
        self.maxdict = 8
        self.maxstring = self.maxother = SHOWN_CHARACTERS
        self.maxlong = 60

    def repr_dict(self, x: Mapping[object, object], level: int) -> str:
        # reprlib sorts the keys (all of them, first); a config reads best in its own order.
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        pieces = [
            f"{self.repr1(key, level - 1)}: {self.repr1(value, level - 1)}"
            for key, value in itertools.islice(x.items(), self.maxdict)
        ]
        return "{" + ", ".join(pieces + (["..."] if len(x) > self.maxdict else [])) + "}"

    def repr_instance(self, x: object, level: int) -> str:
        if getattr(x, "_modules", None) and callable(getattr(x, "extra_repr", None)):
            # An nn.Module with children: its own repr lists them over several lines.
            return cut(f"{type(x).__name__}({x.extra_repr() or '...'})")  # type: ignore[attr-defined]
        if isinstance(x, Mapping):  # other mappings than dict: bounded too
            return self.repr_dict(x, level)
        if isinstance(x, list):
            return self.repr_list(x, level)
        if isinstance(x, tuple):
            return self.repr_tuple(x, level)
        return super().repr_instance(x, level)

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:  # more digits than int -> str converts
            return f"<int of {x.bit_length():,} bits>"


_bounded_repr = _BoundedRepr()


def shown(value: object) -> str:
    """``repr(value)`` cut to about :data:`SHOWN_CHARACTERS`, however large or deep ``value`` is.

    Every value from a config that goes into a message or a description goes through this.
    """
    return cut(_bounded_repr.repr(value))


def cut(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """``text`` (a config path, a plugin's message) cut to ``limit`` characters."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
