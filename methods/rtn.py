"""``rtn``: naive min-max round-to-nearest, the "traditional PTQ" baseline of the papers.

Weights: per output channel, asymmetric, range = [min, max] of the weight.
Activations: per tensor, asymmetric, range = [min, max] of the FP inputs each layer saw
on the calibration samples (uniformly spaced steps of FP trajectories). Nothing is
learned. This is the baseline row of Q-Diffusion Table 1 / PTQ4DM Table 5 ("Linear Quant").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from methods.base import BitConfig, CalibrationSource, MethodConfig, QuantMethod
from methods.quant.calibrate import init_activation_ranges
from methods.quant.layers import QuantLayer
from methods.quant.surgery import quant_layers
from methods.registry import register_method
from models.denoiser import Denoiser


@dataclass
class RTNConfig(MethodConfig):
    PRESETS = {"paper": {"calib_images": 256, "calib_steps": 20}, "fast": {}}
    calib_images: int = 32  # FP trajectories used for activation ranges
    calib_steps: int = 10  # uniformly spaced sampler steps taken from each trajectory


@register_method("rtn")
class RoundToNearest(QuantMethod):
    config_cls = RTNConfig

    def layer(self, name, module, w_bits, a_bits, structure):
        return QuantLayer(module, w_bits, a_bits, w_symmetric=False, a_symmetric=False)

    def calibrate(self, denoiser: Denoiser, calib: CalibrationSource, bits: BitConfig, artifact_dir: Path) -> dict:
        layers = quant_layers(denoiser.unet)
        for layer in layers.values():
            layer.init_weight_range("minmax")
        traj = calib.trajectories(self.config.calib_images)
        steps = uniform_steps(traj.num_steps, self.config.calib_steps)
        init_activation_ranges(denoiser, layers, traj.at_steps(steps), traj.num_steps, method="minmax",
                               device=calib.device)
        return {}


def uniform_steps(num_steps: int, k: int) -> list[int]:
    """``k`` step indices at fixed intervals across the schedule (Q-Diffusion's time-step-aware set)."""
    k = min(k, num_steps)
    interval = num_steps // k
    return list(range(0, interval * k, interval))
