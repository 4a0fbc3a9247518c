"""One table per port: config `kind` -> the adapter's options schema and its factory.

Each adapter file registers itself with its port's table (`providers`, `scanners`, `indicators`):

    @providers.register("sandbox", SandboxOptions)
    class SandboxProvider(Provider): ...

A table knows its built-in adapters by kind and module and imports a module only when its kind is
asked for, so loading a config imports no adapter it does not use, and nothing opens hardware at
import. Out-of-tree adapters come in through the entry-point group `appliance.platforms`: each
entry point is named after the kind it adds and names a module that registers it (or a function
that does, called with no arguments), e.g. in the plug-in's pyproject.toml

    [project.entry-points."appliance.platforms"]
    acmepay = "acmepay_appliance"

A plug-in that fails to import, or imports without registering its kind, is a ConfigError naming
the kind, when (and only when) a config asks for that kind.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from appliance.errors import ConfigError

if TYPE_CHECKING:  # imported when a plug-in is looked for: it brings email, zipfile, csv... (~1 MB)
    import importlib.metadata

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "appliance.platforms"


@dataclass(frozen=True)
class Adapter:
    """A registered adapter: its kind, its options dataclass (None: the port's config section is
    its options) and its factory (what the port's `make_*` calls)."""

    kind: str
    options: type | None
    factory: Callable[..., Any]
    origin: str  # the module that registered it, for messages


class Registry:
    """One port's table of adapters (see the module docstring)."""

    def __init__(self, port: str, builtins: dict[str, str]):
        self.port = port  # "provider", "scanner", "indicator": used in messages
        self._builtins = dict(builtins)  # kind -> module that registers it
        self._adapters: dict[str, Adapter] = {}

    def register(self, kind: str, options: type | None = None):
        """A decorator: `factory` (a class or function) makes this port's adapter of `kind`."""
        def deco(factory):
            known = self._adapters.get(kind)
            if known is not None and known.factory is not factory:
                raise ValueError(f"{self.port} kind {kind!r} is already registered by {known.origin}")
            self._adapters[kind] = Adapter(kind, options, factory, getattr(factory, "__module__", "?"))
            return factory
        return deco

    def knows(self, kind: str) -> bool:
        """Whether a config may name `kind`. Looks for plug-ins only for a kind not built in or
        registered: a lane of built-in adapters never imports importlib.metadata (~1.5 MB resident
        with email, zipfile, csv, pickle: issue 10)."""
        return kind in self._builtins or kind in self._adapters or kind in _plugins()

    def known(self) -> list[str]:
        """Every kind a config may name: built-in, registered and offered by a plug-in (not loaded)."""
        return sorted(set(self._builtins) | set(self._adapters) | set(_plugins()))

    def get(self, kind: str, key: str) -> Adapter:
        """The adapter of `kind`, importing its module if need be. Raises ConfigError naming `key`."""
        adapter = self._adapters.get(kind)
        if adapter is not None:
            return adapter
        if kind in self._builtins:
            _import(self._builtins[kind], kind, key)
        elif kind in _plugins():
            _load_plugin(_plugins()[kind], key)
        else:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, self.known()))}, got {kind!r}")
        adapter = self._adapters.get(kind)
        if adapter is None:
            source = self._builtins.get(kind) or _plugins()[kind].value
            raise ConfigError(key, f"{self.port} adapter {kind!r}: {source} does not register it")
        return adapter

    def all(self) -> dict[str, Adapter]:
        """Every adapter, each module imported (for check-config and the tests that walk the schema)."""
        for kind in self.known():
            self.get(kind, kind)
        return dict(self._adapters)


_lock = threading.Lock()
_found: dict[str, importlib.metadata.EntryPoint] | None = None


def _plugins() -> dict[str, importlib.metadata.EntryPoint]:
    """The entry points of the group, by name (= the kind each adds); looked up once per process."""
    global _found
    import importlib.metadata

    with _lock:
        if _found is None:
            _found = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        return _found


def _import(module: str, kind: str, key: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as e:  # a missing library, a broken module: the technician needs the kind, not a traceback
        raise ConfigError(key, f"adapter {kind!r} cannot be loaded: {module}: {type(e).__name__}: {e}") from None


def _load_plugin(ep: importlib.metadata.EntryPoint, key: str) -> None:
    try:
        target = ep.load()
        if callable(target):
            target()
    except Exception as e:  # a plug-in is foreign code: whatever it raises, name it
        raise ConfigError(key, f"adapter {ep.name!r} from plug-in {ep.value!r} (entry point group "
                               f"{ENTRY_POINT_GROUP}) cannot be loaded: {type(e).__name__}: {e}") from None
