"""Finding plugins and collecting what they register.

Everything swappable in kdcore, the built-ins included, arrives through the ``kdcore``
entry-point group and the hooks in :mod:`kdcore._hookspecs`; the core's own modes register
through the same hooks. Loading happens on first use,
not on ``import kdcore``, in one function: :meth:`PluginHost._load`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs
import pluggy

from kdcore import _hookspecs as hookspecs
from kdcore._errors import PluginError
from kdcore._registry import Provider, Registry

DISABLE_ENV_VAR = "KDCORE_DISABLE_PLUGINS"
ENTRY_POINT_GROUP = "kdcore"
BUILTIN_DISTRIBUTION = "kdcore"  # the distribution of kdcore's own plugins (kdcore_builtins)
# The core's own plugin modules: registered in every host like any plugin, but never blocked.
CORE_PLUGINS = {"core": "kdcore._distillation_modes"}


class PluginWarning(UserWarning):
    """A plugin could not be loaded or misbehaved; kdcore goes on without it."""


@attrs.define
class Registries:
    """One registry per kind of plugin-provided thing."""

    criteria: Registry[Any] = attrs.field(factory=lambda: Registry("criterion"))
    balancers: Registry[Any] = attrs.field(factory=lambda: Registry("loss balancer"))
    teacher_loaders: Registry[Any] = attrs.field(factory=lambda: Registry("teacher loader"))
    checkpoint_backends: Registry[Any] = attrs.field(factory=lambda: Registry("checkpoint backend"))
    modes: Registry[Any] = attrs.field(factory=lambda: Registry("mode"))
    loggers: Registry[Any] = attrs.field(factory=lambda: Registry("logger"))

    def by_hook(self) -> list[tuple[str, Registry[Any]]]:
        """(hook name, registry) in the order the hooks are called."""
        return [
            ("kdcore_register_criteria", self.criteria),
            ("kdcore_register_balancers", self.balancers),
            ("kdcore_register_teacher_loaders", self.teacher_loaders),
            ("kdcore_register_checkpoint_backends", self.checkpoint_backends),
            ("kdcore_register_modes", self.modes),
            ("kdcore_register_loggers", self.loggers),
        ]


def blocked_from_environment() -> frozenset[str]:
    value = os.environ.get(DISABLE_ENV_VAR, "")
    return frozenset(name.strip() for name in value.split(",") if name.strip())


class PluginHost:
    """A pluggy ``PluginManager`` for kdcore and the registries its plugins fill.

    ``search_path`` limits entry-point discovery to those folders (``None``: ``sys.path``);
    ``use_entry_points=False`` skips discovery; ``plugins`` are registered directly after the
    entry points, as ``(name, plugin)`` pairs. ``blocked`` defaults to ``$KDCORE_DISABLE_PLUGINS``.
    The core's own modes (plugin ``core``) are registered in every host and are never blocked.
    """

    def __init__(
        self,
        *,
        use_entry_points: bool = True,
        search_path: Sequence[str] | None = None,
        plugins: Iterable[tuple[str, object]] = (),
        blocked: Iterable[str] | None = None,
    ) -> None:
        self.use_entry_points = use_entry_points
        self.search_path = list(search_path) if search_path is not None else None
        self.direct_plugins = list(plugins)
        self.blocked = frozenset(blocked) if blocked is not None else blocked_from_environment()
        self.manager = _new_manager()
        self.providers: dict[str, Provider] = {}
        self._registries: Registries | None = None

    @property
    def registries(self) -> Registries:
        if self._registries is None:
            self._registries = self._load()
        return self._registries

    def _load(self) -> Registries:
        """The whole bootstrap: the core's plugins, then discover, block, import, register,
        then call the hooks."""
        # Afresh each time: a load that failed (a PluginWarning turned into an error, say) must
        # fail the same way when retried, not on the plugins it had registered already.
        self.manager, self.providers = _new_manager(), {}
        for name, module in CORE_PLUGINS.items():
            self._register(importlib.import_module(module), Provider(name, BUILTIN_DISTRIBUTION))
        disabled = []
        if self.use_entry_points:
            for entry_point in self._entry_points():
                provider = Provider(entry_point.name, _distribution_name(entry_point))
                if entry_point.name in self.blocked:
                    disabled.append(provider)
                    continue
                try:
                    plugin = entry_point.load()
                except (Exception, SystemExit) as exc:  # a broken plugin must not break kdcore
                    _warn(f"{provider} failed to import ({entry_point.value}): {exc!r}")
                    continue
                self._register(plugin, provider)
        for name, plugin in self.direct_plugins:
            if name not in self.blocked:
                self._register(plugin, Provider(name, "<registered directly>"))

        registries = Registries()
        for hook_name, registry in registries.by_hook():
            registry.disabled_providers = tuple(disabled)  # named when a name is missing
            # Each implementation is called on its own so that a failure is pinned on its
            # plugin, the others still register, and every name is attributed to its provider.
            for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
                provider = self.providers[impl.plugin_name]
                with registry.attributed_to(provider):
                    try:
                        impl.function(*[registry for _ in impl.argnames])
                    except Exception as exc:
                        _warn(f"{provider} raised in {hook_name}: {exc!r}")
            for name in registry.conflicts():
                _warn(registry.conflict_message(name))
        return registries

    def _entry_points(self) -> list[importlib.metadata.EntryPoint]:
        seen: dict[tuple[str, str], importlib.metadata.EntryPoint] = {}
        for dist in importlib.metadata.distributions(**_path_kwargs(self.search_path)):
            for entry_point in dist.entry_points:
                if entry_point.group == ENTRY_POINT_GROUP:
                    # A distribution found twice on sys.path (say, editable and installed)
                    # is one distribution.
                    name = dist.metadata["Name"] or "<unnamed>"  # a broken METADATA has none
                    seen.setdefault((name, entry_point.name), entry_point)
        # kdcore's own plugins first, then the others in a fixed order.
        return [seen[key] for key in sorted(seen, key=lambda k: (k[0] != BUILTIN_DISTRIBUTION, k))]

    def _register(self, plugin: object, provider: Provider) -> None:
        plugin_id = f"{provider.distribution}:{provider.plugin}"
        try:
            self.manager.register(plugin, name=plugin_id)
        except (pluggy.PluginValidationError, ValueError) as exc:
            _warn(f"{provider} was not loaded: {exc}")
            return
        self.providers[plugin_id] = provider
        for caller in self.manager.get_hookcallers(plugin) or []:
            if caller.spec is None:  # pluggy accepts unknown hooks; a typo would go unnoticed
                _warn(f"{provider} implements unknown hook {caller.name!r}; it is ignored")

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object by hand, before first use (tests, embedding apps)."""
        if self._registries is not None:
            raise PluginError(f"cannot register plugin {name!r}: plugins were already loaded")
        self.direct_plugins.append((name, plugin))


def _new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


def _path_kwargs(search_path: list[str] | None) -> dict[str, Any]:
    return {} if search_path is None else {"path": search_path}


def _distribution_name(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return (dist.metadata["Name"] or "<unnamed>") if dist is not None else "<unknown>"


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


_default_host: PluginHost | None = None


def current_host() -> PluginHost:
    """The host kdcore uses; created from the installed entry points on first use."""
    global _default_host
    if _default_host is None:
        _default_host = PluginHost()
    return _default_host


def registries() -> Registries:
    """The registries of :func:`current_host`, loading plugins on first call."""
    return current_host().registries


@contextlib.contextmanager
def use_host(host: PluginHost) -> Iterator[PluginHost]:
    """Make ``host`` the current one inside the block (tests, or apps with their own plugins)."""
    global _default_host
    previous, _default_host = _default_host, host
    try:
        yield host
    finally:
        _default_host = previous
