"""``fp``: the full-precision reference. No quantization; every table's anchor row."""

from __future__ import annotations

from methods.base import QuantMethod
from methods.registry import register_method


@register_method("fp")
class FullPrecision(QuantMethod):
    quantizes = False  # the envelope returns the denoiser untouched
