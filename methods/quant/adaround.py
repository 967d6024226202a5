"""AdaRound: learned up/down rounding of weights (Nagel et al., ICML 2020), as used by BRECQ and Q-Diffusion.

The weight is quantized as ``s * (clamp(floor(w / s) + h(V) + z, qmin, qmax) - z)`` with the
rectified sigmoid ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``,
``zeta = 1.1``, ``gamma = -0.1``. ``V`` is initialised so that ``h(V) = frac(w / s)``
(the soft quantizer then reproduces ``w`` inside the clipping range) and is learned
against a reconstruction loss plus the regulariser ``sum(1 - |2 h(V) - 1|^beta)``
(weight 0.01), with ``beta`` held at 20 during a warm-up (20 % of the iterations, where
the regulariser is off) and then annealed linearly to 2, which pushes every ``h(V)`` to
0 or 1. :meth:`AdaRoundQuantizer.harden` freezes the hard rounding ``V >= 0`` into an
integer-offset buffer: from then on the quantizer is a fixed fake quantizer, so
``QuantLayer.quantized_weight()`` / ``freeze()`` use the learned rounding.

:func:`attach_adaround` swaps a :class:`~methods.quant.layers.QuantLayer`'s weight
quantizer(s) (both halves of a split layer) for AdaRound quantizers that keep the
range of the ones they replace.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.quant.base import Quantizer
from methods.quant.quantizer import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (AdaRound Eq. 23)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """``V`` with ``rectified_sigmoid(V) == h`` for ``h`` in (0, 1)."""
    return -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1.0)


def beta_schedule(it: int, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float:
    """Regulariser temperature at iteration ``it``: ``start`` during warm-up, then linear to ``end``."""
    warm = warmup * iters
    if it < warm:
        return start
    rel = (it - warm) / max(iters - warm, 1.0)
    return end + (start - end) * max(0.0, 1.0 - rel)


class AdaRoundQuantizer(Quantizer):
    """Weight fake quantizer with learnable rounding; the range (scale, zero point) is fixed."""

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        if not base.initialized:
            raise ValueError("initialise the weight quantizer's range before attaching AdaRound")
        super().__init__(base.bits, base.symmetric, base.channel_axis)
        self.learnable = False  # the step is fixed; what is learned is the rounding
        self.enabled = base.enabled
        scale = base.scale.detach().abs().clamp_min(1e-8) if base.learnable else base.scale.detach()
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", base.zero_point.detach().clone())
        self.register_buffer("initialized", torch.tensor(True))  # kept: saved models carry it
        w = weight.detach() / self.scale
        frac = (w - w.floor()).clamp(1e-4, 1 - 1e-4)  # keep V finite at exact integers
        self.alpha = nn.Parameter(inverse_rectified_sigmoid(frac))
        self.register_buffer("hard_offsets", None)  # 0/1 per weight once hardened

    @property
    def hardened(self) -> bool:
        return self.hard_offsets is not None

    def soft_offsets(self) -> torch.Tensor:
        return rectified_sigmoid(self.alpha)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)``: zero exactly when every ``h(V)`` is 0 or 1."""
        if self.hardened:
            return torch.zeros((), device=self.scale.device)
        return (1 - (2 * self.soft_offsets() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def harden(self) -> None:
        """Freeze the hard rounding ``h = [V >= 0]`` and drop the rounding variables."""
        if self.hardened:
            return
        self.hard_offsets = (self.alpha >= 0).to(self.scale.dtype)
        del self.alpha
        self.alpha = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return w
        qmin, qmax = self.qmin_qmax
        w_floor = torch.floor(w / self.scale).detach()
        offsets = self.hard_offsets if self.hardened else self.soft_offsets()
        return (torch.clamp(w_floor + offsets + self.zero_point, qmin, qmax) - self.zero_point) * self.scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A hardened quantizer saves ``hard_offsets`` and no ``alpha``: harden the structure too
        # (the base class then sizes ``hard_offsets`` from the saved tensor).
        if (prefix + "hard_offsets") in state_dict and self.hard_offsets is None:
            del self.alpha
            self.alpha = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'hard' if self.hardened else 'soft'}"


def attach_adaround(layer: nn.Module) -> list[AdaRoundQuantizer]:
    """Replace ``layer``'s weight quantizer(s) by AdaRound ones (idempotent); return them."""
    if not getattr(layer, "quant_weight", False):
        return []
    out = []
    names = ["weight_quantizer"] + (["weight_quantizer_skip"] if layer.split else [])
    for name, part in zip(names, layer.weight_parts()):
        q = getattr(layer, name)
        if not isinstance(q, AdaRoundQuantizer):
            if not q.initialized:
                q.init_range(part, "minmax")
            q = AdaRoundQuantizer(q, part)
            setattr(layer, name, q)
        out.append(q)
    layer.unfreeze()
    return out


def round_loss(quantizers: list[AdaRoundQuantizer], it: int, iters: int, weight: float = 0.01,
               warmup: float = 0.2, b_range: tuple[float, float] = (20.0, 2.0)) -> torch.Tensor:
    """The AdaRound regulariser term of the loss at iteration ``it`` (zero during warm-up)."""
    if it < warmup * iters or not quantizers:
        return torch.zeros(())
    beta = beta_schedule(it, iters, warmup, *b_range)
    return weight * sum(q.regularizer(beta) for q in quantizers)


def hardness(quantizers: list[AdaRoundQuantizer]) -> float:
    """Fraction of soft offsets within 1e-3 of 0 or 1 (1.0 once hardened)."""
    total, hard = 0, 0
    for q in quantizers:
        h = q.hard_offsets if q.hardened else q.soft_offsets().detach()
        total += h.numel()
        hard += int(((h < 1e-3) | (h > 1 - 1e-3)).sum())
    return hard / total if total else 1.0


__all__ = [
    "AdaRoundQuantizer", "attach_adaround", "beta_schedule", "hardness", "inverse_rectified_sigmoid",
    "rectified_sigmoid", "round_loss",
]
