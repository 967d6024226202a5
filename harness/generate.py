"""Generate a run's evaluation samples into its shard store, resuming where it stopped.

Images are seeded one by one (``calibration.eval_seeds``), so any shard can be made
by any worker in any batch size. Under ``torchrun`` each rank takes every
``world``-th pending shard (disjoint seed ranges); rank 0 waits for all before scoring.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from harness.calibration import eval_seeds, initial_noise_and_cond
from harness.finite import assert_finite_images
from harness.sampling import SAMPLERS, Schedule, make_timesteps, to_uint8
from harness.shards import ShardStore
from models.denoiser import Denoiser
from models.loading import LoadedModel


def make_schedule(model: LoadedModel, steps: int, spacing: str, clip_sample: bool | None = None) -> Schedule:
    """The sampler's view of the model's scheduler; ``clip_sample`` (the protocol's, RunSpec.clip_sample)
    overrides the scheduler config's, for the DDIM loop and for the DDPM scheduler's own step alike."""
    sched = model.scheduler
    clip = sched.config.clip_sample if clip_sample is None else clip_sample
    if sched.config.get("clip_sample") is not None and sched.config.clip_sample != clip:
        sched = type(sched).from_config({**sched.config, "clip_sample": clip})
    ts = make_timesteps(sched.config.num_train_timesteps, steps, spacing)
    return Schedule(tuple(ts), sched.alphas_cumprod.clone(), bool(clip), scheduler=sched)


@torch.no_grad()
def sample_images(
    model: LoadedModel, denoiser: Denoiser, schedule: Schedule, sampler: str, eta: float, seeds: list[int],
    device: torch.device | str,
):
    """uint8 NCHW images for the given seeds, in one batch."""
    x, cond, gens = initial_noise_and_cond(model, seeds)
    out = SAMPLERS[sampler](denoiser, x.to(device), schedule, eta=eta, gens=gens,
                            cond=cond.to(device) if cond is not None else None)
    if model.decode is not None:
        out = model.decode(out)
    assert_finite_images(out, f"samples of seeds {seeds[0]}..{seeds[-1]}")  # uint8 would hide a NaN
    return to_uint8(out)


def generate_samples(
    model: LoadedModel, denoiser: Denoiser, schedule: Schedule, sampler: str, eta: float, run_seed: int,
    store: ShardStore, device: torch.device | str = "cpu", batch_size: int = 64, rank: int = 0, world: int = 1,
    desc: str = "sampling",
) -> int:
    """Fill the pending shards of this rank; returns how many images were generated now."""
    pending = store.pending(rank, world)
    total = sum(store.shard_range(k)[1] - store.shard_range(k)[0] for k in pending)
    made = 0
    with tqdm(total=total, desc=desc, unit="img", disable=total == 0, leave=False) as bar:
        for k in pending:
            lo, hi = store.shard_range(k)
            seeds = eval_seeds(run_seed, lo, hi)
            parts = []
            for b in range(0, len(seeds), batch_size):
                chunk = seeds[b : b + batch_size]
                parts.append(sample_images(model, denoiser, schedule, sampler, eta, chunk, device))
                bar.update(len(chunk))
            store.write(k, np.concatenate(parts))
            made += hi - lo
    return made
