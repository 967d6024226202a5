"""The harness envelope around every method: ``quantize_(method, denoiser, calib, bits, scope)``.

Like torchao's ``quantize_``, this owns traversal and filtering (the scope), and a method
only says which module replaces a conv/linear and how its quantizers are calibrated
(:class:`methods.base.QuantMethod`). Around :meth:`~methods.base.QuantMethod.calibrate`
the envelope times calibration, bakes hardened AdaRound weights, checks that the module
tree still has the classes it built, freezes the weights, switches gradients off, checks
that no parameter is NaN/Inf, and writes the coverage report into the facts.

Persistence without pickle: a quantized denoiser is saved as its ``state_dict`` in
safetensors plus the JSON ``structure`` the method derived from the FP model (e.g. the
shortcut splits). :func:`load_quantized` rebuilds the same module tree from the FP model
with :func:`build` and loads that state into it, so a resumed run samples exactly what
the first attempt would, denoiser wrappers included.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from methods.base import BitConfig, CalibrationSource, QuantMethod, QuantResult
from methods.quant.adaround import AdaRoundQuantizer
from methods.quant.layers import QuantLayer
from methods.quant.quantizer import UniformQuantizer
from methods.quant.surgery import QuantSummary, Scope, freeze_all, quantize_modules
from models.atomic import atomic_path
from models.denoiser import Denoiser


class CalibrationError(RuntimeError):
    """A calibration that broke the envelope's contract (non-finite state, changed structure)."""


def module_of(denoiser: Denoiser | nn.Module) -> nn.Module:
    """The module that holds all of a denoiser's state: a wrapper itself, else its UNet."""
    return denoiser if isinstance(denoiser, nn.Module) else denoiser.unet


def build(method: QuantMethod, denoiser: Denoiser, bits: BitConfig, scope: Scope,
          structure: dict[str, Any]) -> tuple[Denoiser, QuantSummary]:
    """The method's quantized module tree on ``denoiser`` (modified in place), parameters untrained.

    Building draws no random numbers from the global generator (module constructors do), so a
    method's calibration sees the same random stream whether or not a skeleton was built first.
    """
    with torch.random.fork_rng(devices=[]):
        summary = quantize_modules(denoiser.unet, scope, bits.w, bits.a,
                                   lambda name, m, wb, ab: method.layer(name, m, wb, ab, structure))
        denoiser = method.extend(denoiser, bits, scope, summary, structure)
    return denoiser, summary


def quantize_(method: QuantMethod, denoiser: Denoiser, calib: CalibrationSource, bits: BitConfig, scope: Scope,
              artifact_dir: Path) -> QuantResult:
    """Quantize ``denoiser`` (modified in place: pass a copy) with ``method``; see the module docstring."""
    if not method.quantizes:
        return QuantResult(denoiser, {"calib_seconds": 0.0, "layers_quantized": 0})
    artifact_dir = Path(artifact_dir)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    structure = method.structure(denoiser, calib)
    denoiser, summary = build(method, denoiser, bits, scope, structure)
    root = module_of(denoiser)
    built = _classes(root)
    facts = method.calibrate(denoiser, calib, bits, artifact_dir) or {}
    bake_adaround(root)
    _check_structure(method, built, _classes(root))
    freeze_all(root)
    root.requires_grad_(False)
    check_finite_state(root, method.name)
    facts = {"calib_seconds": time.perf_counter() - start, "layers_quantized": summary.num_quantized,
             **facts, "coverage": summary.to_dict()}
    artifacts = {p.stem: p for p in sorted(artifact_dir.iterdir()) if p.is_file()}
    return QuantResult(denoiser, facts, artifacts, structure)


# ---- after calibration -------------------------------------------------------------------------------
@torch.no_grad()
def bake_adaround(root: nn.Module) -> None:
    """Hardened AdaRound weights become plain weights on the grid, under a plain uniform quantizer.

    ``w' = q(w)`` is exactly representable on the quantizer's grid, so the uniform quantizer with
    the same step and zero point returns ``w'`` unchanged: the layer computes what it did with
    AdaRound, and the tree has the classes :func:`build` makes (what a reload rebuilds).
    """
    for layer in root.modules():
        if not isinstance(layer, QuantLayer):
            continue
        names = ["weight_quantizer"] + (["weight_quantizer_skip"] if layer.split else [])
        quantizers = [getattr(layer, n) for n in names]
        if not any(isinstance(q, AdaRoundQuantizer) for q in quantizers):
            continue
        baked = [q(part) if isinstance(q, AdaRoundQuantizer) else part
                 for q, part in zip(quantizers, layer.weight_parts())]
        layer.module.weight.data = torch.cat(baked, dim=1) if layer.split else baked[0]
        for name, q in zip(names, quantizers):
            if isinstance(q, AdaRoundQuantizer):
                if not q.hardened:
                    raise CalibrationError(f"{name} of a layer was left with soft AdaRound rounding: harden it")
                plain = UniformQuantizer(q.bits, q.symmetric, q.channel_axis)
                plain.scale, plain.zero_point = q.scale.clone(), q.zero_point.clone()
                plain.initialized.fill_(True)
                plain.enabled = q.enabled
                setattr(layer, name, plain.to(q.scale.device))
        layer.unfreeze()


def _classes(root: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in root.named_modules()}


def _check_structure(method: QuantMethod, built: dict[str, type], now: dict[str, type]) -> None:
    for name in sorted(set(built) | set(now)):
        if built.get(name) is not now.get(name):
            was = getattr(built.get(name), "__name__", "nothing")
            became = getattr(now.get(name), "__name__", "nothing")
            raise CalibrationError(
                f"{method.name}.calibrate changed the module at {name or '<root>'!r} from {was} to {became}: "
                "export training-time quantizers back into the modules layer()/extend() built, so a resumed "
                "run can rebuild them")


def check_finite_state(root: nn.Module, what: str) -> None:
    """Raise naming the first parameter or buffer that holds NaN or Inf."""
    for name, t in root.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            owner = name.rsplit(".", 1)[0]
            raise CalibrationError(f"{what}: calibration left non-finite values in {name} (quantizer {owner})")


# ---- persistence -------------------------------------------------------------------------------------
def save_quantized(result: QuantResult, path: Path) -> None:
    """``state_dict`` as safetensors, the structure JSON in its metadata; written atomically."""
    # Cloned: safetensors refuses tensors that share storage (tied or aliased buffers).
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module_of(result.denoiser).state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"structure": json.dumps(result.structure)})


def load_quantized(method: QuantMethod, denoiser: Denoiser, bits: BitConfig, scope: Scope, path: Path,
                   device: torch.device | str = "cpu") -> Denoiser:
    """Rebuild the tree :func:`quantize_` made on the FP ``denoiser`` (modified in place) and load its state.

    Raises ``OSError``/``ValueError``/``RuntimeError`` for a file that does not load (truncated,
    foreign, or from a different structure).
    """
    with safe_open(str(path), framework="pt") as f:
        structure = json.loads((f.metadata() or {}).get("structure", "{}"))
    denoiser, _ = build(method, denoiser, bits, scope, structure)
    root = module_of(denoiser)
    root.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    freeze_all(root)
    root.requires_grad_(False)
    return denoiser
