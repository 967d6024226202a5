"""``fp``: the full-precision reference. No quantization; every table's anchor row."""

from __future__ import annotations

from pathlib import Path

from methods.base import BitConfig, CalibrationSource, QuantMethod, QuantResult
from methods.quant.surgery import Scope
from methods.registry import register_method
from models.denoiser import Denoiser


@register_method("fp")
class FullPrecision(QuantMethod):
    quantizes = False

    def quantize(
        self, denoiser: Denoiser, calib: CalibrationSource, bits: BitConfig, scope: Scope, artifact_dir: Path
    ) -> QuantResult:
        return QuantResult(denoiser, {"calib_seconds": 0.0, "layers_quantized": 0})
