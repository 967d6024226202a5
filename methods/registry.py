"""One typed registry for every kind of plug-in: methods, models, samplers, extractors, metrics.

Modelled on lm-evaluation-harness's ``lm_eval/api/registry.py``: a name maps to an object
plus metadata given at registration (a metric's ``higher_is_better``, say); an unknown name
fails with the known names and a "did you mean"; third-party packages add entries through
an entry-point group::

    [project.entry-points."dmqbench.methods"]
    mymethod = "my_pkg.method:MyMethod"

This module imports nothing of the project, so ``models``, ``methods`` and ``harness`` all
build their registries on it without import cycles.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


UnknownMethodError = UnknownNameError  # the name callers used before the registry was shared


class Registry(Generic[T]):
    """``name -> object`` with metadata, did-you-mean, lazily imported built-ins and entry points."""

    def __init__(self, kind: str, entry_point_group: str | None = None, builtins: tuple[str, ...] = (),
                 check: Callable[[Any], bool] | None = None,
                 on_register: Callable[[str, Any], None] | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._builtins = builtins  # modules that register their entries when imported
        self._check = check
        self._on_register = on_register  # e.g. a method class learns its registered name
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._loaded = not builtins and entry_point_group is None

    def register(self, name: str, obj: T | None = None, **meta: Any):
        """``@registry.register("name", **meta)`` as a decorator, or ``registry.register(name, obj)``."""

        def add(o: T) -> T:
            if self._check is not None and not self._check(o):
                raise TypeError(f"{o!r} cannot be registered as a {self.kind}")
            existing = self._entries.get(name)
            if existing is not None and existing is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered ({existing!r})")
            self._entries[name] = o
            self._meta[name] = dict(meta)
            if self._on_register is not None:
                self._on_register(name, o)
            return o

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
        self._meta.pop(name, None)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: built-ins may look themselves up while importing
        for module in self._builtins:
            importlib.import_module(module)
        if self.entry_point_group:
            for ep in entry_points(group=self.entry_point_group):
                if ep.name not in self._entries:
                    self.register(ep.name, ep.load())

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} Known {self.kind}s: {', '.join(sorted(self._entries))}"
            ) from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)


def _is_method(obj: Any) -> bool:
    from methods.base import QuantMethod

    return isinstance(obj, type) and issubclass(obj, QuantMethod)


METHODS: Registry = Registry(
    "method", "dmqbench.methods",
    builtins=("methods.fp", "methods.rtn", "methods.qdiffusion", "methods.ptq4dm", "methods.adpdm", "methods.tdq"),
    check=_is_method,
    on_register=lambda name, cls: setattr(cls, "name", name),
)


def register_method(name: str):
    """``@register_method("name")`` on a :class:`methods.base.QuantMethod` subclass."""
    return METHODS.register(name)


def names() -> list[str]:
    return METHODS.names()


def get(name: str):
    return METHODS.get(name)


def row_label(method: str) -> str:
    """How a leaderboard or tracking row names ``method`` (a registry name, maybe with a ``[variant]``):
    the name, followed by the method's declared :attr:`~methods.base.QuantMethod.label` if it has one."""
    try:
        label = getattr(METHODS.get(method.split("[", 1)[0]), "label", None)
    except KeyError:
        return method
    return f"{method}: {label}" if label else method
