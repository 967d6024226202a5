"""The fake-quant arithmetic every quantizer shares, and :class:`Quantizer`, the base class they all derive from.

``q(x) = s * (clamp(round(x / s) + z, qmin, qmax) - z)``, with ``round`` passed straight
through in the backward pass (Bengio et al., 2013), so a learnable step ``s`` gets the LSQ
gradient (Esser et al., ICLR 2020, Eq. 3) for free.

Conventions (unit-tested against hand-computed values in tests/test_quantizer.py):

* symmetric: ``z = 0``, levels ``[-2^(b-1), 2^(b-1) - 1]``, ``s = max|x| / (2^(b-1) - 1)``;
* asymmetric: levels ``[0, 2^b - 1]``, the range widened to contain 0 (so zero is exact,
  as padding needs), ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``;
* per-tensor (``channel_axis=None``) or per-channel along ``channel_axis``;
* 16 bits or more means "off": the quantizer is the identity.

A :class:`Quantizer` only transforms a tensor. How its parameters were found (min-max,
an L_p search, a mixture, an MLP) is its own business; what it shares with the others is
declared here once: the bit width and grid, the on/off switch, state-dict loading into a
freshly built instance, the step LSQ may learn, and the static form the fast sampling path
(:mod:`methods.quant.fast`) compiles it into.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

OFF_BITS = 16


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The differentiable quant-dequant (calibration): STE rounding, so ``scale`` gets the LSQ gradient."""
    return (torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def fused_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, *,
                     reciprocal: bool = True) -> torch.Tensor:
    """Inference quant-dequant in fp32, returned in ``x``'s dtype; ``scale``/``zero_point`` broadcast against ``x``.

    ``reciprocal=True``: ``s * (clamp(round(x * (1/s)) + z, qmin, qmax) - z)``, the arithmetic of
    PyTorch's ``fake_quantize_per_{tensor,channel}_affine``. ``reciprocal=False``: ``round(x / s)``,
    bit-identical to :func:`fake_quant` (whose STE ``(round(y) - y) + y`` is exact), the rounding
    per-step tables were calibrated with. The two differ only where ``x / s`` lies within an ulp of
    a rounding boundary, so each quantizer keeps the one it was calibrated with.

    How it is computed (same values every way, ``tests/test_fast_quant.py``): on GPUs the native
    kernel (one pass over the tensor); in compiled graphs the elementwise formula (Inductor fuses it
    into one kernel, which it cannot do with the native op); on CPUs the elementwise formula applied
    in place on one fresh tensor, because there the native kernels are single-threaded and 10-15x
    slower than that (6.7 ms against 0.54 ms on a 64x128x16x16 tensor, 2 threads; they were a fifth
    of a fake-quant run's sampling time). Out of place the formula allocates four tensors per call,
    which costs as much as the native kernel; in place needs no autograd, which inference has not.
    """
    compiling = torch.compiler.is_compiling()
    if reciprocal and not compiling and x.device.type != "cpu":
        out = _native_fake_quant(x.float(), scale.float(), zero_point.to(torch.int32), qmin, qmax)
        if out is not None:
            return out.to(x.dtype)
    xf = x.float()
    y = xf * torch.reciprocal(scale) if reciprocal else xf / scale  # a fresh tensor: x is never written
    if compiling or (torch.is_grad_enabled() and (y.requires_grad or zero_point.requires_grad)):
        q = torch.clamp(torch.round(y) + zero_point, qmin, qmax)
        return ((q - zero_point) * scale).to(x.dtype)
    return y.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale).to(x.dtype)


def _native_fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int):
    """PyTorch's kernels for one scale or a ``[1, .., C, .., 1]`` one; None for shapes they cannot take."""
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp.reshape(()), qmin, qmax)
    axes = [d for d, n in enumerate(scale.shape) if n != 1]
    if scale.dim() != x.dim() or len(axes) != 1:
        return None
    return torch.fake_quantize_per_channel_affine(x, scale.flatten(), zp.flatten(), axes[0], qmin, qmax)


