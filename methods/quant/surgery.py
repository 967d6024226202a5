"""Model surgery: swap conv/linear layers of any diffusers UNet for quantized ones.

What gets quantized is a :class:`Scope`, owned by the harness rather than by a method,
so a sweep compares every method on the same layers:

* ``uniform`` (default): every conv and linear of the denoiser (attention matmuls
  too, for methods that quantize them), the first and last layer at 8 bits;
* ``paper``: each method's own published choice (``QuantMethod.paper_scope``).

Layers are selected by fnmatch patterns on their qualified module names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from torch import nn

from methods.quant.layers import QuantLayer
from methods.quant.quantizer import OFF_BITS

LayerFactory = Callable[[str, nn.Module, int, int], nn.Module]

# conv_in / conv_out for UNet2DModel and UNet2DConditionModel alike.
FIRST_LAST = ("conv_in", "conv_out")


@dataclass(frozen=True)
class Scope:
    name: str = "uniform"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    first_last: tuple[str, ...] = FIRST_LAST
    first_last_bits: int | None = 8  # None: same bits as the rest; 16: keep in full precision
    attention_matmuls: bool = True

    def selects(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )

    def bits_for(self, name: str, w_bits: int, a_bits: int) -> tuple[int, int]:
        if name in self.first_last and self.first_last_bits is not None:
            return max(w_bits, self.first_last_bits), max(a_bits, self.first_last_bits)
        return w_bits, a_bits

    def to_dict(self) -> dict:
        return asdict(self)


UNIFORM = Scope("uniform")


@dataclass
class QuantSummary:
    """Coverage report (docs/methods/README.md, "Coverage report"): the bits of every layer."""

    layers: dict[str, str] = field(default_factory=dict)  # name -> "w4a8"
    fp_layers: list[str] = field(default_factory=list)  # conv/linear left in full precision
    extra: dict[str, str] = field(default_factory=dict)  # e.g. attention matmul quantizers

    @property
    def num_quantized(self) -> int:
        return len(self.layers)

    def bit_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for bits in self.layers.values():
            hist[bits] = hist.get(bits, 0) + 1
        return dict(sorted(hist.items()))

    def to_dict(self) -> dict:
        return {
            "num_quantized": self.num_quantized,
            "num_fp": len(self.fp_layers),
            "bits": self.bit_histogram(),
            "layers": self.layers,
            "fp_layers": self.fp_layers,
            "extra": self.extra,
        }


def default_factory(name: str, module: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
    return QuantLayer(module, w_bits, a_bits)


def quantize_modules(
    model: nn.Module, scope: Scope, w_bits: int, a_bits: int, factory: LayerFactory = default_factory
) -> QuantSummary:
    """Replace, in place, every conv/linear the scope selects; return the coverage report."""
    summary = QuantSummary()
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for name, module in targets:
        if not scope.selects(name):
            summary.fp_layers.append(name)
            continue
        wb, ab = scope.bits_for(name, w_bits, a_bits)
        if wb >= OFF_BITS and ab >= OFF_BITS:
            summary.fp_layers.append(name)
            continue
        new = factory(name, module, wb, ab)
        if new is module:  # the method keeps this layer in full precision (e.g. PTQ4DM's attention projections)
            summary.fp_layers.append(name)
            continue
        model.set_submodule(name, new)
        # what the built layer does, not what was asked (an output quantizer may leave the model output FP)
        wb, ab = getattr(new, "w_bits", wb), getattr(new, "a_bits", ab)
        summary.layers[name] = f"w{wb if wb < OFF_BITS else 'fp'}a{ab if ab < OFF_BITS else 'fp'}"
    return summary


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def freeze_all(model: nn.Module) -> None:
    for layer in quant_layers(model).values():
        layer.freeze()
