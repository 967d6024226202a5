"""``QuantLayer``: a conv or linear layer with a weight quantizer and an input-activation quantizer.

The wrapped module keeps its original weight untouched (methods such as AdaRound
read it); the layer computes with the fake-quantized copy. ``split`` implements
Q-Diffusion's shortcut splitting (Li et al., ICCV 2023, Sec. 4.2): when the input is
a concatenation ``cat([deep, skip], dim=1)`` the two parts, and the matching input
channels of the weight, get separate quantizers.

After calibration :meth:`freeze` caches the quantized weight, so sampling pays for
activation fake-quant only (weights are constant across all denoiser calls).

:func:`quantizers_disabled` is the one way to run modules with quantization switched off
for a while (calibration passes that must see FP activations, FP targets): it restores
every switch it touched, whatever happens inside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from methods.quant.base import OFF_BITS, Quantizer
from methods.quant.quantizer import UniformQuantizer


class QuantLayer(nn.Module):
    def __init__(
        self,
        module: nn.Conv2d | nn.Linear,
        w_bits: int,
        a_bits: int,
        w_symmetric: bool = True,
        w_channelwise: bool = True,
        a_symmetric: bool = False,
        split: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Conv2d | nn.Linear):
            raise TypeError(f"QuantLayer wraps nn.Conv2d or nn.Linear, not {type(module).__name__}")
        self.module = module
        self.split = split
        w_axis = 0 if w_channelwise else None
        self.weight_quantizer = UniformQuantizer(w_bits, w_symmetric, w_axis)
        self.act_quantizer = UniformQuantizer(a_bits, a_symmetric, None)
        if split:
            self.weight_quantizer_skip = UniformQuantizer(w_bits, w_symmetric, w_axis)
            self.act_quantizer_skip = UniformQuantizer(a_bits, a_symmetric, None)
        self.quant_weight = w_bits < OFF_BITS
        self.quant_act = a_bits < OFF_BITS
        self.register_buffer("frozen_weight", None, persistent=False)

    # ---- bits -------------------------------------------------------------------
    @property
    def w_bits(self) -> int:
        return self.weight_quantizer.bits if self.quant_weight else OFF_BITS

    @property
    def a_bits(self) -> int:
        return self.act_quantizer.bits if self.quant_act else OFF_BITS

    def weight_quantizers(self) -> list[Quantizer]:
        return [self.weight_quantizer] + ([self.weight_quantizer_skip] if self.split else [])

    def act_quantizers(self) -> list[Quantizer]:
        return [self.act_quantizer] + ([self.act_quantizer_skip] if self.split else [])

    # ---- weights ----------------------------------------------------------------
    def weight_parts(self) -> list[torch.Tensor]:
        w = self.module.weight
        return [w[:, : self.split], w[:, self.split :]] if self.split else [w]

    @torch.no_grad()
    def init_weight_range(self, method: str = "minmax", p: float = 2.4) -> None:
        for quantizer, part in zip(self.weight_quantizers(), self.weight_parts()):
            quantizer.init_range(part, method=method, p=p)

    def quantized_weight(self) -> torch.Tensor:
        parts = [q(w) for q, w in zip(self.weight_quantizers(), self.weight_parts())]
        return torch.cat(parts, dim=1) if self.split else parts[0]

    @torch.no_grad()
    def freeze(self) -> None:
        """Cache the quantized weight (call after calibration; :meth:`unfreeze` before changing it)."""
        self.frozen_weight = self.quantized_weight().detach() if self.quant_weight else None

    def unfreeze(self) -> None:
        self.frozen_weight = None

    # ---- forward ----------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_act:
            return x
        if self.split:
            return torch.cat([self.act_quantizer(x[:, : self.split]), self.act_quantizer_skip(x[:, self.split :])], 1)
        return self.act_quantizer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        if not self.quant_weight:
            w = self.module.weight
        elif self.frozen_weight is not None:
            w = self.frozen_weight
        else:
            w = self.quantized_weight()
        m = self.module
        if isinstance(m, nn.Conv2d):
            return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w, m.bias)

    def extra_repr(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}" + (f", split={self.split}" if self.split else "")


class OutputQuantLayer(QuantLayer):
    """A :class:`QuantLayer` that quantizes its **output** instead of its input (QDrop's ``QuantModule``:
    ``out = self.act_quantizer(out)``), as PTQ4DM's released code does. The same ``act_quantizer``
    attribute (and switches) as the input form; ``quant_act=False`` leaves the output in FP (the
    network's last layer in QDrop). No shortcut split (the output is not a concatenation)."""

    def __init__(self, module: nn.Conv2d | nn.Linear, w_bits: int, a_bits: int, w_symmetric: bool = True,
                 w_channelwise: bool = True, a_symmetric: bool = False) -> None:
        super().__init__(module, w_bits, a_bits, w_symmetric, w_channelwise, a_symmetric, split=0)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.act_quantizer(y) if self.quant_act else y

    def extra_repr(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}(output)"


def _switches(module: nn.Module, acts: bool, weights: bool) -> Iterator[tuple[object, str]]:
    """(owner, attribute) of every switch under ``module`` that turns the chosen quantization off."""
    if isinstance(module, QuantLayer):
        # A layer's own flags gate its quantizers; the quantizers' ``enabled`` is left alone.
        if acts:
            yield module, "quant_act"
        if weights:
            yield module, "quant_weight"
        return
    if isinstance(module, Quantizer):
        # Outside a QuantLayer a quantizer sees activations (the attention matmul inputs).
        if acts:
            yield module, "enabled"
        return
    for child in module.children():
        yield from _switches(child, acts, weights)


class _Saved:
    """The switches a :func:`quantizers_disabled` block turned off, with their values on entry."""

    def __init__(self) -> None:
        self.values: dict[tuple[int, str], tuple[object, str, bool]] = {}

    @contextlib.contextmanager
    def restored(self, module: nn.Module) -> Iterator[None]:
        """Inside the block: ``module``'s own switches back to their entry values for a nested call.

        (TDQ's objective: the model runs in FP, and each layer's hook also computes its quantized output.)
        """
        mine = [v for (oid, _), v in self.values.items() if oid == id(module)]
        try:
            for owner, attr, value in mine:
                setattr(owner, attr, value)
            yield
        finally:
            for owner, attr, _ in mine:
                setattr(owner, attr, False)


@contextlib.contextmanager
def quantizers_disabled(modules: nn.Module | Iterable[nn.Module], acts: bool = True,
                        weights: bool = False) -> Iterator[_Saved]:
    """Run ``modules`` (a module or several) with activation and/or weight quantization off.

    Switches: ``QuantLayer.quant_act`` / ``quant_weight``, and ``enabled`` of quantizers that
    are not inside a QuantLayer (the attention-matmul quantizers count as activations). Each is
    restored to the value it had on entry, also when the body raises.
    """
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    saved = _Saved()
    for root in roots:
        for owner, attr in _switches(root, acts, weights):
            saved.values.setdefault((id(owner), attr), (owner, attr, getattr(owner, attr)))
    try:
        for owner, attr, _ in saved.values.values():
            setattr(owner, attr, False)
        yield saved
    finally:
        for owner, attr, value in saved.values.values():
            setattr(owner, attr, value)