def scale_zero_point(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero point that map the range [lo, hi] onto the integer grid."""
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs()).clamp_min(1e-8)
        return amax / (2 ** (bits - 1) - 1), torch.zeros_like(amax)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    return scale, (-lo / scale).round()


def broadcast_channels(v: torch.Tensor, x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    """Per-tensor ``[]`` or per-channel ``[C]`` parameters shaped to broadcast against ``x``."""
    if channel_axis is None or v.dim() == 0:
        return v.reshape(())
    shape = [1] * x.dim()
    shape[channel_axis % x.dim()] = -1
    return v.reshape(shape)


@dataclass
class FastParams:
    """A quantizer in the static form :class:`methods.quant.fast.FastQuantLayer` runs.

    ``per_step``: ``scale``/``zero_point`` are ``[S, ...]`` tables indexed by the sampler's step
    index (rows = the sampling schedule), broadcast along ``channel_axis``; otherwise they are
    already shaped to broadcast against the input. ``reciprocal``: see :func:`fused_fake_quant`.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    per_step: bool = False
    channel_axis: int | None = None
    reciprocal: bool = True


class Quantizer(nn.Module):
    """A fake quantizer: ``bits`` on a ``symmetric`` or asymmetric grid, per tensor or along ``channel_axis``.

    Subclasses implement ``forward`` (returning the input unchanged unless :attr:`active`) and,
    where they can, :attr:`ready`, :meth:`learnable_step` and :meth:`fast_params`.
    """

    def __init__(self, bits: int, symmetric: bool = False, channel_axis: int | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.channel_axis = channel_axis  # None: per tensor; else the axis of the per-channel parameters
        self.enabled = True  # the switch :func:`methods.quant.layers.quantizers_disabled` flips

    # ---- state ------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether the parameters have been fitted (an unfitted quantizer passes its input through)."""
        return True

    @property
    def active(self) -> bool:
        return self.enabled and self.bits < OFF_BITS and self.ready

    @property
    def qmin_qmax(self) -> tuple[int, int]:
        return qrange(self.bits, self.symmetric)

    def granularity_repr(self) -> str:
        gran = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}, {gran}"

    # ---- hooks for reconstruction and fast sampling -----------------------------------------------------
    def learnable_step(self) -> nn.Parameter | None:
        """The step size as a parameter LSQ may train (made one if needed), or None: nothing to learn.

        Reconstruction (:mod:`methods.quant.recon`) trains what this returns, then calls :meth:`settle_step`.
        """
        return None

    def settle_step(self) -> None:
        """After LSQ: store the step the way inference reads it and stop its gradient."""

    def fast_params(self, timesteps: Sequence[int] | None = None) -> FastParams | None:
        """This quantizer's static inference form; None when it is the identity.

        ``timesteps``: the sampling schedule (per-step tables must have been fitted on exactly it).
        Raises TypeError when the quantizer has no static form: its layer then stays eager.
        """
        raise TypeError(f"{type(self).__name__} has no static inference form")

    # ---- persistence ------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Parameter shapes come from the data they were fitted on (per-tensor vs per-channel
        # ranges, tables of S steps): take the saved shapes, so a quantized model reloads into
        # freshly built quantizers. Only this module's own tensors; submodules load themselves.
        for name, table in (("parameters", self._parameters), ("buffers", self._buffers)):
            for key, current in list(table.items()):
                saved = state_dict.get(prefix + key)
                if saved is None or (current is not None and current.shape == saved.shape):
                    continue
                if key in self._non_persistent_buffers_set:
                    continue
                fresh = torch.empty_like(saved)
                if name == "parameters":
                    fresh = nn.Parameter(fresh, requires_grad=current.requires_grad if current is not None else True)
                setattr(self, key, fresh)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
