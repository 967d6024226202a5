"""BRECQ-style block reconstruction for diffusers UNets (Li et al., ICLR 2021), with AdaRound and LSQ.

The quantized UNet is cut into *units*, reconstructed one at a time in execution order:

* blocks: ``ResnetBlock2D``, ``Attention`` (UNet2DModel's attention blocks, including the
  matmul quantizers of a :class:`~methods.quant.attention.QuantAttnProcessor`),
  ``BasicTransformerBlock`` (UNet2DConditionModel), ``Downsample2D``, ``Upsample2D``;
* layers: every :class:`~methods.quant.layers.QuantLayer` outside all blocks
  (``conv_in``, ``conv_out``, the time-embedding linears, transformer ``proj_in``/``proj_out``),
  reconstructed layer-wise.

For each unit, forward hooks cache, on the calibration samples, its inputs (all call
arguments and keyword arguments, e.g. ``(hidden_states, temb)`` of a resnet) from the
*quantized* model, whose earlier units are already reconstructed (``asym=True``, as
Q-Diffusion and BRECQ's ``asym`` option; ``asym=False`` takes the FP model's inputs), and its
output from the *FP* model as the target. The forward passes stop at the unit (an
exception raised from the hook), so caching costs a partial forward per unit; the FP targets of
all units are cached in one pass up front.

Then, with Adam, the unit minimises ``lp_loss(unit(inputs), target)`` (``|.|^p`` summed over
channels, averaged over the rest, as BRECQ) plus the AdaRound regulariser (weight 0.01,
``beta`` 20 -> 2 after a 20 % warm-up), learning the AdaRound variables of its weights
(lr 1e-3, BRECQ's default) and/or the step sizes of its activation quantizers (LSQ,
lr 4e-4 with cosine decay), on minibatches of distinct samples (``replacement=False``, as the
official codes; ``True`` draws with replacement). Units run in eval mode (no dropout; the
official codes leave the block in train mode). Optional QDrop (Wei et al., ICLR 2022): each activation
quantizer's output is replaced by its input with probability ``drop_prob`` during
optimisation. Rounding is hardened at the end of each unit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from methods.quant.adaround import AdaRoundQuantizer, attach_adaround, hardness, round_loss
from methods.quant.attention import QuantAttnProcessor
from methods.quant.base import Quantizer
from methods.quant.calibrate import Batch, call_at_step, iterate_by_step
from methods.quant.layers import QuantLayer, quantizers_disabled
from models.denoiser import Denoiser

BLOCK_TYPES = ("ResnetBlock2D", "Attention", "BasicTransformerBlock", "Downsample2D", "Upsample2D")


@dataclass
class ReconConfig:
    iters: int = 20000  # Adam steps per unit
    batch_size: int = 32
    learn_weights: bool = True  # AdaRound
    learn_acts: bool = False  # LSQ step sizes of the unit's activation (and attention matmul) quantizers
    act_quant: bool = False  # activation quantizers on (in the cached inputs and the unit) during this pass
    w_lr: float = 1e-3
    a_lr: float = 4e-4
    p: float = 2.0  # L_p reconstruction loss (Q-Diffusion: 2 for weights, 2.4 for activations)
    round_weight: float = 0.01
    b_range: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    asym: bool = True  # quantized-model inputs vs FP targets
    drop_prob: float = 0.0  # QDrop; 0 = off
    replacement: bool = False  # minibatch indices drawn with replacement (False: distinct, as BRECQ/Q-Diffusion)
    max_samples: int | None = None  # cache at most this many calibration samples (spread over the set)
    cache_batch: int = 64
    progress: bool = True
    seed: int = 0


@dataclass
class Unit:
    name: str
    module: nn.Module
    kind: str  # "block" or "layer"
    layers: dict[str, QuantLayer] = field(default_factory=dict)


class _Stop(Exception):
    pass


def find_units(unet: nn.Module) -> list[Unit]:
    """Blocks (outermost matching modules) and leftover quantized layers, in registration order."""
    units: list[Unit] = []
    claimed: set[str] = set()
    for name, module in unet.named_modules():
        if any(name == c or name.startswith(c + ".") for c in claimed):
            continue
        if type(module).__name__ in BLOCK_TYPES:
            layers = {f"{name}.{n}": m for n, m in module.named_modules() if isinstance(m, QuantLayer)}
            has_attn = any(isinstance(m, QuantAttnProcessor) for m in module.modules())
            claimed.add(name)
            if layers or has_attn:
                units.append(Unit(name, module, "block", layers))
        elif isinstance(module, QuantLayer):
            claimed.add(name)
            units.append(Unit(name, module, "layer", {name: module}))
    return units


def _sample_subset(samples: Batch, k: int | None) -> Batch:
    n = samples["x"].shape[0]
    if k is None or k >= n:
        return samples
    idx = torch.linspace(0, n - 1, k).round().long()  # evenly spread: every step keeps its share
    return {key: (v[idx] if isinstance(v, torch.Tensor) else v) for key, v in samples.items()}


def execution_order(denoiser: Denoiser, units: list[Unit], samples: Batch, num_steps: int, device) -> list[Unit]:
    """Sort units by their first call in one forward pass of a single sample."""
    first: dict[str, int] = {}
    def seen(name: str) -> None:  # a pre-hook must return None (a value would replace the inputs)
        first.setdefault(name, len(first))

    handles = [u.module.register_forward_pre_hook(lambda m, a, name=u.name: seen(name)) for u in units]
    try:
        one = _sample_subset(samples, 1)
        with torch.no_grad():
            call_at_step(denoiser, one, num_steps, device)
    finally:
        for h in handles:
            h.remove()
    return sorted((u for u in units if u.name in first), key=lambda u: first[u.name])


# ---- caching ------------------------------------------------------------------------------------------
def _stack_calls(calls: list[tuple[tuple, dict]]) -> tuple[list, dict, int]:
    """Concatenate captured (args, kwargs) along the batch dimension."""
    sizes = [a[0].shape[0] for a, _ in calls]
    total = sum(sizes)

    def merge(values: list):
        v0 = values[0]
        if isinstance(v0, torch.Tensor) and v0.dim() > 0 and all(v.shape[0] == s for v, s in zip(values, sizes)):
            return torch.cat([v.detach() for v in values])
        return v0

    args = [merge([c[0][i] for c in calls]) for i in range(len(calls[0][0]))]
    kwargs = {k: merge([c[1][k] for c in calls]) for k in calls[0][1]}
    return args, kwargs, total


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    return out.sample


@torch.no_grad()
def _capture(denoiser: Denoiser, module: nn.Module, samples: Batch, num_steps: int, device, batch: int,
             want_output: bool) -> tuple[list, dict, torch.Tensor | None]:
    """Inputs (and optionally output) of ``module`` on all samples; the forward stops right after it."""
    calls: list[tuple[tuple, dict]] = []
    outs: list[torch.Tensor] = []

    def pre(m, args, kwargs):
        calls.append((args, kwargs))
        if not want_output:
            raise _Stop

    def post(m, args, kwargs, out):
        outs.append(_first_tensor(out).detach())
        raise _Stop

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = module.register_forward_hook(post, with_kwargs=True) if want_output else None
    try:
        for b in iterate_by_step(samples, batch):
            try:
                call_at_step(denoiser, b, num_steps, device)
            except _Stop:
                pass
    finally:
        h1.remove()
        if h2 is not None:
            h2.remove()
    args, kwargs, _ = _stack_calls(calls)
    return args, kwargs, (torch.cat(outs) if want_output else None)


@torch.no_grad()
def _capture_outputs(denoiser: Denoiser, modules: dict[str, nn.Module], samples: Batch, num_steps: int, device,
                     batch: int) -> dict[str, torch.Tensor]:
    """Outputs of all ``modules`` on all samples in one full forward pass per batch (FP targets)."""
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: outs[n].append(_first_tensor(out).detach()))
               for n, m in modules.items()]
    try:
        for b in iterate_by_step(samples, batch):
            call_at_step(denoiser, b, num_steps, device)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in outs.items()}


# ---- quantizer state ----------------------------------------------------------------------------------
def _act_quantizers(module: nn.Module) -> list[Quantizer]:
    """The active activation quantizers of a unit: its layers' input quantizers and attention matmul inputs."""
    qs: list[Quantizer] = []
    for m in module.modules():
        if isinstance(m, QuantLayer) and m.quant_act:
            qs += [q for q in m.act_quantizers() if isinstance(q, Quantizer)]
        elif isinstance(m, QuantAttnProcessor):
            qs += list(m.quantizers().values())
    return [q for q in qs if q.active]


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """BRECQ's reconstruction loss: ``|pred - target|^p`` summed over dim 1, averaged over the rest."""
    err = (pred - target).abs().pow(p)
    return err.sum(1).mean() if err.dim() > 1 else err.mean()


