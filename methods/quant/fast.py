"""Fast fake-quantized sampling (opt-in; the default CPU path never comes here).

A calibrated, frozen quantized UNet is converted for sampling speed:

* :class:`FastQuantLayer` replaces each plain :class:`QuantLayer`: the fake-quantized weight
  is computed once and stored *instead of* the FP weight (same weight memory as FP),
  every range and flag is resolved at conversion, and the input activation goes through
  :func:`fused_fake_quant` (quant-dequant in fp32, returned in the input's dtype: one
  elementwise kernel under ``torch.compile``). Its Python work per call is that of an
  ``nn.Conv2d``: no ``bool(tensor)`` (GPU syncs) and no per-layer timestep lookups.
* per-timestep parameters: ``StepTableQuantizer`` tables (ADP-DM, TDQ) calibrated on the
  sampling schedule, or any quantizer exposing ``fast_params() -> (scale[S, ...],
  zero_point[S, ...], qmin, qmax, channel_axis)``, keep their tables on the device; the layer indexes them
  with one shared device tensor (:func:`step_tensor`) that the wrapper fills once per
  denoiser call from the sampler's timestep context. Graphs therefore do not depend on
  the step value (no recompilation per step) and the lookup costs no host work per layer.
* :func:`fast_denoiser`: optional ``torch.compile`` of the whole UNet and optional
  bf16/fp16 autocast. Numerically safe split: the UNet body runs in the low precision,
  fake quantization math stays fp32 (a bf16 ``x / s`` would round to the wrong level), the
  UNet output is returned in fp32 (guidance and the sampler update run in fp32), and the
  autoencoder/text encoder are untouched.

Layers of other types (a method's own QuantLayer subclass, attention-matmul quantizers,
quantizers of unknown type without ``fast_params``) are left as they are: correct, only
not accelerated (:func:`convert_quant_layers` reports how many were converted).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from methods.quant.layers import QuantLayer
from methods.quant.quantizer import UniformQuantizer, qrange
from methods.quant.step_table import StepTableQuantizer, broadcast_channels
from methods.quant.timestep import current_step
from models.denoiser import Denoiser

DTYPES = {"fp32": None, "float32": None, "none": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

_STEP: dict[str, torch.Tensor] = {}


def fused_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                     reciprocal: bool = True) -> torch.Tensor:
    """Inference quant-dequant in fp32, cast back to x's dtype: one elementwise kernel under ``torch.compile``.

    ``reciprocal=True``: ``s * (clamp(round(x * (1/s)) + z, qmin, qmax) - z)``, the arithmetic of
    PyTorch's ``fake_quantize_per_*_affine`` kernels that ``UniformQuantizer`` uses at inference
    (bit-identical to it). ``reciprocal=False``: ``round(x / s)``, bit-identical to
    :func:`methods.quant.quantizer.fake_quant` (whose STE ``(round(y) - y) + y`` is exact), as
    ``StepTableQuantizer`` computes. The two differ only where ``x / s`` lies within an ulp of a
    rounding boundary. Scales and zero points broadcast against ``x`` (per tensor or per channel).
    """
    xf = x.float()
    y = xf * torch.reciprocal(scale) if reciprocal else xf / scale
    q = torch.clamp(torch.round(y) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


# ---- the device-side step index -----------------------------------------------------------------------------

def step_tensor(device: torch.device | str) -> torch.Tensor:
    """The shared ``[1]`` long tensor holding the current step index on ``device``."""
    key = str(torch.device(device))
    t = _STEP.get(key)
    if t is None:
        t = _STEP[key] = torch.zeros(1, dtype=torch.long, device=device)
    return t


def sync_step(device: torch.device | str) -> None:
    """Copy the timestep context's step index into the device tensor (once per denoiser call)."""
    state = current_step()
    if state is not None:
        step_tensor(device).fill_(state.step_index)


def per_step(table: torch.Tensor) -> torch.Tensor:
    """Row ``step`` of a ``[S, ...]`` device table, indexed on the device."""
    return table.index_select(0, step_tensor(table.device)).squeeze(0)


# ---- layers -------------------------------------------------------------------------------------------------

def _act_params(q: nn.Module, timesteps: Sequence[int] | None) -> dict | None:
    """Fast parameters of an input quantizer; None for an identity; TypeError when it cannot be converted.

    ``UniformQuantizer``: static range. ``StepTableQuantizer`` without a fallback module, whose
    table rows are exactly the sampling ``timesteps``: per-step device tables (row = step index).
    Anything else with ``fast_params() -> (scale[S, ...], zero_point[S, ...], qmin, qmax,
    channel_axis)`` (rows = step indices of the sampling schedule): per-step tables as well.
    """
    if type(q) is UniformQuantizer:
        if not q.active:
            return None
        scale = q.scale.detach().abs().clamp_min(1e-8) if q.learnable else q.scale.detach()
        qmin, qmax = q.qmin_qmax
        return dict(scale=scale.float().clone(), zero=q.zero_point.detach().float().clone(), qmin=qmin, qmax=qmax,
                    per_step=False, axis=None, reciprocal=True)  # already shaped to broadcast
    if type(q) is StepTableQuantizer:
        if not q.active:
            return None
        if q.fallback is not None or timesteps is None or q.timesteps.tolist() != [int(t) for t in timesteps]:
            raise TypeError("step table does not match the sampling schedule")
        qmin, qmax = qrange(q.bits, q.symmetric)
        return dict(scale=q.scale.detach().float().clone(), zero=q.zero_point.detach().float().clone(), qmin=qmin,
                    qmax=qmax, per_step=True, axis=q.channel_axis, reciprocal=False)
    fast = getattr(q, "fast_params", None)
    if callable(fast):
        scale, zp, qmin, qmax, axis = fast()
        return dict(scale=scale.detach().float(), zero=zp.detach().float(), qmin=int(qmin), qmax=int(qmax),
                    per_step=True, axis=axis, reciprocal=False)
    raise TypeError(type(q).__name__)


