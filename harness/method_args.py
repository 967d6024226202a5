"""``--method-args METHOD:key=value,...``: method-config overrides, validated against the config dataclass.

Like lm-evaluation-harness's ``--model_args``: any field of a method's config (``bench ls`` lists the
methods; the config dataclasses are in ``methods/*.py``) can be set for one run without a new preset.
A value is converted by the field's annotation (``bool``: true/false/1/0/yes/no; ``int``; ``float``;
``str``; ``none`` where the field allows None). The overrides live in the spec's ``method_config``
(so in its config hash) and, as a canonical ``key=value,...`` string, in its ``variant`` field, which
the leaderboard shows as ``method[variant]`` so a variant never replaces the row it varies.
"""

from __future__ import annotations

import dataclasses
from difflib import get_close_matches

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class MethodArgsError(ValueError):
    """A bad ``--method-args`` entry; the message names it and what would be accepted."""


def parse(texts: list[str] | tuple[str, ...] | None) -> dict[str, dict[str, str]]:
    """``["adpdm:lr=0,rounds=16", "tdq:hidden=32"]`` -> ``{"adpdm": {"lr": "0", "rounds": "16"}, ...}``.

    One entry per method (repeat the option for several); values stay strings until :func:`apply`.
    """
    out: dict[str, dict[str, str]] = {}
    for text in texts or ():
        method, sep, rest = text.partition(":")
        method = method.strip()
        if not sep or not method or not rest.strip():
            raise MethodArgsError(f"--method-args {text!r} is not METHOD:key=value,...: "
                                  f"write e.g. --method-args adpdm:lr=0")
        if method in out:
            raise MethodArgsError(f"--method-args names {method} twice: put all its keys in one entry")
        pairs: dict[str, str] = {}
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise MethodArgsError(f"--method-args {method}: {item!r} is not key=value")
            if key.strip() in pairs:
                raise MethodArgsError(f"--method-args {method}: {key.strip()} is given twice")
            pairs[key.strip()] = value.strip()
        out[method] = pairs
    return out


def _convert(method: str, field: dataclasses.Field, raw: str):
    kind = str(field.type).replace(" ", "")
    options = set(kind.split("|"))
    if raw.lower() in ("none", "null") and "None" in options:
        return None
    try:
        if "bool" in options:
            if raw.lower() in TRUE:
                return True
            if raw.lower() in FALSE:
                return False
            raise ValueError
        if "int" in options:
            return int(raw)
        if "float" in options:
            return float(raw)
    except ValueError:
        raise MethodArgsError(f"--method-args {method}:{field.name}={raw}: expected {kind}") from None
    return raw


def apply(method: str, config_cls, base: dict, raw: dict[str, str]) -> tuple[dict, str]:
    """``(config dict, variant label)`` of ``base`` (a preset's ``to_dict()``) with ``raw`` applied.

    Raises :class:`MethodArgsError` naming an unknown key (with the known keys) or a bad value; the
    dataclass's own checks (``__post_init__``) run on the result, so an invalid choice fails here too.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.name != "preset"}
    cfg = dict(base)
    for key in sorted(raw):
        if key not in fields:
            near = get_close_matches(key, fields, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise MethodArgsError(f"--method-args {method}: unknown key {key!r}{hint}; "
                                  f"known keys: {', '.join(sorted(fields))}")
        cfg[key] = _convert(method, fields[key], raw[key])
    try:
        config_cls.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise MethodArgsError(f"--method-args {method}: {e}") from None
    label = ",".join(f"{k}={_show(cfg[k])}" for k in sorted(raw))
    return cfg, label


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)
