"""``StepTableQuantizer``: an activation quantizer whose (scale, zero point) is a per-step table.

Methods with timestep-dependent activation quantization (ADP-DM's group mixtures, TDQ's
step-size MLP) fit their parameters during calibration with whatever machinery they
need, then *export* into this one inference-time module: a table of ``scale`` and
``zero_point`` of shape ``[S]`` (per tensor) or ``[S, C]`` (per input channel), plus
the ``timesteps`` ``[S]`` the rows were fitted for. The forward pass reads the sampler's
step from the timestep context and indexes the table: no search, no MLP, no overhead
beyond a lookup (a Python dict hit after the first call per step).

Which row serves a call ``(step_index, t, num_steps)``:

1. ``step_index`` when the row's timestep is ``t`` (the calibration schedule is the
   sampling schedule: the normal case);
2. otherwise the row whose timestep equals ``t`` (another step count or spacing that
   shares this timestep);
3. otherwise, if a ``fallback`` module is attached (TDQ's MLP), its parameters at ``t``
   (computed once per timestep and cached);
4. otherwise the row of the *nearest* calibrated timestep (ADP-DM: its per-step state is
   tied to the calibration schedule; sampling with another step count maps by timestep).

Everything lives in buffers (and the fallback's parameters), so a quantized model
survives both ``state_dict`` round trips (tables are resized on load, by the base class) and
``torch.save(module)`` / ``torch.load``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from methods.quant.base import FastParams, Quantizer, broadcast_channels, fake_quant, scale_zero_point
from methods.quant.timestep import require_step


def channel_axis_of(module: nn.Module) -> int:
    """Input-channel axis of a conv (NCHW: 1) or linear (``[..., C]``: -1) layer's input."""
    return 1 if isinstance(module, nn.Conv2d) else -1


def in_channels_of(module: nn.Module) -> int:
    return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features


class StepTableQuantizer(Quantizer):
    """Asymmetric (or symmetric) fake quantizer with one parameter set per sampler step."""

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        channel_axis: int | None = None,
        fallback: nn.Module | None = None,
    ) -> None:
        super().__init__(bits, symmetric, channel_axis)  # channel_axis: the input-channel axis, or None
        self.fallback = fallback  # optional: .params_at(t: LongTensor[K]) -> (scale, zero_point) rows
        self.register_buffer("scale", torch.ones(0))
        self.register_buffer("zero_point", torch.zeros(0))
        self.register_buffer("timesteps", torch.zeros(0, dtype=torch.long))
        self._cache: dict[tuple[int, int, int], object] = {}

    # ---- building -----------------------------------------------------------------
    @torch.no_grad()
    def set_tables(self, scale: torch.Tensor, zero_point: torch.Tensor, timesteps: list[int] | torch.Tensor) -> None:
        timesteps = torch.as_tensor(timesteps, dtype=torch.long).flatten()
        if scale.shape != zero_point.shape or scale.shape[0] != timesteps.numel():
            raise ValueError(
                f"tables disagree: scale {tuple(scale.shape)}, zero_point {tuple(zero_point.shape)}, "
                f"{timesteps.numel()} timesteps"
            )
        self.scale = scale.detach().float().clone()
        self.zero_point = zero_point.detach().float().clone()
        self.timesteps = timesteps.to(scale.device)
        self._cache = {}

    @torch.no_grad()
    def set_ranges(self, lo: torch.Tensor, hi: torch.Tensor, timesteps: list[int] | torch.Tensor) -> None:
        """Tables from per-step ranges ``lo``/``hi`` of shape ``[S]`` or ``[S, C]``."""
        scale, zp = scale_zero_point(lo.float(), hi.float(), self.bits, self.symmetric)
        self.set_tables(scale, zp, timesteps)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def ready(self) -> bool:
        return self.num_steps > 0

    def extra_repr(self) -> str:
        fb = ", fallback" if self.fallback is not None else ""
        return f"{self.granularity_repr()}, steps={self.num_steps}{fb}"

    # ---- lookup -------------------------------------------------------------------
    def row_for(self, step_index: int, t: int, num_steps: int) -> int | None:
        """The table row serving this call, or None when the fallback module should be used."""
        ts = self.timesteps.tolist()
        if 0 <= step_index < len(ts) and ts[step_index] == t:
            return step_index
        if t in ts:
            return ts.index(t)
        if self.fallback is not None:
            return None
        return min(range(len(ts)), key=lambda i: (abs(ts[i] - t), i))

    def params(self, step_index: int, t: int, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (step_index, t, num_steps)
        hit = self._cache.get(key)
        if hit is None:
            row = self.row_for(step_index, t, num_steps)
            if row is None:
                with torch.no_grad():
                    s, z = self.fallback.params_at(torch.tensor([t], device=self.scale.device))
                hit = (s[0].detach(), z[0].detach())
            else:
                hit = row
            self._cache[key] = hit
        if isinstance(hit, int):
            return self.scale[hit], self.zero_point[hit]
        return hit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        state = require_step()
        scale, zp = self.params(state.step_index, state.t, state.num_steps)
        qmin, qmax = self.qmin_qmax
        return fake_quant(
            x, broadcast_channels(scale, x, self.channel_axis), broadcast_channels(zp, x, self.channel_axis), qmin, qmax
        )

    @torch.no_grad()
    def fast_params(self, timesteps: Sequence[int] | None = None) -> FastParams | None:
        """Device tables, row = step index: only for tables fitted on exactly the sampling schedule.

        With another schedule, rows are found by timestep at each call, which the eager path does.
        A fallback module (TDQ's MLP) does not stand in the way: on the table's own schedule the
        eager path finds every timestep in the table and never calls it.
        """
        if not self.active:
            return None
        if timesteps is None or self.timesteps.tolist() != [int(t) for t in timesteps]:
            raise TypeError("step table does not match the sampling schedule")
        qmin, qmax = self.qmin_qmax
        # reciprocal=False: x / s, the rounding of fake_quant that the eager forward uses.
        return FastParams(self.scale.detach().float().clone(), self.zero_point.detach().float().clone(), qmin, qmax,
                          per_step=True, channel_axis=self.channel_axis, reciprocal=False)

    # ---- persistence --------------------------------------------------------------
    # Cached rows are views of (or computed from) the tables: drop them when the tables change.
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._cache = {}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._cache = {}  # cached fallback rows would stay on the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._cache = {}
