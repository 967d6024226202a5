"""Non-finite numbers are failures, never scores: find the first layer that makes NaN/Inf and say so in one line.

* :func:`first_nonfinite_module` runs a denoiser call under forward hooks and returns the qualified
  name of the first module (in execution order: a module's hook fires when its forward ends, so the
  innermost culprit comes first) whose output holds NaN or Inf.
* :func:`check_finite_output` runs the call, and when its output is not finite raises
  :class:`NonFiniteError` naming NaN/Inf and that layer.
* :func:`assert_finite_images` checks float images (or any array/tensor) and raises the same error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn


class NonFiniteError(FloatingPointError):
    """NaN/Inf where a number was expected; ``str(e)`` is one line (what, which values, which layer)."""

    def __init__(self, message: str, layer: str | None = None) -> None:
        super().__init__(" ".join(str(message).split()))
        self.layer = layer


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every floating tensor inside an output: tensors, tuples/lists, dicts, dataclasses (diffusers outputs)."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
    elif isinstance(obj, list | tuple):
        for x in obj:
            yield from _tensors(x, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name, None), depth + 1)


def nonfinite_kind(obj: Any) -> str | None:
    """``"NaN"``, ``"Inf"``, ``"NaN and Inf"`` or None for an output, tensor, array or number."""
    nan = inf = False
    if isinstance(obj, np.ndarray | np.generic | float | int) and not isinstance(obj, bool):
        a = np.asarray(obj)
        if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.complexfloating):
            return None
        nan, inf = bool(np.isnan(a).any()), bool(np.isinf(a).any())
    else:
        for t in _tensors(obj):
            with torch.no_grad():
                nan = nan or bool(torch.isnan(t).any())
                inf = inf or bool(torch.isinf(t).any())
    if nan and inf:
        return "NaN and Inf"
    return "NaN" if nan else "Inf" if inf else None


def _run_hooked(call: Callable[[], Any], module: nn.Module) -> tuple[Any, str | None]:
    """``(call(), name of the first module whose output held NaN/Inf, or None)``."""
    found: list[str] = []

    def hook_for(name: str):
        def hook(_mod, _inputs, output):
            if not found and nonfinite_kind(output) is not None:
                found.append(name)

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in module.named_modules()]
    try:
        output = call()
    finally:
        for h in handles:
            h.remove()
    return output, (found[0] if found else None)


def first_nonfinite_module(call: Callable[[], Any], module: nn.Module) -> str | None:
    """Run ``call()`` (which runs ``module``) under forward hooks on ``module`` and all its submodules;
    return the qualified name of the first module, in execution order, whose output holds NaN/Inf
    (``""`` is ``module`` itself), or None when every output is finite. The hooks are removed after."""
    return _run_hooked(call, module)[1]


def _layer_label(module: nn.Module, name: str) -> str:
    sub = module.get_submodule(name) if name else module
    return f"{name or 'the top module'} ({type(sub).__name__})"


def check_finite_output(call: Callable[[], Any], module: nn.Module, what: str) -> Any:
    """Run ``call()`` once under hooks; return its output when finite, else raise :class:`NonFiniteError`
    naming NaN/Inf and the first layer that produced it (e.g. on a run's probe batch before sampling)."""
    output, layer = _run_hooked(call, module)
    kind = nonfinite_kind(output)
    if kind is None and layer is None:
        return output
    where = f", first at layer {_layer_label(module, layer)}" if layer is not None else ""
    shown = kind or "NaN/Inf inside the model"
    raise NonFiniteError(f"{what}: {shown} in the denoiser output{where}: the quantized model is numerically broken "
                         "(a scale of 0 or an overflowing range), so this run has no score", layer=layer)


def assert_finite_images(images: Any, what: str, layer: str | None = None) -> None:
    """Raise :class:`NonFiniteError` when float ``images`` (numpy array or tensor) hold NaN/Inf.
    ``layer``: the culprit found by :func:`first_nonfinite_module`, named in the message when given."""
    kind = nonfinite_kind(images)
    if kind is None:
        return
    a = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, float)
    bad = int((~np.isfinite(a)).sum())
    where = f", first at layer {layer}" if layer else ""
    raise NonFiniteError(f"{what}: {kind} in {bad} of {a.size} values{where}: non-finite samples are a failure, "
                         "not a score", layer=layer)


def is_finite_number(x: Any) -> bool:
    """A real, finite number (bools and non-numbers are not)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
