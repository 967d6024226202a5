"""PLMS (harness/sampler_plms.py) against diffusers' PNDMScheduler(skip_prk_steps=True) on a tiny UNet."""

from __future__ import annotations

import pytest
import torch
from diffusers import PNDMScheduler

from harness.generate import make_schedule
from harness.sampling import SAMPLERS, Schedule
from methods.quant.timestep import current_step
from models.loading import load_model
from models.registry import get_model


@pytest.fixture(scope="module")
def tiny():
    return load_model(get_model("tiny-random"))


@pytest.mark.parametrize("steps", [1, 2, 3, 6])
def test_plms_matches_pndm_scheduler(tiny, steps):
    cfg = tiny.scheduler.config
    pndm = PNDMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=cfg.beta_start, beta_end=cfg.beta_end, skip_prk_steps=True,
                         set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    pndm.set_timesteps(steps)
    x0 = torch.randn(2, *tiny.sample_shape, generator=torch.Generator().manual_seed(0))
    x = x0.clone()
    calls_ref = []
    with torch.no_grad():
        for t in pndm.timesteps:
            calls_ref.append(int(t))
            eps = tiny.denoiser(x, torch.full((2,), int(t)))
            x = pndm.step(eps, t, x).prev_sample
    schedule = make_schedule(tiny, steps, "uniform", clip_sample=False)
    # Same timesteps as diffusers' "leading" spacing without offset.
    assert list(schedule.timesteps) == sorted(set(calls_ref), reverse=True)
    calls, seen = [], []
    hook = tiny.denoiser.unet.register_forward_pre_hook(lambda m, a: calls.append(int(a[1][0])))
    try:
        out = SAMPLERS["plms"](tiny.denoiser, x0.clone(), schedule,
                               callback=lambda i, t, xt, e: seen.append((i, t)))
    finally:
        hook.remove()
    if steps > 1:
        assert calls == calls_ref  # S + 1 calls, the warm-up at t1 included
    assert seen == list(enumerate(schedule.timesteps))  # one callback per schedule step
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)


def test_plms_timestep_context_and_any_spacing(tiny):
    schedule = make_schedule(tiny, 5, "quad", clip_sample=False)
    ctx = []
    hook = tiny.denoiser.unet.register_forward_pre_hook(
        lambda m, a: ctx.append((current_step().step_index, current_step().t, int(a[1][0]))))
    try:
        out = SAMPLERS["plms"](tiny.denoiser, torch.randn(1, *tiny.sample_shape), schedule)
    finally:
        hook.remove()
    assert torch.isfinite(out).all()
    # The warm-up call at t1 runs in step 1's context; every call's context matches the timestep it feeds.
    assert [s for s, _, _ in ctx] == [0, 1, 1, 2, 3, 4]
    assert all(schedule.timesteps[s] == t == fed for s, t, fed in ctx)


def test_plms_is_registered_and_deterministic(tiny):
    sched = Schedule(tuple(range(900, -1, -100)), tiny.scheduler.alphas_cumprod, False)
    x = torch.randn(2, *tiny.sample_shape)
    a = SAMPLERS["plms"](tiny.denoiser, x, sched, eta=1.0)
    b = SAMPLERS["plms"](tiny.denoiser, x, sched, eta=0.0)
    assert torch.equal(a, b)
