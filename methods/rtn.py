"""``rtn``: naive min-max round-to-nearest, the "traditional PTQ" baseline of the papers.

Weights: per output channel, asymmetric, range = [min, max] of the weight.
Activations: per tensor, asymmetric, range = [min, max] of the FP inputs each layer saw
on the calibration samples (uniformly spaced steps of FP trajectories). Nothing is
learned. This is the baseline row of Q-Diffusion Table 1 / PTQ4DM Table 5 ("Linear Quant").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from methods.base import BitConfig, CalibrationSource, MethodConfig, QuantMethod, QuantResult
from methods.quant.calibrate import init_activation_ranges
from methods.quant.layers import QuantLayer
from methods.quant.surgery import Scope, freeze_all, quant_layers, quantize_modules
from methods.registry import register_method
from models.denoiser import Denoiser


@dataclass
class RTNConfig(MethodConfig):
    calib_images: int = 32  # FP trajectories used for activation ranges
    calib_steps: int = 10  # uniformly spaced sampler steps taken from each trajectory

    @classmethod
    def from_preset(cls, preset: str) -> RTNConfig:
        super().from_preset(preset)
        return cls(preset=preset) if preset == "fast" else cls(preset=preset, calib_images=256, calib_steps=20)


@register_method("rtn")
class RoundToNearest(QuantMethod):
    config_cls = RTNConfig

    def quantize(
        self, denoiser: Denoiser, calib: CalibrationSource, bits: BitConfig, scope: Scope, artifact_dir: Path
    ) -> QuantResult:
        cfg: RTNConfig = self.config
        start = time.perf_counter()
        factory = lambda name, m, wb, ab: QuantLayer(m, wb, ab, w_symmetric=False, a_symmetric=False)  # noqa: E731
        summary = quantize_modules(denoiser.unet, scope, bits.w, bits.a, factory)
        layers = quant_layers(denoiser.unet)
        for layer in layers.values():
            layer.init_weight_range("minmax")
        traj = calib.trajectories(cfg.calib_images)
        steps = uniform_steps(traj.num_steps, cfg.calib_steps)
        init_activation_ranges(
            denoiser, layers, traj.at_steps(steps), traj.num_steps, method="minmax", device=calib.device
        )
        freeze_all(denoiser.unet)
        facts = {"calib_seconds": time.perf_counter() - start, "layers_quantized": summary.num_quantized,
                 "coverage": summary.to_dict()}
        return QuantResult(denoiser, facts)


def uniform_steps(num_steps: int, k: int) -> list[int]:
    """``k`` step indices at fixed intervals across the schedule (Q-Diffusion's time-step-aware set)."""
    k = min(k, num_steps)
    interval = num_steps // k
    return list(range(0, interval * k, interval))
