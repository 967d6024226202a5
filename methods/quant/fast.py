"""Fast fake-quantized sampling: every run's fp32 sampling form where it is bit-identical to the eager
model (:mod:`harness.sampling_form` checks it per run); low precision and compilation are opt-in.

A calibrated, frozen quantized UNet is converted for sampling speed:

* :class:`FastQuantLayer` replaces each plain :class:`QuantLayer` (and :class:`OutputQuantLayer`,
  whose quantizer acts on the output): the fake-quantized weight
  is computed once and stored *instead of* the FP weight (same weight memory as FP),
  every range and flag is resolved at conversion, and the input activation goes through
  :func:`~methods.quant.base.fused_fake_quant` (quant-dequant in fp32, returned in the input's
  dtype: one pass over the tensor, eager or compiled). Its Python work per call is that of an
  ``nn.Conv2d``: no ``bool(tensor)`` (GPU syncs) and no per-layer timestep lookups.
* every input quantizer is converted through its :meth:`~methods.quant.base.Quantizer.fast_params`
  (static ranges, or per-step tables calibrated on the sampling schedule: ADP-DM, TDQ). Per-step
  tables stay on the device and are indexed with the timestep context's device tensor
  (:func:`methods.quant.timestep.step_tensor`), so graphs do not depend on the step value (no
  recompilation per step) and the lookup costs no host work per layer.
* :func:`fast_denoiser`: optional ``torch.compile`` of the whole UNet and optional
  bf16/fp16 autocast. Numerically safe split: the UNet body runs in the low precision,
  fake quantization math stays fp32 (a bf16 ``x / s`` would round to the wrong level), the
  UNet output is returned in fp32 (guidance and the sampler update run in fp32), and the
  autoencoder/text encoder are untouched.

Layers of other types (a method's own QuantLayer subclass) and quantizers without a static form
(``fast_params`` raises TypeError) are left as they are: correct, only not accelerated
(:func:`convert_quant_layers` reports how many were converted).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from methods.quant.base import FastParams, Quantizer, broadcast_channels, fused_fake_quant
from methods.quant.layers import OutputQuantLayer, QuantLayer
from methods.quant.timestep import step_tensor
from models.denoiser import Denoiser

DTYPES = {"fp32": None, "float32": None, "none": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def per_step(table: torch.Tensor) -> torch.Tensor:
    """Row ``step`` of a ``[S, ...]`` device table, indexed on the device."""
    return table.index_select(0, step_tensor(table.device)).squeeze(0)


# ---- layers -------------------------------------------------------------------------------------------------

def _act_params(q: nn.Module, timesteps: Sequence[int] | None) -> FastParams | None:
    """Static form of an input quantizer; None for an identity; TypeError when it has none."""
    if not isinstance(q, Quantizer):
        raise TypeError(type(q).__name__)
    return q.fast_params(timesteps)


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
        self.on_output = isinstance(layer, OutputQuantLayer)
        self.acts: list[dict] = []  # python constants per input quantizer: qmin, qmax, per_step, axis, reciprocal
        if layer.quant_act:
            params = [_act_params(q, timesteps) for q in layer.act_quantizers()]
            if all(p is not None for p in params):
                for i, p in enumerate(params):
                    self.register_buffer(f"act_scale_{i}", p.scale.float())
                    self.register_buffer(f"act_zero_{i}", p.zero_point.float())
                    self.acts.append(dict(qmin=int(p.qmin), qmax=int(p.qmax), per_step=p.per_step,
                                          axis=p.channel_axis, reciprocal=p.reciprocal))
            elif any(p is not None for p in params):
                raise TypeError("partially initialized split quantizers")
        self.num_act = len(self.acts)

    def _fq(self, x: torch.Tensor, i: int) -> torch.Tensor:
        a = self.acts[i]
        scale, zp = getattr(self, f"act_scale_{i}"), getattr(self, f"act_zero_{i}")
        if a["per_step"]:
            scale = broadcast_channels(per_step(scale), x, a["axis"])
            zp = broadcast_channels(per_step(zp), x, a["axis"])
        return fused_fake_quant(x, scale, zp, a["qmin"], a["qmax"], reciprocal=a["reciprocal"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_output:
            y = self._op(x)
            return self._fq(y, 0) if self.num_act else y
        if self.num_act == 1:
            x = self._fq(x, 0)
        elif self.num_act == 2:
            x = torch.cat([self._fq(x[:, : self.split], 0), self._fq(x[:, self.split :], 1)], 1)
        return self._op(x)

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        kind = "conv" if self.is_conv else "linear"
        per_step_ = any(a["per_step"] for a in self.acts)
        where = ", on output" if self.on_output else ""
        return f"{kind}, act_quantizers={self.num_act}{where}, per_step={per_step_}, split={self.split}"


@torch.no_grad()
def convert_quant_layers(unet: nn.Module, weight_dtype: torch.dtype | None = None,
                         timesteps: Sequence[int] | None = None) -> dict[str, int]:
    """Replace, in place, every plain QuantLayer or OutputQuantLayer by a FastQuantLayer; count converted
    and skipped layers.

    ``timesteps``: the sampling schedule; per-step quantizers are converted only when their
    tables were calibrated on exactly it (else they stay eager, which maps rows by timestep).
    """
    converted = skipped = 0
    for name, m in list(unet.named_modules()):
        if type(m) not in (QuantLayer, OutputQuantLayer):
            continue
        try:
            new = FastQuantLayer(m, weight_dtype, timesteps)
        except TypeError:
            skipped += 1
            continue
        unet.set_submodule(name, new.to(m.module.weight.device))
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
    """Wraps a UNet: runs it (compiled) under autocast, returns fp32 ``.sample``.

    The per-step tables read the step from the timestep context's device tensor, which the
    sampler's context keeps current: nothing to synchronise here.
    """

    def __init__(self, unet: nn.Module, dtype: torch.dtype | None = None, compile: bool = False,
                 compile_mode: str | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.dtype = dtype
        self.config = getattr(unet, "config", None)
        self._fn = torch.compile(unet, mode=compile_mode, dynamic=False) if compile else unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *args, **kwargs):
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
