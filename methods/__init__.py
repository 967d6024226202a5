"""PTQ methods behind one interface; see methods/base.py and methods/registry.py."""

from methods.registry import get, names, register_method

__all__ = ["get", "names", "register_method"]
