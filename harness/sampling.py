"""Samplers (k-diffusion style: plain functions, one signature, a per-step callback).

``sample_ddim(denoiser, x, schedule, ...)`` and ``sample_ddpm(...)`` share the signature.
The sampler owns the timestep: it enters a timestep context before every denoiser
call, and timestep-aware quantizers read it from there.

Determinism: image ``i`` of a run draws its initial noise (and its class label and
any ancestral noise) from its own generator seeded with its seed, so an image does
not depend on which batch it was in, on the batch size, or on the number of GPUs.

Why a hand-written DDIM update: the papers' protocol uses DDIM's *quadratic* timestep
spacing (Song et al., ICLR 2021, App. D.2), which diffusers' ``DDIMScheduler`` cannot
step through (its previous timestep is ``t - T // S``). The update below is Eq. 12 of
the DDIM paper; a unit test checks it against ``DDIMScheduler.step`` on the spacings
diffusers supports. DDPM ancestral steps go through ``DDPMScheduler.step`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDPMScheduler

from methods.quant.timestep import timestep_context
from methods.registry import Registry
from models.denoiser import Denoiser

# callback(step_index, t, x_t, eps): x_t is the denoiser's input at that step.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def make_timesteps(num_train: int, steps: int, spacing: str) -> list[int]:
    """Descending timesteps: ``uniform`` (DDIM skip_type uniform), ``quad``, or ``linspace``."""
    if steps < 1 or steps > num_train:
        raise ValueError(f"steps must be in 1..{num_train}, got {steps}")
    if spacing == "uniform":
        seq = list(range(0, num_train, num_train // steps))[:steps]
    elif spacing == "quad":
        # DDIM's official code: (linspace(0, sqrt(0.8 T), S))^2, truncated to int.
        seq = [int(s) for s in np.linspace(0, np.sqrt(num_train * 0.8), steps) ** 2]
    elif spacing == "linspace":
        seq = [int(round(s)) for s in np.linspace(0, num_train - 1, steps)]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}: use uniform, quad or linspace")
    # Note: quad spacing repeats small timesteps (100 of 1000 steps gives t = 0 four times).
    # That is what DDIM's official code, and so Q-Diffusion's and APQ-DM's protocol, samples
    # with; a repeated step is a no-op re-estimate of eps, and we keep it for fidelity.
    return seq[::-1]


@dataclass(frozen=True)
class Schedule:
    """What a sampler needs of the noise schedule: descending timesteps and alpha-bar."""

    timesteps: tuple[int, ...]
    alphas_cumprod: torch.Tensor
    clip_sample: bool = True
    scheduler: DDPMScheduler | None = field(default=None, compare=False)  # the model's, for schedulers' step()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alpha_bar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def prev(self, step_index: int) -> int:
        return self.timesteps[step_index + 1] if step_index + 1 < self.num_steps else -1


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def per_image_randn(gens: list[torch.Generator], shape: Sequence[int]) -> torch.Tensor:
    """One standard-normal draw of ``shape`` per image, each from that image's generator (CPU)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


def _call(denoiser: Denoiser, x: torch.Tensor, i: int, t: int, n: int, cond) -> torch.Tensor:
    with timestep_context(i, t, n):
        return denoiser(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), cond)


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    gens: list[torch.Generator] | None = None,
    cond: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al., 2021, Eq. 12): deterministic for ``eta=0``, ancestral-like for ``eta=1``."""
    n = schedule.num_steps
    for i, t in enumerate(schedule.timesteps):
        eps = _call(denoiser, x, i, t, n, cond).float()
        if callback is not None:
            callback(i, t, x, eps)
        a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(schedule.prev(i))
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if schedule.clip_sample:
            x0 = x0.clamp(-1, 1)  # eps is not re-derived from the clipped x0 (diffusers' default)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * per_image_randn(gens, x.shape[1:]).to(x.device)
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    eta: float = 1.0,
    gens: list[torch.Generator] | None = None,
    cond: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling through the model's ``DDPMScheduler.step`` on the schedule's timesteps."""
    scheduler = schedule.scheduler
    if scheduler is None:
        raise ValueError("sample_ddpm needs a schedule that carries the model's DDPMScheduler (make_schedule)")
    scheduler.set_timesteps(timesteps=list(schedule.timesteps))
    n = schedule.num_steps
    for i, t in enumerate(schedule.timesteps):
        eps = _call(denoiser, x, i, t, n, cond).float()
        if callback is not None:
            callback(i, t, x, eps)
        # randn_tensor inside step() draws image j's noise from gens[j]: per-image determinism holds.
        x = scheduler.step(eps, t, x, generator=gens).prev_sample
    return x


# Every sampler: ``f(denoiser, x_T, schedule, *, eta, gens, cond, callback) -> x_0``.
SAMPLERS: Registry = Registry("sampler", "dmqbench.samplers", builtins=("harness.sampler_plms",))
SAMPLERS.register("ddim", sample_ddim)
SAMPLERS.register("ddpm", sample_ddpm)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images -> uint8 NCHW, rounding to nearest (tested: -1 -> 0, 1 -> 255, 0 -> 128)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
