"""``qdiffusion``: Q-Diffusion (Li, Liu, Lian, Yang, Dong, Kang, Zhang, Keutzer, "Q-Diffusion: Quantizing
Diffusion Models", ICCV 2023; code ``Xiuyu-Li/q-diffusion``).

Algorithm (the ``paper`` preset = the official README command of the model's family, :data:`FAMILIES`;
comparison table and measurements: docs/methods/qdiffusion.md, results/README.md):

1. **Calibration set**: x_t, t (and conditioning) at ``calib_steps`` fixed-interval steps of
   ``calib_images`` FP trajectories (CIFAR-10: 256 x 20).
2. **Layers**: every conv/linear (first and last at the run's bits in the paper scope), plus the
   attention matmuls' inputs (q, k, v; softmax probabilities at ``softmax_bits``, 8 whatever the
   activation bits, 16 for SD). Activations per tensor, symmetric where the README passes ``--a_sym``
   (the softmax quantizer too).
3. **Shortcut splitting** (``--split``): the 1x1 ``conv_shortcut`` that sees ``cat([deep, skip])``
   gets separate quantizers (and weight halves) for the two parts (``split_layers="shortcut+conv1"``
   splits ``conv1`` as well).
4. **Weights**: channel-wise asymmetric, ``w_init`` range, then BRECQ block reconstruction with
   AdaRound (20k iterations, batch 32, rounding weight 0.01, beta 20 -> 2, warm-up 0.2, quantized
   inputs vs FP outputs, MSE), activations off.
5. **Activation ranges** (``act_init="official"``): one forward of 64 random calibration samples with
   the weights and every upstream activation quantizer on; each quantizer fits (``a_init``) on its
   first input (``act_init="fp-all"``: FP activations of all samples).
   ``--running_stat`` (bedroom, SD; ``running_stat=True`` elsewhere): then an EMA (0.95) of each
   quantizer's input min/max over the whole calibration set (:func:`running_stat`).
6. **LSQ**: a second block-reconstruction pass learning the activation steps (5k iterations,
   lr 4e-4, L_2.4), block inputs from the FP model (``act_recon_inputs="quantized"``: from the
   quantized model).

Deviations (each in docs/methods/qdiffusion.md): diffusers blocks as reconstruction units, run in
execution order, in eval mode (no dropout); the AdaRound regulariser covers both halves of a split
layer; SD's cond+uncond calibration doubling holds by construction (the Denoiser runs both halves of
every calibration call through the UNet), each pair kept in one batch; the
``max`` init widens a range to contain 0; the ``fast`` preset runs one joint 40-iteration pass
(AdaRound lr 1e-2, ``w_init="mse"``, LSQ lr 0, asymmetric activations) on 32 x 10 samples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from methods.base import BitConfig, CalibrationSource, MethodConfig, QuantMethod
from methods.quant.attention import (
    AttentionRangeObserver,
    attention_processors,
    attention_summary,
    quantize_attention,
)
from methods.quant.calibrate import fit_ranges_online, init_activation_ranges, random_batches
from methods.quant.layers import QuantLayer
from methods.quant.quantizer import OFF_BITS
from methods.quant.recon import ReconConfig, reconstruct
from methods.quant.shortcut import find_denoiser_splits
from methods.quant.surgery import UNIFORM, Scope, quant_layers
from methods.registry import register_method
from methods.rtn import uniform_steps
from models.denoiser import Denoiser

# The official README's command per model family. Keys of each entry are config fields; a field left
# at None in the config takes its family's value (an explicit value wins). "ldm" (other LDMs) has no
# command in the README: the LSUN-church values are used (declared in docs/methods/qdiffusion.md).
# running_stat_batch / running_stat_shuffle: how the --running_stat pass walks the calibration set
# (LDM script: consecutive batches of 64; txt2img.py: shuffled batches of 16).
_LDM = {"w_init": "mse", "a_init": "mse", "a_symmetric": False, "split": False, "softmax_bits": 8,
        "calib_images": 256, "calib_steps": 20, "batch_size": 32, "running_stat": False,
        "running_stat_batch": 64, "running_stat_shuffle": False}
FAMILIES: dict[str, dict] = {
    "ddim": {"w_init": "minmax", "a_init": "minmax", "a_symmetric": True, "split": True, "softmax_bits": 8,
             "calib_images": 256, "calib_steps": 20, "batch_size": 32, "running_stat": False,
             "running_stat_batch": 64, "running_stat_shuffle": False},
    "ldm-lsun-bedroom": {**_LDM, "a_init": "minmax", "a_symmetric": True, "running_stat": True},
    "ldm-lsun-church": _LDM,
    "ldm": _LDM,
    "sd": {"w_init": "mse", "a_init": "mse", "a_symmetric": False, "split": True, "softmax_bits": 16,
           "calib_images": 128, "calib_steps": 25, "batch_size": 8, "running_stat": True,
           "running_stat_batch": 16, "running_stat_shuffle": True},
}
FAMILY_FIELDS = ("w_init", "a_init", "a_symmetric", "split", "softmax_bits", "calib_images", "calib_steps",
                 "batch_size", "running_stat")
RUNNING_STAT_MOMENTUM = 0.95  # act_momentum_update's act_range_momentum


def model_family(model_name: str) -> str:
    """The :data:`FAMILIES` key of a model spec name (``models/zoo.py``): pixel DDIM models are ``ddim``."""
    for prefix in ("ldm-lsun-bedroom", "ldm-lsun-church"):
        if model_name.startswith(prefix):
            return prefix
    if model_name.startswith("ldm-"):
        return "ldm"
    if model_name.startswith("sd-"):
        return "sd"
    return "ddim"


@dataclass
class QDiffusionConfig(MethodConfig):
    """Q-Diffusion hyperparameters. Fields left at None take the official value of the model's family
    (:data:`FAMILIES`, resolved once from the model spec and stored in the run's structure).
    ``paper``: every official value; ``fast``: a CPU run (32 images x 10 steps, 64 cached recon samples,
    one joint 40-iteration pass per unit at batch 8, ``w_init="mse"``, AdaRound lr 1e-2, LSQ lr 0,
    asymmetric activations). 40 rather than 80 iterations since 2026-12-02: half the calibration
    time, and on tiny-cifar10 a closer match to FP (paired MSE at W4A8 0.0015 vs 0.0027, W8A8 PSNR
    35.0 vs 34.4 dB; results/README.md)."""

    family: str = "auto"  # a FAMILIES key, or "auto": from the model spec's name
    calib_images: int | None = None  # FP trajectories (--cali_n)
    calib_steps: int | None = None  # fixed-interval steps per trajectory (--cali_st)
    split: bool | None = None  # shortcut splitting (--split)
    split_layers: str = "shortcut"  # "shortcut" (official) | "shortcut+conv1"
    quant_attention: bool = True  # QK^T and softmax·V inputs (if the scope's attention_matmuls allows)
    softmax_bits: int | None = None  # --sm_abit
    w_init: str | None = None  # weight range before AdaRound ("minmax" = official "max", or "mse")
    a_init: str | None = None  # activation range init ("minmax" or "mse")
    a_symmetric: bool | None = None  # --a_sym
    act_init: str = "official"  # "official" (64 samples, upstream quantized) | "fp-all"
    act_init_samples: int = 64
    act_recon_inputs: str = "fp"  # LSQ pass block inputs: "fp" (official) | "quantized"
    running_stat: bool | None = None  # --running_stat: EMA of min/max over the calibration set after the init
    weight_iters: int = 20000
    act_iters: int = 5000
    joint: bool = False  # one pass learning AdaRound and LSQ together (fast preset)
    joint_iters: int = 0
    batch_size: int | None = None
    w_lr: float = 1e-3
    a_lr: float = 4e-4
    w_p: float = 2.0  # weight reconstruction loss (MSE)
    a_p: float = 2.4  # activation reconstruction loss and MSE range search
    round_weight: float = 0.01
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.2
    recon_samples: int | None = None  # cache at most this many calibration samples for reconstruction
    progress: bool = True

    # a_lr=0 in ``fast``: in 40-80 Adam iterations lr 4e-4 moves an 8-bit activation step by more than its
    # own size (results/README.md); the paper preset keeps LSQ at 4e-4 for 5k iterations.
    # a_symmetric=False in ``fast``: without LSQ nothing shrinks the symmetric min-max softmax step
    # (max/127), which rounds most 16x16-attention probabilities (about 1/256) to 0 (results/README.md).
    PRESETS = {"paper": {}, "fast": {"calib_images": 32, "calib_steps": 10, "joint": True, "joint_iters": 40,
                                     "batch_size": 8, "recon_samples": 64, "w_init": "mse", "w_lr": 1e-2,
                                     "a_lr": 0.0, "a_symmetric": False}}

    def __post_init__(self) -> None:
        if self.family != "auto" and self.family not in FAMILIES:
            raise ValueError(f"family must be 'auto' or one of {', '.join(FAMILIES)}, got {self.family!r}")
        for name, allowed in (("split_layers", ("shortcut", "shortcut+conv1")), ("act_init", ("official", "fp-all")),
                              ("act_recon_inputs", ("fp", "quantized"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def settings(self, family: str) -> dict:
        """The effective value of every family-dependent field: the config's own where set, else the family's."""
        official = FAMILIES[family]
        out = {k: (getattr(self, k) if getattr(self, k) is not None else official[k]) for k in FAMILY_FIELDS}
        return {**out, "running_stat_batch": official["running_stat_batch"],
                "running_stat_shuffle": official["running_stat_shuffle"]}


@register_method("qdiffusion")
class QDiffusion(QuantMethod):
    config_cls = QDiffusionConfig

    def paper_scope(self) -> Scope:
        """Every conv and linear, first and last included at the run's bits, attention matmuls quantized."""
        return replace(UNIFORM, name="paper", first_last_bits=None, attention_matmuls=True)

    def settings(self, calib: CalibrationSource) -> dict:
        """The configuration resolved for the calibrated model's family (saved in the structure)."""
        family = self.config.family if self.config.family != "auto" else model_family(calib.model_name)
        return {"family": family, **self.config.settings(family)}

    def _samples(self, calib: CalibrationSource, st: dict):
        traj = calib.trajectories(st["calib_images"])
        return traj.at_steps(uniform_steps(traj.num_steps, st["calib_steps"])), traj.num_steps

    def structure(self, denoiser: Denoiser, calib: CalibrationSource) -> dict:
        st = self.settings(calib)
        if not st["split"]:
            return {"splits": {}, "settings": st}
        samples, _ = self._samples(calib, st)
        device = calib.device
        cond0 = samples["cond"][:1].to(device) if samples.get("cond") is not None else None
        splits = find_denoiser_splits(denoiser, samples["x"][:1].to(device), samples["t"][:1].to(device), cond0)
        if self.config.split_layers == "shortcut":  # official: only the layer that sees the raw concatenation
            splits = {n: k for n, k in splits.items() if n.endswith(".conv_shortcut")}
        return {"splits": splits, "settings": st}

    def layer(self, name, module, w_bits, a_bits, structure):
        return QuantLayer(module, w_bits, a_bits, w_symmetric=False, w_channelwise=True,
                          a_symmetric=structure["settings"]["a_symmetric"], split=structure["splits"].get(name, 0))

    def extend(self, denoiser: Denoiser, bits: BitConfig, scope: Scope, summary, structure) -> Denoiser:
        cfg: QDiffusionConfig = self.config
        if cfg.quant_attention and scope.attention_matmuls and bits.a < OFF_BITS:
            st = structure["settings"]
            quantize_attention(denoiser.unet, bits.a, st["softmax_bits"], st["a_symmetric"],
                               softmax_symmetric=st["a_symmetric"])
            summary.extra.update(attention_summary(denoiser.unet))
        return denoiser

    def calibrate(self, denoiser: Denoiser, calib: CalibrationSource, bits: BitConfig, artifact_dir: Path) -> dict:
        cfg: QDiffusionConfig = self.config
        st = self.settings(calib)
        device = calib.device
        samples, num_steps = self._samples(calib, st)
        unet = denoiser.unet
        layers = quant_layers(unet)
        for layer in layers.values():
            layer.init_weight_range(st["w_init"], p=cfg.a_p)

        act_qs = [q for ly in layers.values() if ly.quant_act for q in ly.act_quantizers()]
        act_qs += [q for p in attention_processors(unet).values() for q in p.quantizers().values()]
        init_batches = random_batches(samples, cfg.act_init_samples, cfg.act_init_samples)
        running_batches = 0

        def init_acts() -> None:
            nonlocal running_batches
            if cfg.act_init == "official":
                fit_ranges_online(denoiser, act_qs, init_batches, st["a_init"], cfg.a_p, None, device)
            else:
                with AttentionRangeObserver(unet, st["a_init"], cfg.a_p):
                    init_activation_ranges(denoiser, layers, samples, num_steps, method=st["a_init"], p=cfg.a_p,
                                           device=device)
            if st["running_stat"] and act_qs:
                running_batches = running_stat(denoiser, act_qs, init_batches[0], samples, st, device)

        base = ReconConfig(batch_size=st["batch_size"], w_lr=cfg.w_lr, a_lr=cfg.a_lr, round_weight=cfg.round_weight,
                           b_range=(cfg.b_start, cfg.b_end), warmup=cfg.warmup, asym=True,
                           max_samples=cfg.recon_samples, progress=cfg.progress)
        learn_w, learn_a = bits.w < OFF_BITS, bits.a < OFF_BITS
        stats: dict[str, dict] = {}
        if cfg.joint:
            init_acts()
            stats["joint"] = reconstruct(denoiser, calib.denoiser, samples, num_steps, replace(
                base, iters=cfg.joint_iters, learn_weights=learn_w, learn_acts=learn_a, act_quant=learn_a,
                p=cfg.a_p), device)
        else:
            if learn_w:
                stats["weights"] = reconstruct(denoiser, calib.denoiser, samples, num_steps, replace(
                    base, iters=cfg.weight_iters, learn_weights=True, learn_acts=False, act_quant=False, p=cfg.w_p),
                    device)
            init_acts()
            if learn_a:
                stats["acts"] = reconstruct(denoiser, calib.denoiser, samples, num_steps, replace(
                    base, iters=cfg.act_iters, learn_weights=False, learn_acts=True, act_quant=True, p=cfg.a_p,
                    asym=cfg.act_recon_inputs == "quantized"), device)
        return {
            "family": st["family"],
            "running_stat_batches": running_batches,
            "attention_matmuls_quantized": 2 * len(attention_processors(unet)),
            "shortcut_splits": sum(1 for ly in layers.values() if ly.split),
            "calib_samples": int(samples["x"].shape[0]),
            "recon_units": max((len(s) for s in stats.values()), default=0),
        }


def running_stat(denoiser: Denoiser, quantizers: list, init_batch: dict, samples: dict, st: dict, device) -> int:
    """Q-Diffusion's ``--running_stat`` (``act_momentum_update``, momentum 0.95): after the activation
    init, every activation quantizer (softmax included) tracks ``m * range + (1 - m) * [min, max]``
    of its input over the whole calibration set, weights and upstream activations quantized, the
    range updated before each batch is quantized. The average starts from the raw min/max of the
    init batch, as the official quantizer records it at initialisation (here: that batch run again
    at the start of the pass). Batches of ``running_stat_batch``, shuffled or in order as the
    family's script does; a last partial batch is dropped (``int(N / batch)``). Returns #batches."""
    n, b = samples["x"].shape[0], st["running_stat_batch"]
    usable = n - n % b
    if usable == 0:  # fewer samples than one batch: the official loop runs int(N / batch) = 0 times
        return 0
    if st["running_stat_shuffle"]:
        batches = random_batches(samples, b, usable, seed=1)
    else:
        batches = [{k: (v[i : i + b] if isinstance(v, torch.Tensor) else v) for k, v in samples.items()}
                   for i in range(0, usable, b)]
    fit_ranges_online(denoiser, quantizers, [init_batch, *batches], "minmax", momentum=RUNNING_STAT_MOMENTUM,
                      device=device)
    return len(batches)
