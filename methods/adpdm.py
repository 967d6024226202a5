"""``adpdm``: ADP-DM / APQ-DM, the variant of the *official code* (``ChangyuanWang17/APQ-DM``).

Wang et al., "Towards Accurate Post-training Quantization for Diffusion Models", CVPR 2024
(arXiv 2305.18723; v1 "... Data-free Quantization ..." = ADP-DM). The paper and the code
differ (``docs/methods/adpdm.md``); this row is the code, and each point below
says which source it follows:

* **Activation groups** (paper: timesteps' quantization functions grouped by importance
  weights found by differentiable search; code: the concrete form). Per quantized layer and
  sampler step, ``G = 8`` candidate clipping ranges from binned per-channel statistics and
  softmax importance logits per (step, group, channel); the calibration output is the
  importance-weighted sum of the ``G`` fake-quantized inputs
  (:class:`methods.quant.group_search.GroupMixtureQuantizer`). Asymmetric, ``2^b`` levels.
* **Loss** (code): the quantized model's own noise-prediction error on re-noised states,
  ``|| eps_q(sqrt(a_t) x_c + sqrt(1 - a_t) e, t) - e ||^2`` (summed over pixels, averaged over
  the batch, as ``noise_estimation_loss``), plus ``entropy_weight`` (1.0) x the group-weight
  entropy / G^2 summed over layers. Only the logits are trained: AdamW, lr 0.05, weight decay
  0.05, a fresh optimizer per round, one step per sampler step per round. *Deviation*: the
  official loop feeds each step the quantized model's own DDIM chain started from the
  calibration state; we re-noise the FP calibration state ``x_c`` itself at every step (same
  loss form, no dependence on a drifting quantized chain). ``alphas_cumprod`` comes from the
  calibration source.
* **Candidate ranges** (code): recomputed from each round's batch at each step (the last
  round's batch wins, as in the code), per-channel min/max widened to at least the floor
  range [-4, 6] x f, where f is chosen in the first round among 1.0, 0.9, ..., 0.2 by the
  least L_0.5 error (kept only if below 0.2, "as in LAPQ").
* **Calibration timestep selection** (paper: structural risk minimisation, entropy and
  sampling counts plus an MMD term; code: no MMD). Each round the FP model generates a fresh
  batch (``calib.generate``), and the step with the highest summed group-weight entropy minus
  2 x times already picked is chosen among step indices >= 30 % of the schedule (30 of 100 in
  the code, scaled); its FP trajectory state is the round's calibration batch.
* **Inference** (code): per step, the importance-weighted average of the ``G`` ranges (soft,
  no argmax), exported into a :class:`methods.quant.step_table.StepTableQuantizer`: one fixed
  parameter set per step, a table lookup through the timestep context. The *timestep
  partition* reported (plot + JSON) is the dominant group per step per layer.
* **Per-step state and other step counts**: tables are tied to the calibration schedule;
  sampling with a different step count maps each call to the nearest calibrated timestep.
* **Weights** -- *deviation from the official code*. The code quantizes weights per output
  channel with step max/(2^(b-1)-1), clamped to [min, max]: a symmetric grid set by the
  positive side only. Our default, ``weight_symmetric=False``, is per-channel **asymmetric**
  min-max round-to-nearest, the same weight rule as the ``rtn`` baseline, so the ADP-DM row
  differs from RTN only in its activations (the method's contribution). Why: at 4 bits a
  symmetric grid halves the levels a skewed channel can use; on tiny-cifar10 at W4A8 (fast
  preset, 32 images, paired MSE) the official rule gives 0.0133 and the asymmetric one 0.0047,
  against RTN's 0.0049 (``results/README.md``). ``weight_symmetric=True`` restores the
  official grid (as per-channel symmetric min-max, step max|w|/(2^(b-1)-1): identical when
  |min| <= max; when |min| > max the official clamp silently uses more than 2^b levels, ours
  never does). ``weight_recon=True`` (not in the official code) replaces RTN weights by
  BRECQ + AdaRound from ``methods.quant.recon``, activations off, before the group search.
* **Granularity**: ``per-channel`` activation ranges, as released (simulation only: a
  per-input-channel scale cannot be folded into an integer matmul), or ``per-tensor``
  (deployable). Reported in the config and in the facts.
* **Scope**: ``paper_scope`` is the code's (ResnetBlock conv1/conv2 only, everything else FP);
  under the harness's ``uniform`` scope every conv/linear gets the timestep-aware quantizer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from methods.base import BitConfig, CalibrationSource, MethodConfig, QuantMethod
from methods.quant.group_search import (
    GroupMixtureQuantizer,
    SRMSelector,
    entropy_regulariser,
    sum_step_entropies,
)
from methods.quant.layers import QuantLayer
from methods.quant.step_table import StepTableQuantizer, channel_axis_of, in_channels_of
from methods.quant.surgery import Scope, freeze_all, quant_layers
from methods.quant.timestep import timestep_context
from methods.registry import register_method
from models.denoiser import Denoiser

GRANULARITIES = ("per-channel", "per-tensor")


@dataclass
class ADPDMConfig(MethodConfig):
    """ADP-DM hyperparameters. ``paper``: the official code's values. ``fast`` (CPU smoke) changes:

    * ``calib_images`` 1024 -> 4 and ``batch_size`` 16 -> 2: 2 rounds instead of 64
      (each round = one FP generation of the batch + one fwd/bwd per sampler step; the
      8-way mixture makes each step costly on a CPU);
    * with ``weight_recon``: 80 reconstruction iterations per block on 64 cached samples;
    * nothing else: groups, lr, weight decay, entropy weight, selector rule and range init
      are the official ones. Fewer rounds means fewer AdamW steps per step's logits (4 vs 64),
      so the group weights stay closer to uniform (the inference range is then close to the
      mean of the ``G`` candidate ranges).
    """

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
    floor_lo: float = -4.0  # official initial activation range [-4, 6]; None-like: set floor=False
    floor_hi: float = 6.0
    floor: bool = True
    weight_symmetric: bool = False  # True: the official code's symmetric weight grid (see module docstring)
    weight_recon: bool = False  # BRECQ + AdaRound weights via methods.quant.recon (official: min-max RTN)
    recon_images: int = 256  # with weight_recon: FP trajectories, at 20 uniformly spaced steps
    recon_iters: int = 20000  # Adam steps per block (Q-Diffusion's value)
    recon_batch: int = 32
    recon_samples: int | None = None  # cache at most this many samples (None: all)
    seed: int = 0

    PRESETS = {"paper": {}, "fast": {"calib_images": 4, "batch_size": 2, "recon_images": 32, "recon_iters": 80,
                                     "recon_batch": 8, "recon_samples": 64}}

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")

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
        layer = QuantLayer(module, w_bits, a_bits, w_symmetric=self.config.weight_symmetric, a_symmetric=False)
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
        for q in mixers.values():
            q.calibrating = q.search_floor = False
        unet.train(was_training)

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
            "weights": ("per-channel symmetric min-max RTN (official)" if cfg.weight_symmetric
                        else "per-channel asymmetric min-max RTN") + (" + BRECQ/AdaRound" if cfg.weight_recon else ""),
            "rounds": cfg.rounds,
            "calib_steps_picked": selector.history,
            "groups_per_layer_mean": sum(distinct) / max(1, len(distinct)),
            "round_loss": losses,
        }


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
