"""Multi-GPU sampling inside one run (``torchrun``): torch.distributed helpers.

Every rank takes every ``world``-th shard of the run (``ShardStore.pending(rank, world)``),
i.e. disjoint per-image seed ranges, so the samples are bit-identical whatever the number
of processes. Rank 0 prepares the quantized model first (calibration happens once), all
ranks sample their shards, the samples are gathered to rank 0 over the process group
(after a barrier: every shard is in), and rank 0 alone scores and writes ``results.json``.

Rank and world come from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); the backend is NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist

from harness.runner import RunOptions, _model_spec, _quantize, run_dir, run_one
from harness.shards import ShardStore
from harness.spec import RunSpec
from harness.tracking import read_results, write_json_atomic


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init(device: str) -> tuple[int, int, str]:
    """Join the process group (once); returns (rank, world, this rank's device)."""
    rank, world, local = env_rank_world()
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return rank, world, device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def my_shards(store: ShardStore, rank: int, world: int) -> list[int]:
    return list(range(rank, store.num_shards, world))


def gather_samples(store: ShardStore, rank: int, world: int) -> np.ndarray | None:
    """All of the run's samples on rank 0 (in image order), sent by the rank that made each shard.

    Each rank contributes its own shards over the process group (``gather_object``), so rank 0
    does not depend on reading other ranks' files; ``None`` on the other ranks.
    """
    mine = {k: np.load(store.path(k))["images"] for k in my_shards(store, rank, world)}
    if world == 1:
        parts = [mine]
    else:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return None
    shards: dict[int, np.ndarray] = {}
    for part in parts:
        shards.update(part)
    missing = [k for k in range(store.num_shards) if k not in shards]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} were not gathered")
    return np.concatenate([shards[k] for k in range(store.num_shards)])


def gather_count(n: int) -> int:
    """Sum of ``n`` over ranks (images generated this attempt)."""
    if not (dist.is_available() and dist.is_initialized()):
        return n
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def run_distributed(spec: RunSpec, opts: RunOptions) -> dict | None:
    """Run one spec across the ranks of a torchrun job; returns the results on rank 0, None elsewhere."""
    from harness.calibration import TrajectoryBank
    from harness.generate import generate_samples, make_schedule
    from models.loading import load_model

    rank, world, device = init(opts.device)
    opts = replace(opts, device=device, rank=rank, world=world)
    rdir = run_dir(spec, opts.out)
    existing = read_results(rdir)
    if existing and existing.get("status") == "complete":
        barrier()
        return existing if rank == 0 else None
    rdir.mkdir(parents=True, exist_ok=True)

    def prepare():
        torch.manual_seed(spec.seed)
        model = load_model(_model_spec(spec), spec.model_path, device)
        schedule = make_schedule(model, spec.steps, spec.spacing)
        bank = TrajectoryBank(model, schedule, spec.sampler, spec.eta, opts.cache_dir, device, opts.batch_size,
                              model_key=f"{spec.model}:{spec.model_path}")
        denoiser, _ = _quantize(spec, model, bank, rdir)
        return model, schedule, denoiser

    # Calibrate once: rank 0 quantizes and saves; the others load what it saved.
    error = None
    if rank == 0:
        try:
            prepared = prepare()
        except Exception as e:  # recorded by run_one below
            error, prepared = e, None
    barrier()
    if rank != 0:
        try:
            prepared = prepare()
        except Exception as e:
            error, prepared = e, None

    t = time.perf_counter()
    made = 0
    store = ShardStore(rdir / "samples", spec.num_samples)
    if prepared is not None:
        model, schedule, denoiser = prepared
        try:
            made = generate_samples(model, denoiser, schedule, spec.sampler, spec.eta, spec.seed, store, device,
                                    opts.batch_size, rank, world, desc=f"{spec.method} {spec.bits} r{rank}/{world}")
        except Exception as e:
            error = e
    sample_seconds = time.perf_counter() - t
    barrier()  # every rank's shards are on disk
    total_made = gather_count(made)
    images = gather_samples(store, rank, world) if store.complete else None
    if rank != 0:
        barrier()
        return None
    # Rank 0 scores once, through the same code path as a one-process run (which finds every
    # shard in place, so it generates nothing) and records the multi-process facts.
    results = run_one(spec, replace(opts, rank=0, world=1))
    if results.get("status") == "complete" and images is not None:
        if not np.array_equal(images, store.load_all()):
            raise RuntimeError("gathered samples differ from the shard files")
    results["facts"]["images_generated_this_attempt"] = total_made
    results["facts"]["world_size"] = world
    results["timings"]["sample_seconds"] = sample_seconds
    if error is not None and results.get("status") != "complete":
        results.setdefault("error", f"{type(error).__name__}: {error}")
    write_json_atomic(rdir / "results.json", results)
    barrier()
    return results
