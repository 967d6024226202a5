"""ADP-DM's calibration-time machinery: the G-group mixture quantizer and the SRM step selector.

Wang et al., "Towards Accurate Post-training Quantization for Diffusion Models"
(arXiv 2305.18723, CVPR 2024); official code ``ChangyuanWang17/APQ-DM``. The paper text
(Fig. 2) describes activations quantized in parallel by all groups' functions, the output
being the importance-weighted sum, with the weights found by differentiable search and an
entropy regulariser. Everything below follows the *official code* where the paper is silent
(see ``docs/methods/adpdm.md``), as noted per function.

:class:`GroupMixtureQuantizer` (one per quantized layer input):

* ``G`` candidate clipping ranges per sampler step, built as in the official
  ``GroupWise_Quantizaion``: per-input-channel minima (and maxima) of the step's input,
  widened to cover at least a floor range, are binned into ``G`` equal-width bins; bin
  ``g`` gives the lowest minimum (highest maximum) of its members, or the bin's upper edge
  when empty; candidate ``g`` is (min-bin ``g``, max-bin ``g``).
* importance logits ``[S, G, C]`` (``per-channel``, as released) or ``[S, G, 1]``
  (``per-tensor``), init 0.01, softmax over ``G``;
* calibration output: ``sum_g w[s, g] * fq(x; range_g)`` (a differentiable mixture);
* inference range: the importance-weighted average of the ``G`` ranges (the official code
  keeps it soft, no argmax), exported per step into a
  :class:`methods.quant.step_table.StepTableQuantizer`.

:class:`SRMSelector`: the official calibration-timestep rule (entropy minus
``repeat_penalty`` x times picked, restricted to step indices >= ``min_fraction`` of the
schedule, ties to the last); the paper's structural-risk framing adds an MMD term that the
code does not implement, and neither do we.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.quant.base import OFF_BITS, Quantizer, scale_zero_point
from methods.quant.mixture import group_mixture
from methods.quant.step_table import StepTableQuantizer
from methods.quant.timestep import require_step


def bin_groups(values: torch.Tensor, groups: int, kind: str) -> torch.Tensor:
    """``G`` candidate bounds from per-channel ``values`` (official ``GroupWise_Quantizaion``).

    The spread ``[min, max]`` of ``values`` is cut into ``groups`` equal-width bins (a value on
    an inner edge goes to the upper bin); each bin yields its lowest (``kind='min'``) or
    highest (``kind='max'``) member, or its upper edge when it has no member.
    """
    lo, hi = values.min(), values.max()
    width = hi - lo
    edges = lo + width * torch.arange(1, groups + 1, device=values.device, dtype=values.dtype) / groups
    if float(width) > 0:
        idx = ((values - lo) / width * groups).floor().clamp(0, groups - 1).long()
    else:
        idx = torch.full_like(values, groups - 1, dtype=torch.long)
    reduce = "amin" if kind == "min" else "amax"
    # include_self=False: a bin with members takes their extreme; an empty bin keeps its upper edge.
    return edges.scatter_reduce(0, idx, values, reduce=reduce, include_self=False)


class GroupMixtureQuantizer(Quantizer):
    """Calibration-time activation quantizer: a softmax-weighted mixture of ``G`` fake quantizers per step."""

    def __init__(
        self,
        bits: int,
        num_steps: int,
        groups: int,
        channels: int,
        channel_axis: int,
        per_channel: bool = True,
        floor: tuple[float, float] | None = (-4.0, 6.0),
        logit_init: float = 0.01,
    ) -> None:
        if bits >= OFF_BITS:
            raise ValueError("GroupMixtureQuantizer needs a bit width below 16")
        # Asymmetric. channel_axis is the input-channel axis whatever the granularity: candidate
        # ranges always come from per-channel extremes; per_channel says whether the weights do.
        super().__init__(bits, False, channel_axis)
        self.groups = groups
        self.per_channel = per_channel
        self.floor = floor
        self.calibrating = False  # recompute the step's candidate ranges from each input (official)
        self.search_floor = False  # first round: LAPQ-style shrink of the floor range (official)
        self.search_p, self.search_threshold = 0.5, 0.2
        self.search_images = 2
        self.input_grad = True  # False: the official code's plain round, no gradient into the input
        width = channels if per_channel else 1
        self.logits = nn.Parameter(torch.full((num_steps, groups, width), float(logit_init)))
        self.register_buffer("group_lo", torch.zeros(num_steps, groups))
        self.register_buffer("group_hi", torch.zeros(num_steps, groups))
        self.register_buffer("floor_factor", torch.ones(num_steps))
        self.register_buffer("has_range", torch.zeros(num_steps, dtype=torch.bool))

    @property
    def num_steps(self) -> int:
        return self.logits.shape[0]

    def extra_repr(self) -> str:
        gran = "per-channel" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, groups={self.groups}, steps={self.num_steps}, {gran}"

    # ---- importance weights -------------------------------------------------------
    def weights(self, step: int | None = None) -> torch.Tensor:
        """Softmax over groups: ``[G, C']`` for one step, ``[S, G, C']`` for all."""
        logits = self.logits if step is None else self.logits[step]
        return F.softmax(logits, dim=-2)

    def entropy(self, step: int) -> torch.Tensor:
        """Channel-mean entropy of the step's group weights (differentiable)."""
        w = self.weights(step)
        return -(w * w.clamp_min(1e-12).log()).sum(0).mean()

    @torch.no_grad()
    def step_entropies(self) -> torch.Tensor:
        w = self.weights()
        return -(w * w.clamp_min(1e-12).log()).sum(1).mean(-1)

    # ---- candidate ranges ---------------------------------------------------------
    @torch.no_grad()
    def candidate_ranges(self, x: torch.Tensor, factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        axis = self.channel_axis % x.dim()
        xc = x.detach().float().movedim(axis, 0).flatten(1)
        cmin, cmax = xc.amin(1), xc.amax(1)
        if self.floor is not None:
            cmin = cmin.clamp(max=self.floor[0] * factor)
            cmax = cmax.clamp(min=self.floor[1] * factor)
        return bin_groups(cmin, self.groups, "min"), bin_groups(cmax, self.groups, "max")

    def mixture(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``sum_g w[g] * fq(x; lo[g], hi[g])`` with ``w`` of shape ``[G, C']``."""
        qmin, qmax = self.qmin_qmax
        scale, zp = scale_zero_point(lo, hi, self.bits, False)
        n = x.dim()
        shape = [self.groups] + [1] * n
        xin = x if self.input_grad else x.detach()  # official: torch.round without STE passes no input gradient
        w_shape = [self.groups] + [1] * n
        if self.per_channel:
            w_shape[1 + self.channel_axis % n] = -1
        # = (fake_quant(xin.unsqueeze(0), scale, zp) * w).sum(0), values and gradients, in fewer passes
        return group_mixture(xin, w.reshape(w_shape), scale.view(shape), zp.view(shape), qmin, qmax)

    @torch.no_grad()
    def _search_floor(self, x: torch.Tensor, step: int) -> None:
        """Official first-round init: floor x (1.0, 0.9, ..., 0.2), least L_0.5 error kept if below 0.2.

        Deviation for cost: scored on the first ``search_images`` images of the batch (the code
        uses the whole batch); the search runs once per step, in the first round only.
        """
        w = self.weights(step)
        x = x[: self.search_images]  # cost: the search runs on the first image(s) of the batch only
        best, best_err = 1.0, float("inf")
        for k in range(9):
            f = 1.0 - 0.1 * k
            lo, hi = self.candidate_ranges(x, f)
            err = float((self.mixture(x, lo, hi, w) - x).abs().pow(self.search_p).mean())
            if err < best_err:
                best, best_err = f, err
        if best_err < self.search_threshold:
            self.floor_factor[step] = best

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        step = require_step().step_index
        if self.calibrating:
            if self.search_floor and self.floor is not None:
                self._search_floor(x, step)
            lo, hi = self.candidate_ranges(x, float(self.floor_factor[step]))
            self.group_lo[step], self.group_hi[step] = lo, hi
            self.has_range[step] = True
        if not bool(self.has_range[step]):
            raise RuntimeError(f"step {step} has no candidate ranges: calibrate before use")
        return self.mixture(x, self.group_lo[step], self.group_hi[step], self.weights(step))

    # ---- export -------------------------------------------------------------------
    @torch.no_grad()
    def effective_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step inference ranges ``[S, C']``: the importance-weighted average of the groups."""
        w = self.weights()  # [S, G, C']
        lo = (w * self.group_lo.unsqueeze(-1)).sum(1)
        hi = (w * self.group_hi.unsqueeze(-1)).sum(1)
        return lo, hi

    @torch.no_grad()
    def export(self, timesteps: list[int]) -> StepTableQuantizer:
        lo, hi = self.effective_ranges()
        if not self.per_channel:
            lo, hi = lo[:, 0], hi[:, 0]
        table = StepTableQuantizer(self.bits, False, self.channel_axis if self.per_channel else None)
        table.set_ranges(lo, hi, timesteps)
        return table

    @torch.no_grad()
    def dominant_groups(self) -> list[int]:
        """Per step, the group with the highest channel-mean weight (the timestep partition)."""
        return self.weights().mean(-1).argmax(-1).tolist()


class APQWeightQuantizer(Quantizer):
    """The official APQ-DM weight rule (``QModule._quantize_weight``), per output channel (axis 0):
    step ``s = max(0, w_max) / (2^(b-1) - 1)``, ``q(w) = clamp(round(w / s) * s, w_min, w_max)``.

    The step comes from the positive side only and the integer levels are not clamped, so a
    channel with ``|w_min| > w_max`` uses more than 2^b levels (down to ``round(w_min / s)``);
    a channel with ``w_max <= 0`` gets the 1e-8 floor step (its weights pass almost unchanged).
    """

    def __init__(self, bits: int) -> None:
        super().__init__(bits, symmetric=True, channel_axis=0)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def ready(self) -> bool:
        return bool(self.initialized)

    @torch.no_grad()
    def init_range(self, w: torch.Tensor, method: str = "minmax", p: float = 2.4) -> None:
        if self.bits >= OFF_BITS:
            return
        if method != "minmax":
            raise ValueError("the official APQ-DM weight rule is min-max only")
        flat = w.detach().float().flatten(1)
        shape = [-1] + [1] * (w.dim() - 1)
        self.lo, self.hi = flat.amin(1).view(shape), flat.amax(1).view(shape)
        self.scale = (self.hi.clamp_min(0) / (2 ** (self.bits - 1) - 1)).clamp_min(1e-8)
        self.initialized.fill_(True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return w
        return torch.clamp(torch.round(w / self.scale) * self.scale, self.lo, self.hi)


def min_calib_step(num_steps: int, fraction: float = 0.3) -> int:
    """First allowed calibration step index: 30 of 100 in the official code, scaled to ``num_steps``."""
    return min(num_steps - 1, max(0, int(round(fraction * num_steps))))


class SRMSelector:
    """Official calibration-timestep rule: ``argmax_{s >= s_min} entropy[s] - penalty * count[s]`` (ties: last)."""

    def __init__(self, num_steps: int, min_fraction: float = 0.3, repeat_penalty: float = 2.0) -> None:
        self.num_steps = num_steps
        self.min_step = min_calib_step(num_steps, min_fraction)
        self.repeat_penalty = repeat_penalty
        self.counts = torch.zeros(num_steps)
        self.history: list[int] = []

    def scores(self, entropy: torch.Tensor) -> torch.Tensor:
        return entropy.detach().float().cpu() - self.repeat_penalty * self.counts

    def select(self, entropy: torch.Tensor) -> int:
        if entropy.numel() != self.num_steps:
            raise ValueError(f"expected {self.num_steps} step entropies, got {entropy.numel()}")
        allowed = self.scores(entropy)[self.min_step :]
        best = allowed.max()
        step = self.min_step + int((allowed == best).nonzero().flatten()[-1])
        self.counts[step] += 1
        self.history.append(step)
        return step


def sum_step_entropies(quantizers: list[GroupMixtureQuantizer], num_steps: int) -> torch.Tensor:
    """Official selector score before the repeat penalty: sum over layers of channel-mean entropy / G."""
    total = torch.zeros(num_steps)
    for q in quantizers:
        total += q.step_entropies().cpu() / q.groups
    return total


def entropy_regulariser(quantizers: list[GroupMixtureQuantizer], step: int) -> torch.Tensor:
    """Official ``diff_loss``: sum over layers of channel-mean entropy / G^2 (cal_entropy / (G*C))."""
    return sum(q.entropy(step) / q.groups**2 for q in quantizers)


__all__ = [
    "APQWeightQuantizer",
    "GroupMixtureQuantizer",
    "SRMSelector",
    "bin_groups",
    "entropy_regulariser",
    "min_calib_step",
    "sum_step_entropies",
]
