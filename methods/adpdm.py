"""``adpdm``: ADP-DM / APQ-DM (Wang et al., "Towards Accurate Post-training Quantization for Diffusion
Models", CVPR 2024, arXiv 2305.18723; v1 "... Data-free Quantization ..." = ADP-DM), following the
*official code* ``ChangyuanWang17/APQ-DM`` where paper and code differ.

Algorithm (docs/methods/adpdm.md has the per-point comparison; measurements are in results/README.md):

* **Groups**: per quantized layer input and sampler step, ``G = 8`` candidate clipping ranges from
  binned per-channel extremes (floor range [-4, 6] x f, f searched in round 0 by L_0.5) and softmax
  importance logits per (step, group, channel); during calibration the output is the weighted sum
  of the ``G`` fake-quantized inputs (:class:`methods.quant.group_search.GroupMixtureQuantizer`).
* **Search**: rounds of ``batch_size`` fresh FP trajectories (``calib_images / batch_size`` rounds);
  each round picks a step by the official selector (entropy - 2 x times picked, steps >= 30 % of the
  schedule) and, for every step, re-noises that FP state, and takes one AdamW step (lr 0.05, wd 0.05)
  on the logits against the quantized model's eps error + entropy / G^2.
* **Inference**: per step, the weight-averaged range, exported into a ``StepTableQuantizer``.
* **Weights** (``weight_rule``): ``official`` (paper preset) = the code's rule
  (:class:`~methods.quant.group_search.APQWeightQuantizer`); ``asymmetric`` (our default, ``fast``) =
  per-channel min-max RTN as the ``rtn`` row; ``symmetric`` = max|w| signed grid (not the official rule).
  ``weight_recon=True`` (not in the code) adds BRECQ + AdaRound weights.

Deviations and named variants (paper preset = official where a variant exists):

* ``search_weights``: ``fp`` (official: calibrate mode uses FP weights) or ``quantized`` (ours);
* ``input_grad``: ``none`` (official: plain round, conv1 logits get no data gradient) or ``ste`` (ours);
* calibration states: the FP state is re-noised at every step as is; the code maps it through
  ``inverse_data_transform`` ((x+1)/2 clamped to [0, 1]) and follows a DDIM chain driven by the
  quantized model, re-noised each step as if it were x0 (declared, not offered);
* the round-0 floor search scores the first 2 images of the batch (cost); tables map another
  step count to the nearest calibrated timestep; under the ``uniform`` scope the [-4, 6] floor applies
  to every conv/linear input (the code only has ResnetBlock convs), and the facts count the
  (layer, step) pairs whose 8 candidate ranges are all identical.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from methods.base import BitConfig, CalibrationSource, MethodConfig, QuantMethod
from methods.quant.group_search import (
    APQWeightQuantizer,
    GroupMixtureQuantizer,
    SRMSelector,
    entropy_regulariser,
    sum_step_entropies,
)
from methods.quant.layers import QuantLayer, quantizers_disabled
from methods.quant.step_table import StepTableQuantizer, channel_axis_of, in_channels_of
from methods.quant.surgery import Scope, freeze_all, quant_layers
from methods.quant.timestep import timestep_context
from methods.registry import register_method
from models.denoiser import Denoiser

GRANULARITIES = ("per-channel", "per-tensor")
WEIGHT_RULES = ("asymmetric", "official", "symmetric")
WEIGHT_LABELS = {"asymmetric": "per-channel asymmetric min-max RTN",
                 "official": "official APQ-DM rule (step max(0, w_max)/(2^(b-1)-1), clamp to [w_min, w_max])",
                 "symmetric": "per-channel symmetric max|w| RTN (not the official rule)"}


@dataclass
class ADPDMConfig(MethodConfig):
    """ADP-DM hyperparameters. ``paper``: the official code's values and rules (``weight_rule="official"``,
    ``search_weights="fp"``, ``input_grad="none"``). ``fast`` (CPU smoke): 12 rounds of 2 images (the
    official 64 rounds of 16; 24 rounds of 1 before 2026-12-02, the same 24 images in half the
    optimizer steps and about 2/3 of the time), our defaults for the three rules; with ``weight_recon``, 80 iterations
    per block on 64 cached samples. Everything else is official."""

    granularity: str = "per-channel"  # "per-channel" (as released, simulation-only) | "per-tensor"
    groups: int = 8
    calib_images: int = 1024
    batch_size: int = 16  # rounds = calib_images // batch_size
    lr: float = 0.05
    weight_decay: float = 0.05
    entropy_weight: float = 1.0
    logit_init: float = 0.01
    repeat_penalty: float = 2.0
    min_step_fraction: float = 0.3  # steps >= 30 of 100
    floor_lo: float = -4.0  # official initial activation range [-4, 6]
    floor_hi: float = 6.0
    floor: bool = True
    weight_rule: str = "asymmetric"  # "asymmetric" (rtn's) | "official" | "symmetric"
    search_weights: str = "quantized"  # weights during the search: "quantized" | "fp" (official)
    input_grad: str = "ste"  # mixture input gradient: "ste" | "none" (official)
    weight_recon: bool = False  # BRECQ + AdaRound weights via methods.quant.recon (official: min-max RTN)
    recon_images: int = 256  # with weight_recon: FP trajectories, at 20 uniformly spaced steps
    recon_iters: int = 20000  # Adam steps per block (Q-Diffusion's value)
    recon_batch: int = 32
    recon_samples: int | None = None  # cache at most this many samples (None: all)
    seed: int = 0

    PRESETS = {"paper": {"weight_rule": "official", "search_weights": "fp", "input_grad": "none"},
               "fast": {"calib_images": 24, "batch_size": 2, "recon_images": 32, "recon_iters": 80,
                        "recon_batch": 8, "recon_samples": 64}}

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        for name, allowed in (("weight_rule", WEIGHT_RULES), ("search_weights", ("quantized", "fp")),
                              ("input_grad", ("ste", "none"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.weight_rule == "official" and self.weight_recon:
            raise ValueError("weight_recon reconstructs on a uniform grid: use weight_rule 'asymmetric' or 'symmetric'")

    @property
    def rounds(self) -> int:
        return max(1, self.calib_images // self.batch_size)


@register_method("adpdm")
class ADPDM(QuantMethod):
    config_cls = ADPDMConfig

    def paper_scope(self) -> Scope:
        """Official code: only ResnetBlock conv1/conv2 are QConv2d; all else (incl. first/last) FP."""
        return Scope(
            name="paper",
            include=("*resnets.*.conv1", "*resnets.*.conv2"),
            first_last_bits=16,
            attention_matmuls=False,
        )

    def layer(self, name, module, w_bits, a_bits, structure):
        """Inference structure: a per-step table quantizer on every quantized input (filled by the search)."""
        layer = QuantLayer(module, w_bits, a_bits, w_symmetric=self.config.weight_rule == "symmetric",
                           a_symmetric=False)
        if self.config.weight_rule == "official":
            layer.weight_quantizer = APQWeightQuantizer(w_bits)
        if layer.quant_act:
            axis = channel_axis_of(module) if self.config.granularity == "per-channel" else None
            layer.act_quantizer = StepTableQuantizer(a_bits, False, axis)
        return layer

    def _reconstruct_weights(self, denoiser: Denoiser, calib: CalibrationSource, num_steps: int) -> None:
        """Optional (not in the official code): BRECQ + AdaRound weights from the engine, activations off,
        on FP trajectory states at uniformly spaced steps (Q-Diffusion's calibration set)."""
        from methods.quant.recon import ReconConfig, reconstruct
        from methods.rtn import uniform_steps

        cfg: ADPDMConfig = self.config
        traj = calib.trajectories(cfg.recon_images)
        samples = traj.at_steps(uniform_steps(traj.num_steps, min(20, traj.num_steps)))
        rc = ReconConfig(iters=cfg.recon_iters, batch_size=cfg.recon_batch, learn_weights=True, learn_acts=False,
                         act_quant=False, max_samples=cfg.recon_samples, seed=cfg.seed, progress=False)
        reconstruct(denoiser, calib.denoiser, samples, num_steps, rc, calib.device)

    def calibrate(self, denoiser: Denoiser, calib: CalibrationSource, bits: BitConfig, artifact_dir: Path) -> dict:
        cfg: ADPDMConfig = self.config
        timesteps = list(calib.timesteps)
        num_steps = len(timesteps)
        floor = (cfg.floor_lo, cfg.floor_hi) if cfg.floor else None
        per_channel = cfg.granularity == "per-channel"
        unet = denoiser.unet
        layers = quant_layers(unet)
        for layer in layers.values():  # the search runs on the mixture; the tables are filled at export
            if layer.quant_act:
                layer.act_quantizer = GroupMixtureQuantizer(
                    layer.a_bits, num_steps, cfg.groups, in_channels_of(layer.module), channel_axis_of(layer.module),
                    per_channel, floor, cfg.logit_init,
                ).to(calib.device)
                layer.act_quantizer.input_grad = cfg.input_grad == "ste"
        for layer in layers.values():
            layer.init_weight_range("minmax")
        if cfg.weight_recon:
            self._reconstruct_weights(denoiser, calib, num_steps)
        freeze_all(unet)  # weights are fixed during the search: cache them
        mixers = {
            n: ly.act_quantizer for n, ly in layers.items() if isinstance(ly.act_quantizer, GroupMixtureQuantizer)
        }
        for p in unet.parameters():
            p.requires_grad_(False)
        logits = [q.logits for q in mixers.values()]
        for p in logits:
            p.requires_grad_(True)

        selector = SRMSelector(num_steps, cfg.min_step_fraction, cfg.repeat_penalty)
        gen = torch.Generator().manual_seed(cfg.seed)
        device = calib.device
        abar = calib.alphas_cumprod.float()
        losses: list[float] = []
        was_training = unet.training
        unet.eval()
        fp_weights = quantizers_disabled(unet, acts=False, weights=True) if cfg.search_weights == "fp" else None
        if fp_weights is not None:  # official: the search sees FP weights (quantized only for inference)
            fp_weights.__enter__()
        for r in range(cfg.rounds):
            traj = calib.generate(cfg.batch_size, r)
            step = selector.select(sum_step_entropies(list(mixers.values()), num_steps))
            x_c = traj.x[:, step].float()
            cond = traj.cond.to(device) if traj.cond is not None else None
            for q in mixers.values():
                q.calibrating, q.search_floor = True, (r == 0)
            opt = torch.optim.AdamW(logits, lr=cfg.lr, weight_decay=cfg.weight_decay) if logits else None
            round_loss = 0.0
            for i, t in enumerate(timesteps):
                a = float(abar[t])
                e = torch.randn(x_c.shape, generator=gen)
                x_in = (math.sqrt(a) * x_c + math.sqrt(1 - a) * e).to(device)
                t_vec = torch.full((x_in.shape[0],), t, dtype=torch.long, device=device)
                with timestep_context(i, t, num_steps):
                    eps = denoiser(x_in, t_vec, cond).float()
                loss = (eps - e.to(device)).square().sum(dim=tuple(range(1, eps.dim()))).mean()
                if opt is None:
                    continue
                loss = loss + cfg.entropy_weight * entropy_regulariser(list(mixers.values()), i)
                opt.zero_grad()
                loss.backward()
                opt.step()
                round_loss += float(loss.detach())
            losses.append(round_loss / num_steps)
        if fp_weights is not None:
            fp_weights.__exit__(None, None, None)
        for q in mixers.values():
            q.calibrating = q.search_floor = False
        unet.train(was_training)
        kl = importance_kl(list(mixers.values()))
        flat = degenerate_candidates(list(mixers.values()))

        # ---- export: one fixed parameter set per step ----------------------------------
        partition: dict[str, list[int]] = {}
        weights: dict[str, torch.Tensor] = {}
        for name, q in mixers.items():
            partition[name] = q.dominant_groups()
            weights[name] = q.weights().mean(-1).detach().cpu()  # [S, G]
            layers[name].act_quantizer = q.export(timesteps)
        write_artifacts(Path(artifact_dir), weights, partition, timesteps, selector.history)
        distinct = [len(set(v)) for v in partition.values()]
        return {
            "granularity": cfg.granularity,
            "weights": WEIGHT_LABELS[cfg.weight_rule] + (" + BRECQ/AdaRound" if cfg.weight_recon else ""),
            "search_weights": cfg.search_weights,
            "input_grad": cfg.input_grad,
            "importance_kl_mean": kl[0],
            "importance_kl_max": kl[1],
            "importance_weight_max": kl[2],
            "identical_candidate_steps": flat,
            "rounds": cfg.rounds,
            "calib_steps_picked": selector.history,
            "groups_per_layer_mean": sum(distinct) / max(1, len(distinct)),
            "round_loss": losses,
        }


@torch.no_grad()
def importance_kl(mixers: list[GroupMixtureQuantizer]) -> tuple[float, float, float]:
    """KL(w || uniform) = log G - H(w) of every (layer, step, channel) weight vector: (mean, max), and max w."""
    if not mixers:
        return 0.0, 0.0, 0.0
    kls, wmax = [], 0.0
    for q in mixers:
        w = q.weights()  # [S, G, C']
        kls.append((w * (w.clamp_min(1e-12) * q.groups).log()).sum(1).flatten())
        wmax = max(wmax, float(w.max()))
    allkl = torch.cat(kls)
    return float(allkl.mean()), float(allkl.max()), wmax


@torch.no_grad()
def degenerate_candidates(mixers: list[GroupMixtureQuantizer]) -> dict[str, int]:
    """``(layer, step)`` pairs whose ``G`` candidate ranges are all identical (the floor covered every channel)."""
    pairs = layers = 0
    for q in mixers:
        same = ((q.group_lo == q.group_lo[:, :1]).all(1) & (q.group_hi == q.group_hi[:, :1]).all(1)) & q.has_range
        pairs += int(same.sum())
        layers += int(bool(same.any()))
    return {"layer_steps": pairs, "layers": layers, "of_layers": len(mixers)}


def write_artifacts(
    artifact_dir: Path, weights: dict[str, torch.Tensor], partition: dict[str, list[int]],
    timesteps: list[int], picked: list[int],
) -> dict[str, Path]:
    """``adpdm_groups.png`` (group weight per step per layer) and ``adpdm_partition.json``."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    part_path = artifact_dir / "adpdm_partition.json"
    part_path.write_text(json.dumps({"timesteps": timesteps, "picked_steps": picked, "dominant_group": partition},
                                    indent=1))
    out["adpdm_partition"] = part_path
    if not weights:
        return out
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(weights)
    dominant = torch.tensor([partition[n] for n in names])  # [L, S]
    strength = torch.stack([weights[n].max(-1).values for n in names])  # [L, S]
    groups = weights[names[0]].shape[-1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.16 * len(names) + 2.0), sharey=True)
    im0 = axes[0].imshow(dominant.numpy(), aspect="auto", cmap="tab10", vmin=-0.5, vmax=9.5, interpolation="nearest")
    axes[0].set_title("timestep partition: dominant group per step")
    im1 = axes[1].imshow(strength.numpy(), aspect="auto", cmap="viridis", vmin=1.0 / groups, vmax=1.0,
                         interpolation="nearest")
    axes[1].set_title("its importance weight (channel mean)")
    axes[0].set_yticks(range(len(names)), [n.replace("down_blocks", "d").replace("up_blocks", "u") for n in names],
                       fontsize=5)
    for ax in axes:
        ax.set_xlabel("sampler step (0 = noisiest)")
        for s in picked:
            ax.axvline(s, color="w", lw=0.4, alpha=0.5)
    fig.colorbar(im0, ax=axes[0], ticks=range(groups), label="group")
    fig.colorbar(im1, ax=axes[1], label="weight")
    path = artifact_dir / "adpdm_groups.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    out["adpdm_groups"] = path
    return out