# ---- the engine ---------------------------------------------------------------------------------------
def reconstruct_unit(unit: Unit, inputs: tuple[list, dict, int], target: torch.Tensor, cfg: ReconConfig,
                     gen: torch.Generator) -> dict:
    args, kwargs, n = inputs
    ada: list[AdaRoundQuantizer] = []
    if cfg.learn_weights:
        for layer in unit.layers.values():
            ada += attach_adaround(layer)
    # LSQ: every active activation quantizer that declares a learnable step (UniformQuantizer does).
    acts = _act_quantizers(unit.module) if (cfg.learn_acts and cfg.act_quant) else []
    learned = [(q, q.learnable_step()) for q in acts]
    learned = [(q, s) for q, s in learned if s is not None]
    for q in ada:
        q.alpha.requires_grad_(True)
    scales = [s for _, s in learned]
    for s in scales:
        s.requires_grad_(True)
    opt_w = torch.optim.Adam([q.alpha for q in ada], lr=cfg.w_lr) if ada else None
    opt_a = torch.optim.Adam(scales, lr=cfg.a_lr) if scales else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=cfg.iters, eta_min=0.0) if opt_a else None
    hooks = []
    if cfg.drop_prob > 0 and cfg.act_quant:
        def drop(m, inp, out):
            keep_fp = torch.rand(out.shape, device=out.device) < cfg.drop_prob
            return torch.where(keep_fp, inp[0], out)
        hooks = [q.register_forward_hook(drop) for q in _act_quantizers(unit.module)]
    first = last = None
    was_training = unit.module.training
    unit.module.eval()
    try:
        if opt_w is None and opt_a is None:
            return {"iters": 0}
        for it in range(cfg.iters):
            if cfg.replacement:
                idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen)
            else:  # distinct indices within a minibatch (torch.randperm(n)[:batch], the official codes)
                idx = torch.randperm(n, generator=gen)[: min(cfg.batch_size, n)]
            idx = idx.to(target.device)
            a = [v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v for v in args]
            kw = {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
                  for k, v in kwargs.items()}
            out = _first_tensor(unit.module(*a, **kw))
            rec = lp_loss(out, target[idx], cfg.p)
            loss = rec + round_loss(ada, it, cfg.iters, cfg.round_weight, cfg.warmup, cfg.b_range).to(rec.device)
            for opt in (opt_w, opt_a):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in (opt_w, opt_a):
                if opt is not None:
                    opt.step()
            if sched is not None:
                sched.step()
            if first is None:
                first = rec.item()
            last = rec.item()
    finally:
        for h in hooks:
            h.remove()
        soft_hard = hardness(ada)
        for q in ada:
            q.harden()
        for q, _ in learned:
            q.settle_step()
        unit.module.train(was_training)
    return {"iters": cfg.iters, "loss_first": first, "loss_last": last, "soft_hardness": soft_hard}


