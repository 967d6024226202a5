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
_CHUNK_ELEMENTS = 1 << 22  # per-channel range search: candidates x values evaluated per tensor op
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

        thr = absmax[None] * torch.arange(1, _QDROP_GRID + 1, dtype=absmax.dtype, device=absmax.device).view(
            -1, *([1] * absmax.dim())) / _QDROP_GRID
        zero = torch.zeros_like(thr)
        return self._least_lp(x, lo, hi, torch.where(pos, zero, -thr), torch.where(neg, zero, thr), p, dims)

    def _search_lp(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p: float, dims: list[int]):
        """Shrink the min-max range by 1%, 2%, ... and keep, per channel, the one with least L_p error."""
        ratios = torch.tensor([1.0 - 0.01 * i for i in range(_MSE_GRID)], dtype=lo.dtype, device=lo.device)
        ratios = ratios.view(-1, *([1] * lo.dim()))
        return self._least_lp(x, lo, hi, lo[None] * ratios, hi[None] * ratios, p, dims)

    def _least_lp(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, cand_lo: torch.Tensor,
                  cand_hi: torch.Tensor, p: float, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the candidate range ``(cand_lo[c], cand_hi[c])`` (candidates along dim 0) whose fake
        quantization has the least mean L_p error on ``x`` (the first one on ties); ``(lo, hi)`` when no
        candidate is finite."""
        qmin, qmax = self.qmin_qmax
        s, z = scale_zero_point(cand_lo, cand_hi, self.bits, self.symmetric)

        def lp(xs, sc, zc, reduce):
            return (fake_quant(xs, sc, zc, qmin, qmax) - xs).abs().pow(p).mean(dim=reduce)

        if self.channel_axis is None:
            # per tensor: one candidate at a time with scalar scale/zero point (cache-friendly, fastest)
            errs = [lp(x, s[c], z[c], dims)[None] for c in range(s.shape[0])]
        else:
            # per channel: candidates batched along a new dim 0 (a Python loop per candidate was the slow part)
            def per_candidate(v: torch.Tensor) -> torch.Tensor:
                b = torch.stack([broadcast_channels(u, x, self.channel_axis) for u in v])
                return b.reshape(b.shape[0], *([1] * (x.dim() + 1 - b.dim())), *b.shape[1:])

            s, z = per_candidate(s), per_candidate(z)
            chunk = max(1, _CHUNK_ELEMENTS // max(1, x.numel()))
            reduce = [d + 1 for d in dims]
            errs = [lp(x[None], s[c:c + chunk], z[c:c + chunk], reduce) for c in range(0, s.shape[0], chunk)]
        err = torch.cat(errs).nan_to_num(nan=float("inf"))
        best = err.argmin(dim=0, keepdim=True)  # the first minimum: the earliest candidate wins a tie
        found = torch.isfinite(err.gather(0, best))[0]
        best_lo, best_hi = cand_lo.gather(0, best)[0], cand_hi.gather(0, best)[0]
        return torch.where(found, best_lo, lo), torch.where(found, best_hi, hi)

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
