"""Uniform affine fake quantization: the one quantizer every method builds on.

``q(x) = s * (clamp(round(x / s) + z, qmin, qmax) - z)``, with ``round`` passed
straight through in the backward pass (Bengio et al., 2013), so a learnable step
``s`` gets the LSQ gradient (Esser et al., ICLR 2020, Eq. 3) for free.

Conventions (unit-tested against hand-computed values in tests/test_quantizer.py):

* symmetric: ``z = 0``, levels ``[-2^(b-1), 2^(b-1) - 1]``, ``s = max|x| / (2^(b-1) - 1)``;
* asymmetric: levels ``[0, 2^b - 1]``, the range widened to contain 0 (so zero is exact,
  as padding needs), ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``;
* per-tensor (``channel_axis=None``) or per-channel along ``channel_axis``;
* 16 bits or more means "off": the quantizer is the identity.

Range initialisation: ``minmax`` or ``mse``, the latter a grid search over shrunken
ranges minimising the L_p error (p = 2.4 in PTQ4DM Table 4 and Q-Diffusion's code).
"""

from __future__ import annotations

import torch
from torch import nn

OFF_BITS = 16
_MSE_GRID = 80  # candidates 1.00, 0.99, ..., 0.21 of the min-max range (Q-Diffusion's grid)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def fused_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, channel_axis: int | None
) -> torch.Tensor:
    """Same values as :func:`fake_quant` via ``torch.fake_quantize_per_{tensor,channel}_affine``."""
    dtype = x.dtype
    x = x.float()
    zp = zero_point.to(torch.int32)
    if channel_axis is None or scale.numel() == 1:
        out = torch.fake_quantize_per_tensor_affine(x, scale.float().reshape(()), zp.reshape(()), qmin, qmax)
    else:
        out = torch.fake_quantize_per_channel_affine(x, scale.float().flatten(), zp.flatten(),
                                                     channel_axis % x.dim(), qmin, qmax)
    return out.to(dtype)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


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


def _reduce_dims(x: torch.Tensor, channel_axis: int | None) -> list[int]:
    return [d for d in range(x.dim()) if d != (channel_axis % x.dim() if channel_axis is not None else None)]


def _broadcast(v: torch.Tensor, x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    if channel_axis is None:
        return v.reshape(())
    shape = [1] * x.dim()
    shape[channel_axis] = -1
    return v.reshape(shape)


class UniformQuantizer(nn.Module):
    """A fake quantizer with its range as buffers, or as a learnable step (LSQ).

    Call :meth:`init_range` once on representative data before use; until then the
    quantizer passes its input through unchanged (``initialized`` is False).
    """

    def __init__(
        self, bits: int = 8, symmetric: bool = False, channel_axis: int | None = None, learnable: bool = False
    ) -> None:
        super().__init__()
        if not (2 <= bits <= 8 or bits >= OFF_BITS):
            raise ValueError(f"bits must be 2..8 (or {OFF_BITS}+ for off), got {bits}")
        self.bits = bits
        self.symmetric = symmetric
        self.channel_axis = channel_axis
        self.learnable = learnable
        self.enabled = True
        self.register_buffer("zero_point", torch.zeros(()))
        if learnable:
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("scale", torch.ones(()))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def active(self) -> bool:
        return self.enabled and self.bits < OFF_BITS and bool(self.initialized)

    @property
    def qmin_qmax(self) -> tuple[int, int]:
        return qrange(self.bits, self.symmetric)

    def extra_repr(self) -> str:
        gran = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        kind = "sym" if self.symmetric else "asym"
        return f"bits={self.bits}, {kind}, {gran}, learnable={self.learnable}"

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor, like: torch.Tensor | None = None) -> None:
        scale, zp = scale_zero_point(lo.float(), hi.float(), self.bits, self.symmetric)
        if like is not None:
            scale, zp = _broadcast(scale, like, self.channel_axis), _broadcast(zp, like, self.channel_axis)
        if self.learnable:
            self.scale = nn.Parameter(scale.clone())
        else:
            self.scale = scale.clone()
        self.zero_point = zp.clone()
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_range(self, x: torch.Tensor, method: str = "minmax", p: float = 2.4) -> None:
        """Set the range from data: ``minmax`` or ``mse`` (L_p grid search)."""
        if self.bits >= OFF_BITS:
            return
        x = x.detach().float()
        dims = _reduce_dims(x, self.channel_axis)
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        if method == "minmax":
            self.set_range(lo, hi, like=x)
        elif method == "mse":
            self.set_range(*self._search_lp(x, lo, hi, p, dims), like=x)
        else:
            raise ValueError(f"unknown range init {method!r}: use 'minmax' or 'mse'")

    def _search_lp(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p: float, dims: list[int]):
        """Shrink the min-max range by 1%, 2%, ... and keep, per channel, the one with least L_p error."""
        qmin, qmax = self.qmin_qmax
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(_MSE_GRID):
            ratio = 1.0 - 0.01 * i
            c_lo, c_hi = lo * ratio, hi * ratio
            s, z = scale_zero_point(c_lo, c_hi, self.bits, self.symmetric)
            s, z = _broadcast(s, x, self.channel_axis), _broadcast(z, x, self.channel_axis)
            err = (fake_quant(x, s, z, qmin, qmax) - x).abs().pow(p).mean(dim=dims)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
        return best_lo, best_hi

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Ranges are shaped by the data they were fitted on (per-tensor vs per-channel):
        # take the saved shapes so a quantized model reloads into a fresh wrapper.
        for name in ("scale", "zero_point"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                if name == "scale" and self.learnable:
                    self.scale = nn.Parameter(torch.empty_like(saved))
                else:
                    setattr(self, name, torch.empty_like(saved))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        qmin, qmax = self.qmin_qmax
        if torch.is_grad_enabled() and (x.requires_grad or self.learnable):
            # Calibration: the differentiable path (STE rounding; LSQ gradient for a learnable step).
            scale = self.scale.abs().clamp_min(1e-8) if self.learnable else self.scale
            return fake_quant(x, scale, self.zero_point, qmin, qmax)
        # Inference: PyTorch's fused quantize-dequantize kernel, one pass over the tensor.
        return fused_fake_quant(x, self.scale.detach(), self.zero_point, qmin, qmax, self.channel_axis)