def reconstruct(
    qdenoiser: Denoiser, fp_denoiser: Denoiser, samples: Batch, num_steps: int, cfg: ReconConfig,
    device: torch.device | str = "cpu", units: list[Unit] | None = None,
) -> dict[str, dict]:
    """Reconstruct every unit of ``qdenoiser.unet`` in execution order; return per-unit statistics."""
    unet = qdenoiser.unet
    for p in unet.parameters():
        p.requires_grad_(False)
    for layer in unet.modules():
        if isinstance(layer, QuantLayer):
            layer.unfreeze()
    samples = _sample_subset(samples, cfg.max_samples)
    gen = torch.Generator().manual_seed(cfg.seed)
    stats: dict[str, dict] = {}
    with quantizers_disabled(unet, acts=not cfg.act_quant):
        units = execution_order(qdenoiser, units if units is not None else find_units(unet), samples, num_steps,
                                device)
        targets: dict[str, torch.Tensor] = {}
        if cfg.asym:  # all FP targets in one pass (the FP model does not change)
            fp_modules = {u.name: fp_denoiser.unet.get_submodule(u.name) for u in units}
            targets = _capture_outputs(fp_denoiser, fp_modules, samples, num_steps, device, cfg.cache_batch)
        bar = tqdm(units, desc="recon", unit="unit", disable=not cfg.progress, leave=False)
        for unit in bar:
            start = time.perf_counter()
            fp_module = fp_denoiser.unet.get_submodule(unit.name)
            if cfg.asym:
                args, kwargs, _ = _capture(qdenoiser, unit.module, samples, num_steps, device, cfg.cache_batch, False)
                target = targets.pop(unit.name)
            else:
                args, kwargs, target = _capture(fp_denoiser, fp_module, samples, num_steps, device,
                                                cfg.cache_batch, True)
            n = target.shape[0]
            s = reconstruct_unit(unit, (args, kwargs, n), target, cfg, gen)
            s["seconds"] = time.perf_counter() - start
            stats[unit.name] = s
            bar.set_postfix(unit=unit.name, loss=s.get("loss_last"))
    return stats
