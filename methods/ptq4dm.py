"""``ptq4dm``: PTQ4DM (Shang, Yuan, Xie, Wu, Yan, "Post-training Quantization on Diffusion Models",
CVPR 2023; code ``42Shawn/PTQ4DM`` = improved-diffusion + QDrop, script ``quant_sample_ddim_in_backward_DNTC.sh``).

Algorithm (defaults = the released DNTC script; details and the comparison table in docs/methods/ptq4dm.md):

1. **NDTC calibration**: ``num_samples`` (1,024) respaced indices tau ~ N(0.4 S, 0.4 S), floored,
   clamped to [0, S - 1]; sample i is the FP sampler's state at tau_i, labelled with the timestep it
   was taken at (``released_labels=True``: the released pairing, see :func:`ndtc_samples`).
2. **Where**: every ``nn.Conv2d``/``nn.Linear`` except the attention projections (IDDPM's are
   ``Conv1d``, which QDrop does not replace; ``attention_projections=True`` quantizes diffusers'
   ``to_q/to_k/to_v/to_out``); first and last layer at 8 bit. Activations are quantized at each
   layer's **output** (QDrop's ``QuantModule``), the network output excepted
   (``act_position="input"``: at layer inputs). Attention matmuls FP.
3. **Grid and search** (``grid="qdrop"``): weights per output channel, activations per tensor, both
   QDrop-"symmetric": 2^b levels on [-thr, thr] ([0, thr] for one-signed tensors), thr chosen among
   max|x| * i / 100 by the least L_2.4 error (``grid="signed"``: levels [-2^(b-1), 2^(b-1)-1] and the
   80-ratio min-max search).
4. **Activation ranges** (``range_fit="together"``, QDrop's order): batches of 256 calibration samples
   through the model with weights and upstream activations quantized; each quantizer fits on its
   first batch, then an EMA (0.9/0.1) of per-batch optima (``range_fit="fp"``: FP activations of all
   samples, a uniform subsample of ``range_values`` values per tensor).
5. **Reconstruction** (off, as the DNTC script; ``reconstruction=True`` = ``--use_adaround``):
   **layer-wise** (QDrop's block list has no IDDPM block), ``--iters_w 100`` iterations per layer,
   AdaRound + LSQ (lr 4e-5) + QDrop (drop 0.5), MSE; ``recon_granularity="block"``: diffusers blocks.

Deviations: diffusers UNets and the harness's DDIM trajectories instead of IDDPM models (learned
sigma cut to eps); NDTC samples cut from cached FP trajectories (``fast``: several per trajectory);
``released_labels`` reproduces the released pairing up to the final image (below). All in
docs/methods/ptq4dm.md.
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
from methods.quant.calibrate import (
    Batch,
    Reservoir,
    call_at_step,
    fit_ranges_online,
    init_activation_ranges,
    iterate_by_step,
    random_batches,
)
from methods.quant.layers import OutputQuantLayer, QuantLayer, quantizers_disabled
from methods.quant.quantizer import OFF_BITS
from methods.quant.recon import ReconConfig, Unit, reconstruct
from methods.quant.surgery import FIRST_LAST, UNIFORM, Scope, quant_layers
from methods.registry import register_method
from models.denoiser import Denoiser

# diffusers' attention projections (IDDPM's qkv/proj_out are Conv1d, left FP by QDrop)
ATTENTION_PROJECTIONS = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0")
LAST_LAYER = FIRST_LAST[-1]


@dataclass
class PTQ4DMConfig(MethodConfig):
    """PTQ4DM hyperparameters. ``paper``: the released DNTC script (1,024 NDTC samples, one FP
    trajectory each, no reconstruction); ``fast``: 128 NDTC samples from 32 trajectories (one fitting
    batch of 128, each range search on a uniform subsample of 2^16 values per tensor), 40 reconstruction
    iterations if enabled."""

    num_samples: int = 1024  # --calib_num_samples
    calib_images: int = 1024  # FP trajectories the samples are cut from
    ndtc_mean: float = 0.4  # of the sampler's step count
    ndtc_std: float = 0.4
    released_labels: bool = False  # reproduce the released code's (x, t) pairing
    act_position: str = "output"  # "output" (QDrop) | "input"
    attention_projections: bool = False  # quantize to_q/to_k/to_v/to_out (released: FP)
    grid: str = "qdrop"  # "qdrop" (2^b levels on [-thr, thr], 100 thresholds) | "signed" (80-ratio search)
    range_fit: str = "together"  # "together" (upstream quantized, EMA over batches) | "fp"
    fit_batch: int = 256  # QDrop's calibration batch
    fit_momentum: float = 0.9
    p: float = 2.4  # L_p range search
    range_values: int = 1 << 20  # range_fit="fp": values per tensor the search sees (uniform subsample)
    online_values: int | None = None  # range_fit="together": the same, None = the whole tensor (official)
    attention_matmuls: bool = False
    reconstruction: bool = False  # --use_adaround (AdaRound + QDrop)
    recon_granularity: str = "layer"  # "layer" (QDrop on IDDPM) | "block" (diffusers blocks)
    recon_iters: int = 100  # --iters_w of the released script
    batch_size: int = 32
    w_lr: float = 1e-3
    a_lr: float = 4e-5
    drop_prob: float = 0.5
    round_weight: float = 0.01
    recon_samples: int | None = None
    seed: int = 0
    progress: bool = True

    PRESETS = {"paper": {}, "fast": {"num_samples": 128, "calib_images": 32, "recon_iters": 40, "batch_size": 8,
                                     "recon_samples": 64, "range_values": 1 << 16, "online_values": 1 << 16}}

    def __post_init__(self) -> None:
        for name, allowed in (("act_position", ("output", "input")), ("grid", ("qdrop", "signed")),
                              ("range_fit", ("together", "fp")), ("recon_granularity", ("layer", "block"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


def ndtc_draws(num_steps: int, n: int, mean: float = 0.4, std: float = 0.4, seed: int = 0) -> torch.Tensor:
    """``n`` respaced timestep indices tau ~ N(mean * S, std * S), floored, clamped to [0, S - 1] (0 = cleanest)."""
    gen = torch.Generator().manual_seed(seed)
    tau = torch.randn(n, generator=gen, dtype=torch.float64) * (std * num_steps) + mean * num_steps
    return tau.floor().clamp(0, num_steps - 1).long()


def ndtc_samples(traj: Trajectories, n: int, mean: float = 0.4, std: float = 0.4, released_labels: bool = False,
                 seed: int = 0, train_steps: int = 1000) -> Batch:
    """NDTC calibration samples from FP trajectories.

    Trajectory step s (0 = x_T) holds the denoiser input at timestep ``timesteps[s]``; respaced
    index tau (0 = cleanest) is step ``S - 1 - tau``. Correct: the x at step ``S - 1 - tau`` with
    timestep ``timesteps[S - 1 - tau]``.

    ``released_labels=True``, the released generator: it loops k = 0, 1, ... over the respaced
    indices from the noisiest, keeps the sampler's **output** of loop step k = tau (the input of
    step tau + 1) and feeds the model the **raw** index tau as its time input, bypassing
    IDDPM's rescaling wrapper (model time = t * 1000 / T). In this model's training timesteps that
    is ``round(tau * train_steps / 1000)``. Loop step S - 1 outputs the final image, which the
    cached trajectory does not hold: its last input (step S - 1) stands in for it.
    """
    S = traj.num_steps
    tau = ndtc_draws(S, n, mean, std, seed)
    image_idx = torch.arange(n) % traj.num_images
    if released_labels:
        data_step = (tau + 1).clamp(max=S - 1)
        t = (tau.double() * train_steps / 1000).round().long()
    else:
        data_step = S - 1 - tau
        t = torch.tensor(traj.timesteps, dtype=torch.long)[data_step]
    batch = traj.at(image_idx, data_step)
    batch["t"] = t
    batch["step"] = data_step  # the step the x was taken at (groups batches; no quantizer here reads it)
    return batch


@register_method("ptq4dm")
class PTQ4DM(QuantMethod):
    config_cls = PTQ4DMConfig

    def paper_scope(self) -> Scope:
        """Conv/linear layers without the attention projections, first and last at 8 bit, no attention matmuls."""
        return replace(UNIFORM, name="paper", first_last_bits=8, attention_matmuls=False,
                       exclude=() if self.config.attention_projections else ATTENTION_PROJECTIONS)

    def layer(self, name, module, w_bits, a_bits, structure):
        cfg: PTQ4DMConfig = self.config
        if not cfg.attention_projections and Scope(include=ATTENTION_PROJECTIONS).selects(name):
            return module  # left FP, as IDDPM's Conv1d projections in the released code
        sym = cfg.grid == "signed"  # "qdrop": asymmetric arithmetic over a symmetric range
        if cfg.act_position == "input":
            return QuantLayer(module, w_bits, a_bits, w_symmetric=sym, w_channelwise=True, a_symmetric=sym)
        # QDrop disables the network output's quantizer; its input (the image) is never quantized
        a = OFF_BITS if name == LAST_LAYER else a_bits
        return OutputQuantLayer(module, w_bits, a, w_symmetric=sym, w_channelwise=True, a_symmetric=sym)

    def extend(self, denoiser: Denoiser, bits: BitConfig, scope: Scope, summary, structure) -> Denoiser:
        if self.config.attention_matmuls and scope.attention_matmuls and bits.a < OFF_BITS:
            quantize_attention(denoiser.unet, bits.a, bits.a, symmetric=self.config.grid == "signed")
            summary.extra.update(attention_summary(denoiser.unet))
        return denoiser

    def calibrate(self, denoiser: Denoiser, calib: CalibrationSource, bits: BitConfig, artifact_dir: Path) -> dict:
        cfg: PTQ4DMConfig = self.config
        device = calib.device
        images = min(cfg.calib_images, cfg.num_samples)
        traj = calib.trajectories(images)
        samples = ndtc_samples(traj, cfg.num_samples, cfg.ndtc_mean, cfg.ndtc_std, cfg.released_labels, cfg.seed,
                               int(calib.alphas_cumprod.numel()))
        num_steps = traj.num_steps
        unet = denoiser.unet
        layers = quant_layers(unet)
        search = "qdrop" if cfg.grid == "qdrop" else "mse"
        for layer in layers.values():
            layer.init_weight_range(search, p=cfg.p)
        if cfg.range_fit == "together":
            quantizers = [q for ly in layers.values() if ly.quant_act for q in ly.act_quantizers()]
            quantizers += [q for p in attention_processors(unet).values() for q in p.quantizers().values()]
            fit_ranges_online(denoiser, quantizers, random_batches(samples, cfg.fit_batch, seed=cfg.seed), search,
                              cfg.p, cfg.fit_momentum, device, max_values=cfg.online_values, seed=cfg.seed)
        else:
            with AttentionRangeObserver(unet, search, cfg.p, cfg.range_values):
                init_activation_ranges(denoiser, {n: ly for n, ly in layers.items() if type(ly) is QuantLayer},
                                       samples, num_steps, method=search, p=cfg.p, device=device,
                                       max_values=cfg.range_values, seed=cfg.seed)
            _fit_outputs_fp(denoiser, layers, samples, num_steps, search, cfg, device)
        stats = {}
        if cfg.reconstruction:
            rc = ReconConfig(iters=cfg.recon_iters, batch_size=cfg.batch_size, learn_weights=bits.w < OFF_BITS,
                             learn_acts=bits.a < OFF_BITS, act_quant=bits.a < OFF_BITS, w_lr=cfg.w_lr, a_lr=cfg.a_lr,
                             p=2.0, round_weight=cfg.round_weight, drop_prob=cfg.drop_prob,
                             max_samples=cfg.recon_samples, progress=cfg.progress, seed=cfg.seed)
            units = ([Unit(n, ly, "layer", {n: ly}) for n, ly in layers.items()]
                     if cfg.recon_granularity == "layer" else None)
            stats = reconstruct(denoiser, calib.denoiser, samples, num_steps, rc, device, units=units)
        return {
            "attention_matmuls_quantized": 2 * len(attention_processors(unet)),
            "act_position": cfg.act_position,
            "act_quantizers": sum(1 for ly in layers.values() if ly.quant_act),
            "calib_samples": int(samples["x"].shape[0]),
            "calib_trajectories": images,
            "draws_per_trajectory": math.ceil(cfg.num_samples / images),
            "released_labels": cfg.released_labels,
            "recon_units": len(stats),
        }


@torch.no_grad()
def _fit_outputs_fp(denoiser: Denoiser, layers: dict[str, QuantLayer], samples: Batch, num_steps: int,
                    search: str, cfg: PTQ4DMConfig, device) -> None:
    """``range_fit="fp"`` for output quantizers: fit each on the layer's output with activations off."""
    outs = {n: ly for n, ly in layers.items() if isinstance(ly, OutputQuantLayer) and ly.quant_act}
    if not outs:
        return
    gen = torch.Generator().manual_seed(cfg.seed)
    res = {n: Reservoir(cfg.range_values, gen) for n in outs}
    handles = [ly.register_forward_hook(lambda m, a, out, n=n: res[n].add(out)) for n, ly in outs.items()]
    try:
        with quantizers_disabled(layers.values(), acts=True):
            for b in iterate_by_step(samples, 32):
                call_at_step(denoiser, b, num_steps, device)
    finally:
        for h in handles:
            h.remove()
    for n, ly in outs.items():
        ly.act_quantizer.init_range(res[n].values, method=search, p=cfg.p)
