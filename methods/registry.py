"""The method registry: ``@register_method("name")``, ``get("name")``, plug-ins by entry point.

Third-party methods register themselves from their own package through the entry-point
group ``dmqbench.methods``::

    [project.entry-points."dmqbench.methods"]
    mymethod = "my_pkg.method:MyMethod"

An unknown name fails with the known ones and a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from importlib.metadata import entry_points

from methods.base import QuantMethod

ENTRY_POINT_GROUP = "dmqbench.methods"
_REGISTRY: dict[str, type[QuantMethod]] = {}
_BUILTINS_LOADED = False
_PLUGINS_LOADED = False

# Built-in method modules, imported lazily on first lookup (they register on import).
_BUILTIN_MODULES = ("methods.fp", "methods.rtn", "methods.qdiffusion", "methods.ptq4dm", "methods.adpdm", "methods.tdq")


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_method(name: str) -> Callable[[type[QuantMethod]], type[QuantMethod]]:
    def decorator(cls: type[QuantMethod]) -> type[QuantMethod]:
        if not (isinstance(cls, type) and issubclass(cls, QuantMethod)):
            raise TypeError(f"@register_method({name!r}) must decorate a QuantMethod subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"method {name!r} is already registered by {existing.__module__}.{existing.__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load() -> None:
    global _BUILTINS_LOADED, _PLUGINS_LOADED
    if not _BUILTINS_LOADED:
        import importlib

        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _BUILTINS_LOADED = True
    if not _PLUGINS_LOADED:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            cls = ep.load()
            if ep.name not in _REGISTRY:
                register_method(ep.name)(cls)
        _PLUGINS_LOADED = True


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get(name: str) -> type[QuantMethod]:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownMethodError(f"unknown method {name!r}{hint} Known methods: {known}") from None