class FastQuantLayer(nn.Module):
    """A frozen :class:`QuantLayer` for sampling: precomputed fake-quant weight + fused input fake-quant."""

    def __init__(self, layer: QuantLayer, weight_dtype: torch.dtype | None = None,
                 timesteps: Sequence[int] | None = None) -> None:
        super().__init__()
        m = layer.module
        self.is_conv = isinstance(m, nn.Conv2d)
        if self.is_conv:
            self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
        with torch.no_grad():
            if not layer.quant_weight:
                w = m.weight
            elif layer.frozen_weight is not None:
                w = layer.frozen_weight
            else:
                w = layer.quantized_weight()
            dtype = weight_dtype or w.dtype
            self.weight = nn.Parameter(w.detach().to(dtype).clone(), requires_grad=False)
            self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().to(dtype).clone(),
                                                                   requires_grad=False)
        self.split = layer.split
        self.acts: list[dict] = []  # python constants per input quantizer: qmin, qmax, per_step, axis, reciprocal
        if layer.quant_act:
            params = [_act_params(q, timesteps) for q in layer.act_quantizers()]
            if all(p is not None for p in params):
                for i, p in enumerate(params):
                    self.register_buffer(f"act_scale_{i}", p.pop("scale"))
                    self.register_buffer(f"act_zero_{i}", p.pop("zero"))
                    self.acts.append(p)
            elif any(p is not None for p in params):
                raise TypeError("partially initialized split quantizers")
        self.num_act = len(self.acts)

    def _fq(self, x: torch.Tensor, i: int) -> torch.Tensor:
        a = self.acts[i]
        scale, zp = getattr(self, f"act_scale_{i}"), getattr(self, f"act_zero_{i}")
        if a["per_step"]:
            scale = broadcast_channels(per_step(scale), x, a["axis"])
            zp = broadcast_channels(per_step(zp), x, a["axis"])
        return fused_fake_quant(x, scale, zp, a["qmin"], a["qmax"], a["reciprocal"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_act == 1:
            x = self._fq(x, 0)
        elif self.num_act == 2:
            x = torch.cat([self._fq(x[:, : self.split], 0), self._fq(x[:, self.split :], 1)], 1)
        if self.is_conv:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        kind = "conv" if self.is_conv else "linear"
        per_step_ = any(a["per_step"] for a in self.acts)
        return f"{kind}, act_quantizers={self.num_act}, per_step={per_step_}, split={self.split}"


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


@torch.no_grad()
def convert_quant_layers(unet: nn.Module, weight_dtype: torch.dtype | None = None,
                         timesteps: Sequence[int] | None = None) -> dict[str, int]:
    """Replace, in place, every plain QuantLayer by a FastQuantLayer; count converted and skipped layers.

    ``timesteps``: the sampling schedule; per-step quantizers are converted only when their
    tables were calibrated on exactly it (else they stay eager, which maps rows by timestep).
    """
    converted = skipped = 0
    for name, m in list(unet.named_modules()):
        if type(m) is not QuantLayer:
            continue
        try:
            new = FastQuantLayer(m, weight_dtype, timesteps)
        except TypeError:
            skipped += 1
            continue
        _set_submodule(unet, name, new.to(m.module.weight.device))
        converted += 1
    return {"converted": converted, "skipped": skipped}


@torch.no_grad()
def _cast_weights(unet: nn.Module, dtype: torch.dtype) -> None:
    """Store conv/linear weights in the autocast dtype, so autocast does not re-cast them on every call."""
    for m in unet.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | FastQuantLayer):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)


class FastUNet(nn.Module):
    """Wraps a UNet: syncs the device step index, runs (compiled) under autocast, returns fp32 ``.sample``."""

    def __init__(self, unet: nn.Module, dtype: torch.dtype | None = None, compile: bool = False,
                 compile_mode: str | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.dtype = dtype
        self.config = getattr(unet, "config", None)
        self._fn = torch.compile(unet, mode=compile_mode, dynamic=False) if compile else unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *args, **kwargs):
        sync_step(sample.device)
        with torch.autocast(sample.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self._fn(sample, timestep, *args, **kwargs)
        return SimpleNamespace(sample=out.sample.float())


def fast_denoiser(denoiser: Denoiser, *, dtype: torch.dtype | str | None = None, compile: bool = False,
                  compile_mode: str | None = None, inplace: bool = False, timesteps: Sequence[int] | None = None,
                  ) -> tuple[Denoiser, dict[str, int]]:
    """A sampling-only Denoiser: FastQuantLayers, optional low-precision autocast and ``torch.compile``.

    ``inplace=True`` converts ``denoiser.unet`` itself (no second copy in memory; the method's
    QuantLayers, and so further calibration, are gone). Works on FP denoisers too (no QuantLayers),
    so FP and fake-quant sampling can be timed on the same footing. ``timesteps`` (the sampling
    schedule) lets per-step quantizers calibrated on that schedule use device tables.
    """
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    unet = denoiser.unet if inplace else copy.deepcopy(denoiser.unet)
    report = convert_quant_layers(unet, dtype, timesteps)
    if dtype is not None:
        _cast_weights(unet, dtype)
    return denoiser.with_unet(FastUNet(unet, dtype, compile, compile_mode)), report
