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
survives both ``state_dict`` round trips (tables are resized on load) and
``torch.save(module)`` / ``torch.load``.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.quant.quantizer import OFF_BITS, fake_quant, qrange, scale_zero_point
from methods.quant.timestep import require_step

_TABLES = ("scale", "zero_point", "timesteps")


def channel_axis_of(module: nn.Module) -> int:
    """Input-channel axis of a conv (NCHW: 1) or linear (``[..., C]``: -1) layer's input."""
    return 1 if isinstance(module, nn.Conv2d) else -1


def in_channels_of(module: nn.Module) -> int:
    return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features


def broadcast_channels(v: torch.Tensor, x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    """Per-tensor ``[]`` or per-channel ``[C]`` parameters shaped to broadcast against ``x``."""
    if channel_axis is None or v.dim() == 0:
        return v.reshape(())
    shape = [1] * x.dim()
    shape[channel_axis % x.dim()] = -1
    return v.reshape(shape)


class StepTableQuantizer(nn.Module):
    """Asymmetric (or symmetric) fake quantizer with one parameter set per sampler step."""

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        channel_axis: int | None = None,
        fallback: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.channel_axis = channel_axis  # None: per tensor; else the input-channel axis
        self.enabled = True
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
    def active(self) -> bool:
        return self.enabled and self.bits < OFF_BITS and self.num_steps > 0

    def extra_repr(self) -> str:
        gran = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        fb = ", fallback" if self.fallback is not None else ""
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}, {gran}, steps={self.num_steps}{fb}"

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
        qmin, qmax = qrange(self.bits, self.symmetric)
        return fake_quant(
            x, broadcast_channels(scale, x, self.channel_axis), broadcast_channels(zp, x, self.channel_axis), qmin, qmax
        )

    # ---- persistence --------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Tables are shaped by the calibration (steps, channels): take the saved shapes.
        for name in _TABLES:
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved))
        self._cache = {}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._cache = {}  # cached fallback rows would stay on the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._cache = {}
