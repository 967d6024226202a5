"""PLMS: the pseudo linear multi-step sampler (Liu et al., ICLR 2022), as Stable Diffusion uses it.

The update is diffusers' ``PNDMScheduler`` with ``skip_prk_steps=True`` (crowsonkb's PLMS
for CompVis): a warm-up of two denoiser calls for the first step (an Euler step, then
the average of the two noise predictions from ``x_t0``), then Adams-Bashforth
combinations of the last 2, 3 and 4 noise predictions, each applied with the
pseudo-numerical transfer ``phi`` of the PNDM paper (Eq. 9). S steps cost S + 1 calls.

Why not drive ``PNDMScheduler.step`` directly: its previous timestep is always
``t - T // S``, so it cannot follow the harness's schedule (quad spacing, any timestep
list). This function runs the same arithmetic over ``schedule.timesteps``; a unit test
checks it against ``PNDMScheduler`` on the uniform (``leading``, no offset) spacing.

Timestep context: every denoiser call runs inside ``timestep_context(i, t, S)`` where ``i``
is the index of ``t`` in the schedule (the warm-up call at ``t1`` uses step 1, as the
regular call at ``t1`` does), so per-step quantizers calibrated on S-step trajectories
apply unchanged. The callback fires once per schedule step with the state on the
trajectory (never with the warm-up predictor state), so trajectory banks have S steps.

The final step goes to alpha-bar 1 (``Schedule.alpha_bar(-1)``), as the harness's DDIM
does; diffusers' SD config instead ends at ``alphas_cumprod[0]`` (``set_alpha_to_one=False``).
"""

from __future__ import annotations

import torch

from harness.sampling import SAMPLERS, Schedule, StepCallback, _call
from models.denoiser import Denoiser


def _transfer(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float) -> torch.Tensor:
    """PNDM's phi (Eq. 9 of Liu et al.): x_t -> x_prev given a noise estimate (diffusers ``_get_prev_sample``)."""
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    gens: list[torch.Generator] | None = None,
    cond: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """PLMS over ``schedule.timesteps`` (deterministic: ``eta`` and ``gens`` are accepted and unused)."""
    del eta, gens
    n = schedule.num_steps
    ts = schedule.timesteps
    ets: list[torch.Tensor] = []
    for i, t in enumerate(ts):
        a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(schedule.prev(i))
        eps = _call(denoiser, x, i, t, n, cond).float()
        if callback is not None:
            callback(i, t, x, eps)
        ets = [*ets[-3:], eps]
        if len(ets) == 1:
            if n == 1:
                x = _transfer(x, eps, a_t, a_prev)
                continue
            # Warm-up (PLMS's second-order start): Euler to t1, re-evaluate there, average, redo the step.
            x_pred = _transfer(x, eps, a_t, a_prev)
            eps_pred = _call(denoiser, x_pred, i + 1, ts[i + 1], n, cond).float()
            e = (eps + eps_pred) / 2
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        x = _transfer(x, e, a_t, a_prev)
    return x


SAMPLERS.register("plms", sample_plms)
