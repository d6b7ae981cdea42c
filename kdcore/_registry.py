"""Named registries of plugin-provided things, with errors that say who provided what."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Generic, TypeVar

import attrs

from kdcore._errors import (
    ConfigTypeError,
    PluginConflictError,
    PluginError,
    UnknownPluginError,
    closest,
)

T = TypeVar("T")

# Names that well-known separate distributions provide, so that a miss can say what to install.
KNOWN_EXTERNAL_NAMES: dict[tuple[str, str], str] = {
    ("teacher loader", "transformers"): "kdcore-transformers",
}


@attrs.frozen
class Provider:
    """Who registered a name: the plugin (entry-point name) and its distribution."""

    plugin: str
    distribution: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} (distribution {self.distribution!r})"


UNATTRIBUTED = Provider(plugin="<direct>", distribution="<none>")


class Registry(Generic[T]):
    """Maps names to the objects plugins register, for one kind of thing.

    Plugins call :meth:`add`; kdcore calls :meth:`get`. A name two plugins register is kept
    as a conflict: looking it up fails and names both providers, instead of one silently winning.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[T, Provider]] = {}
        self._conflicts: dict[str, list[Provider]] = {}
        self._current = UNATTRIBUTED
        #: installed plugins kept out by KDCORE_DISABLE_PLUGINS: one may provide a missing name
        self.disabled_providers: tuple[Provider, ...] = ()

    @contextlib.contextmanager
    def attributed_to(self, provider: Provider) -> Iterator[None]:
        """Attribute the :meth:`add` calls made inside the block to ``provider``."""
        previous, self._current = self._current, provider
        try:
            yield
        finally:
            self._current = previous

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``."""
        if not isinstance(name, str) or not name:
            raise PluginError(
                f"{self._current} registered a {self.kind} under {name!r}; "
                "names must be non-empty strings"
            )
        if name in self._conflicts:
            self._conflicts[name].append(self._current)
            return
        if name in self._entries:
            _, first = self._entries[name]
            if first == self._current:
                raise PluginError(f"{first} registered the {self.kind} {name!r} twice")
            del self._entries[name]
            self._conflicts[name] = [first, self._current]
            return
        self._entries[name] = (obj, self._current)

    def get(self, name: str, *, where: str = "") -> T:
        """Return what is registered under ``name``; ``where`` (a config path) goes in errors."""
        if not isinstance(name, str):  # from a config or a file: a list would not even hash
            raise ConfigTypeError(
                f"expected the name of a {self.kind}, got {type(name).__name__}", path=where
            )
        if name in self._entries:
            return self._entries[name][0]
        prefix = f"{where}: " if where else ""
        if name in self._conflicts:
            raise PluginConflictError(f"{prefix}{self.conflict_message(name)}")
        raise UnknownPluginError(f"{prefix}{self.unknown_message(name)}", name=str(name))

    def unknown_message(self, name: object) -> str:
        known = self.names()
        message = f"unknown {self.kind} {name!r}; registered: {', '.join(known) or '(none)'}"
        match = closest(str(name), known)
        if match is not None:
            message += f"; did you mean {match!r}?"
        external = KNOWN_EXTERNAL_NAMES.get((self.kind, str(name)))
        if external is not None:
            # Until they are on the package index, they install from this repository's plugins/.
            message += (
                f"; it is provided by {external!r}: pip install {external}, or from a checkout "
                f"of the kdcore repository: pip install -e plugins/{external}"
            )
        elif self.disabled_providers:
            disabled = ", ".join(str(p) for p in self.disabled_providers)
            message += f"; disabled by KDCORE_DISABLE_PLUGINS, which may provide it: {disabled}"
        else:
            message += "; a plugin that provides it may not be installed (see `kdcore plugins`)"
        return message

    def conflict_message(self, name: str) -> str:
        providers = " and ".join(str(p) for p in self._conflicts[name])
        return (
            f"the {self.kind} {name!r} is registered by {providers}; "
            "disable all but one with KDCORE_DISABLE_PLUGINS=<plugin>"
        )

    def provider(self, name: str) -> Provider:
        self.get(name)  # raises the helpful error for unknown or conflicting names
        return self._entries[name][1]

    def name_of(self, obj: object) -> str | None:
        """The name ``obj`` is registered under, if any (used to record plugins in checkpoints)."""
        for name, (registered, _) in self._entries.items():
            if registered is obj:
                return name
        return None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def conflicts(self) -> dict[str, list[Provider]]:
        return {name: list(providers) for name, providers in self._conflicts.items()}

    def items(self) -> list[tuple[str, T, Provider]]:
        return [(name, *self._entries[name]) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"<Registry of {self.kind}: {', '.join(self.names())}>"
