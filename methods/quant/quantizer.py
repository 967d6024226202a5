"""``UniformQuantizer``: a static uniform affine fake quantizer, the one most methods build on.

The arithmetic and its conventions (grids, zero points, 16 bits = off) are in
:mod:`methods.quant.base`; this module adds the range: fitted from data by ``minmax`` or
``mse``, the latter a grid search over shrunken ranges minimising the L_p error (p = 2.4 in
PTQ4DM Table 4 and Q-Diffusion's code), or ``qdrop`` (QDrop's 1-D search, PTQ4DM's released
code: thresholds max|x| * i / 100, i = 1..100, range [-thr, thr], or [0, thr] / [-thr, 0] for
one-signed data, on the 2^b-level affine grid), or learned as an LSQ step by reconstruction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from methods.quant.base import (
    OFF_BITS,
    FastParams,
    Quantizer,
    broadcast_channels,
    fake_quant,
    fused_fake_quant,
    qrange,
    round_ste,
    scale_zero_point,
)

# The arithmetic is re-exported: methods and tests import it from here.
__all__ = ["OFF_BITS", "UniformQuantizer", "fake_quant", "fused_fake_quant", "qrange", "round_ste",
           "scale_zero_point"]

_MSE_GRID = 80  # candidates 1.00, 0.99, ..., 0.21 of the min-max range (Q-Diffusion's grid)
_QDROP_GRID = 100  # thresholds max|x| * i / 100, i = 1..100 (QDrop's perform_1D_search)
RANGE_METHODS = ("minmax", "mse", "qdrop")


def _reduce_dims(x: torch.Tensor, channel_axis: int | None) -> list[int]:
    return [d for d in range(x.dim()) if d != (channel_axis % x.dim() if channel_axis is not None else None)]


class UniformQuantizer(Quantizer):
    """A fake quantizer with its range as buffers, or as a learnable step (LSQ).

    Call :meth:`init_range` once on representative data before use; until then the
    quantizer passes its input through unchanged (``initialized`` is False).
    """

    def __init__(
        self, bits: int = 8, symmetric: bool = False, channel_axis: int | None = None, learnable: bool = False
    ) -> None:
        if not (2 <= bits <= 8 or bits >= OFF_BITS):
            raise ValueError(f"bits must be 2..8 (or {OFF_BITS}+ for off), got {bits}")
        super().__init__(bits, symmetric, channel_axis)
        self.learnable = learnable
        self.register_buffer("zero_point", torch.zeros(()))
        if learnable:
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("scale", torch.ones(()))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def ready(self) -> bool:
        return bool(self.initialized)

    def extra_repr(self) -> str:
        return f"{self.granularity_repr()}, learnable={self.learnable}"

    # ---- range ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor, like: torch.Tensor | None = None) -> None:
        scale, zp = scale_zero_point(lo.float(), hi.float(), self.bits, self.symmetric)
        if like is not None:
            scale = broadcast_channels(scale, like, self.channel_axis)
            zp = broadcast_channels(zp, like, self.channel_axis)
        if self.learnable:
            self.scale = nn.Parameter(scale.clone())
        else:
            self.scale = scale.clone()
        self.zero_point = zp.clone()
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_range(self, x: torch.Tensor, method: str = "minmax", p: float = 2.4) -> None:
        """Set the range from data: ``minmax``, ``mse`` (L_p grid search) or ``qdrop`` (QDrop's 1-D search)."""
        if self.bits >= OFF_BITS:
            return
        x = x.detach().float()
        self.set_range(*self.fit_range(x, method, p), like=x)

    @torch.no_grad()
    def fit_range(self, x: torch.Tensor, method: str = "minmax", p: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
        """The range ``(lo, hi)`` (per channel along ``channel_axis``) that ``method`` fits to ``x``; sets nothing."""
        x = x.detach().float()
        dims = _reduce_dims(x, self.channel_axis)
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        if method == "minmax":
            return lo, hi
        if method == "mse":
            return self._search_lp(x, lo, hi, p, dims)
        if method == "qdrop":
            return self._search_qdrop(x, lo, hi, p, dims)
        raise ValueError(f"unknown range init {method!r}: use one of {', '.join(RANGE_METHODS)}")

    def _search_qdrop(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p: float, dims: list[int]):
        """QDrop's ``perform_1D_search``: thr = max|x| * i / 100; range [-thr, thr] ([0, thr] if x >= 0,
        [-thr, 0] if x <= 0); least mean L_p error per channel. Meant for an asymmetric-arithmetic
        quantizer (``symmetric=False``): QDrop's "symmetric" is 2^b levels on [-thr, thr]."""
        absmax = torch.maximum(lo.abs(), hi.abs())
        pos, neg = lo >= 0, hi <= 0

        def candidates():
            for i in range(1, _QDROP_GRID + 1):
                thr = absmax * i / _QDROP_GRID
                yield torch.where(pos, torch.zeros_like(thr), -thr), torch.where(neg, torch.zeros_like(thr), thr)

        return self._least_lp(x, lo, hi, candidates(), p, dims)

    def _search_lp(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p: float, dims: list[int]):
        """Shrink the min-max range by 1%, 2%, ... and keep, per channel, the one with least L_p error."""
        ratios = (1.0 - 0.01 * i for i in range(_MSE_GRID))
        return self._least_lp(x, lo, hi, ((lo * r, hi * r) for r in ratios), p, dims)

    def _least_lp(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, candidates, p: float,
                  dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the candidate range ``(c_lo, c_hi)`` whose fake quantization has the least mean L_p
        error on ``x`` (the first one on ties); ``(lo, hi)`` when no candidate is finite."""
        qmin, qmax = self.qmin_qmax
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for c_lo, c_hi in candidates:
            s, z = scale_zero_point(c_lo, c_hi, self.bits, self.symmetric)
            s, z = broadcast_channels(s, x, self.channel_axis), broadcast_channels(z, x, self.channel_axis)
            err = (fake_quant(x, s, z, qmin, qmax) - x).abs().pow(p).mean(dim=dims)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
        return best_lo, best_hi

    # ---- LSQ --------------------------------------------------------------------------------------------
    def learnable_step(self) -> nn.Parameter:
        """The step as an LSQ parameter (the zero point stays fixed)."""
        if not self.learnable:
            self.scale = nn.Parameter(self.scale.detach().clone())
            self.learnable = True
        return self.scale

    @torch.no_grad()
    def settle_step(self) -> None:
        # Training quantizes with |s| but the fused inference kernel with s: store what training
        # saw, so a step pushed through zero by the optimiser cannot flip the grid.
        self.scale.data = self.scale.data.abs().clamp_min(1e-8)
        self.scale.requires_grad_(False)

    def _step(self) -> torch.Tensor:
        return self.scale.abs().clamp_min(1e-8) if self.learnable else self.scale

    # ---- inference --------------------------------------------------------------------------------------
    @torch.no_grad()
    def fast_params(self, timesteps: Sequence[int] | None = None) -> FastParams | None:
        if not self.active:
            return None
        qmin, qmax = self.qmin_qmax
        # Ranges are stored shaped to broadcast against the input they were fitted on.
        return FastParams(self._step().detach().float().clone(), self.zero_point.detach().float().clone(), qmin, qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        qmin, qmax = self.qmin_qmax
        if torch.is_grad_enabled() and (x.requires_grad or self.learnable):
            # Calibration: the differentiable path (STE rounding; LSQ gradient for a learnable step).
            return fake_quant(x, self._step(), self.zero_point, qmin, qmax)
        # Inference: one fused pass over the tensor.
        return fused_fake_quant(x, broadcast_channels(self.scale.detach(), x, self.channel_axis),
                                broadcast_channels(self.zero_point, x, self.channel_axis), qmin, qmax)
