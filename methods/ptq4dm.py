"""``ptq4dm``: PTQ4DM (Shang, Yuan, Xie, Wu, Yan, "Post-training Quantization on Diffusion Models",
CVPR 2023; code ``42Shawn/PTQ4DM``, script ``quant_sample_ddim_in_backward_DNTC.sh``).

Algorithm (docs/methods/ptq4dm.md):

1. **NDTC calibration**: ``num_samples`` (paper: 1,024) samples; sample i draws a respaced
   timestep index tau_i ~ N(mean * S, std * S) (mean = std = 0.4 of the S sampler steps, as the
   released script), floored and clamped to [0, S - 1]; the FP sampler runs from x_T down to
   tau_i and x_{tau_i} is kept, **labelled with the timestep it was actually taken at**.
2. **Quantizers**: all conv and linear layers, first and last at 8 bit; weights channel-wise,
   activations per tensor, both symmetric and initialised by the L_p (p = 2.4) range search
   ("MSE" in the paper, best in its Table 4).
3. **Reconstruction** (off by default, as in the released DNTC script; ``reconstruction=True``
   = ``--use_adaround``): QDrop-style block reconstruction, AdaRound weights and LSQ
   activation steps learned jointly (lr 4e-5), rounding weight 0.01, beta 20 -> 2,
   warm-up 0.2, activation-quantization drop probability 0.5.

Deviations from the official code:

* **Timestep labels fixed.** The released backward generator keeps the sample at loop
  counter k (diffusion step about S-1-k) but labels it with respaced timestep k. Here each
  sample carries its true step and timestep; ``released_labels=True`` reproduces the
  released pairing (the x at loop counter tau labelled with respaced timestep tau).
* NDTC samples are cut from cached FP trajectories (``calib_images`` of them; the paper
  preset uses one trajectory per sample, as the original; the ``fast`` preset takes
  several draws per trajectory, ``ceil(num_samples / calib_images)``).
* diffusers UNets and DDIM trajectories of the harness instead of improved-diffusion's IDDPM
  models (learned-sigma outputs are cut to the eps channels by the denoiser).
* Attention matmuls stay in FP, as in the released code (QDrop's ``QuantModel`` swaps
  only conv/linear); ``attention_matmuls=True`` quantizes them (symmetric, per tensor) when the
  scope allows.
* The UNet output quantizer is off (the released code disables it too); only layer
  inputs are quantized.
* QDrop's reconstruction uses p = 2 (MSE) as the released code; the reconstruction blocks are
  the diffusers blocks of :mod:`methods.quant.recon` instead of IDDPM's ResBlock/AttentionBlock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from methods.base import BitConfig, CalibrationSource, MethodConfig, QuantMethod, Trajectories
from methods.quant.attention import (
    AttentionRangeObserver,
    attention_processors,
    attention_summary,
    quantize_attention,
)
from methods.quant.calibrate import Batch, init_activation_ranges
from methods.quant.layers import QuantLayer
from methods.quant.quantizer import OFF_BITS
from methods.quant.recon import ReconConfig, reconstruct
from methods.quant.surgery import UNIFORM, Scope, quant_layers
from methods.registry import register_method
from models.denoiser import Denoiser


@dataclass
class PTQ4DMConfig(MethodConfig):
    """PTQ4DM hyperparameters. ``paper``: the released DNTC script (1,024 NDTC samples, one FP
    trajectory each, no reconstruction); ``fast``: 128 NDTC samples from 32 trajectories, and the
    activation L_p range search on 2^16 sampled values per layer instead of 2^20."""

    num_samples: int = 1024  # --calib_num_samples
    calib_images: int = 1024  # FP trajectories the samples are cut from
    ndtc_mean: float = 0.4  # of the sampler's step count
    ndtc_std: float = 0.4
    released_labels: bool = False  # reproduce the released code's timestep mislabel
    p: float = 2.4  # L_p range search
    range_values: int = 1 << 20  # activation values per layer the range search sees (a random subsample)
    attention_matmuls: bool = False
    reconstruction: bool = False  # --use_adaround (AdaRound + QDrop)
    recon_iters: int = 20000
    batch_size: int = 32
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    drop_prob: float = 0.5
    round_weight: float = 0.01
    recon_samples: int | None = None
    seed: int = 0
    progress: bool = True

    PRESETS = {"paper": {}, "fast": {"num_samples": 128, "calib_images": 32, "recon_iters": 40, "batch_size": 8,
                                     "recon_samples": 64, "range_values": 1 << 16}}


def ndtc_draws(num_steps: int, n: int, mean: float = 0.4, std: float = 0.4, seed: int = 0) -> torch.Tensor:
    """``n`` respaced timestep indices tau ~ N(mean * S, std * S), floored, clamped to [0, S - 1] (0 = cleanest)."""
    gen = torch.Generator().manual_seed(seed)
    tau = torch.randn(n, generator=gen, dtype=torch.float64) * (std * num_steps) + mean * num_steps
    return tau.floor().clamp(0, num_steps - 1).long()


def ndtc_samples(traj: Trajectories, n: int, mean: float = 0.4, std: float = 0.4, released_labels: bool = False,
                 seed: int = 0) -> Batch:
    """NDTC calibration samples from FP trajectories.

    Trajectory step s (0 = x_T) holds the denoiser input at timestep ``timesteps[s]``; respaced
    index tau (0 = cleanest) is step ``S - 1 - tau``. Correct labels: the x at step ``S - 1 - tau``
    with timestep ``timesteps[S - 1 - tau]``. Released code: the x at loop counter (step) tau with
    the timestep of respaced index tau, ``timesteps[S - 1 - tau]``.
    """
    S = traj.num_steps
    tau = ndtc_draws(S, n, mean, std, seed)
    image_idx = torch.arange(n) % traj.num_images
    label_step = S - 1 - tau
    data_step = tau if released_labels else label_step
    batch = traj.at(image_idx, data_step)
    batch["t"] = torch.tensor(traj.timesteps, dtype=torch.long)[label_step]
    batch["step"] = label_step
    batch["data_step"] = data_step  # the step the x was actually taken at
    return batch


@register_method("ptq4dm")
class PTQ4DM(QuantMethod):
    config_cls = PTQ4DMConfig

    def paper_scope(self) -> Scope:
        """All conv and linear layers, first and last at 8 bit, no attention matmuls (released code)."""
        return replace(UNIFORM, name="paper", first_last_bits=8, attention_matmuls=False)

    def layer(self, name, module, w_bits, a_bits, structure):
        return QuantLayer(module, w_bits, a_bits, w_symmetric=True, w_channelwise=True, a_symmetric=True)

    def extend(self, denoiser: Denoiser, bits: BitConfig, scope: Scope, summary) -> Denoiser:
        if self.config.attention_matmuls and scope.attention_matmuls and bits.a < OFF_BITS:
            quantize_attention(denoiser.unet, bits.a, bits.a, symmetric=True)
            summary.extra.update(attention_summary(denoiser.unet))
        return denoiser

    def calibrate(self, denoiser: Denoiser, calib: CalibrationSource, bits: BitConfig, artifact_dir: Path) -> dict:
        cfg: PTQ4DMConfig = self.config
        device = calib.device
        images = min(cfg.calib_images, cfg.num_samples)
        traj = calib.trajectories(images)
        samples = ndtc_samples(traj, cfg.num_samples, cfg.ndtc_mean, cfg.ndtc_std, cfg.released_labels, cfg.seed)
        samples.pop("data_step")
        num_steps = traj.num_steps
        unet = denoiser.unet
        layers = quant_layers(unet)
        for layer in layers.values():
            layer.init_weight_range("mse", p=cfg.p)
        with AttentionRangeObserver(unet, "mse", cfg.p):
            init_activation_ranges(denoiser, layers, samples, num_steps, method="mse", p=cfg.p, device=device,
                                   max_values=cfg.range_values)
        stats = {}
        if cfg.reconstruction:
            rc = ReconConfig(iters=cfg.recon_iters, batch_size=cfg.batch_size, learn_weights=bits.w < OFF_BITS,
                             learn_acts=bits.a < OFF_BITS, act_quant=bits.a < OFF_BITS, w_lr=cfg.w_lr, a_lr=cfg.a_lr,
                             p=2.0, round_weight=cfg.round_weight, drop_prob=cfg.drop_prob,
                             max_samples=cfg.recon_samples, progress=cfg.progress, seed=cfg.seed)
            stats = reconstruct(denoiser, calib.denoiser, samples, num_steps, rc, device)
        return {
            "attention_matmuls_quantized": 2 * len(attention_processors(unet)),
            "calib_samples": int(samples["x"].shape[0]),
            "calib_trajectories": images,
            "draws_per_trajectory": math.ceil(cfg.num_samples / images),
            "released_labels": cfg.released_labels,
            "recon_units": len(stats),
        }
