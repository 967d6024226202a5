"""Multi-GPU sampling inside one run (``torchrun``): torch.distributed helpers.

Every rank takes every ``world``-th shard of the run (``ShardStore.pending(rank, world)``),
i.e. disjoint per-image seed ranges, so the samples are bit-identical whatever the number
of processes. Rank 0 prepares the quantized model first (calibration happens once), all
ranks sample their shards, then (after a barrier: every shard is in) each rank extracts the
metric features of its own shards (:func:`harness.metrics.sample_features`) and the
*features*, not the images, are gathered to rank 0 over the process group. Rank 0 alone
computes the metrics from them (:func:`harness.metrics.metrics_from_features`), reads the
images from the shard files only for the sample grid and the paired metrics, and writes
``results.json``.

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

from harness.generate import generate_samples, make_schedule
from harness.metrics import sample_features
from harness.runner import (
    RunOptions,
    _bank,
    _model_spec,
    _quantize,
    new_results,
    record_failure,
    run_dir,
    save_grid,
    score,
)
from harness.shards import ShardStore
from harness.spec import RunSpec
from harness.tracking import read_results, write_json_atomic
from models.loading import load_model


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


def gather_features(
    store: ShardStore,
    rank: int,
    world: int,
    extractor: str = "cifarnet",
    device: str = "cpu",
    inception_weights: str | None = None,
    failed: BaseException | None = None,
) -> tuple[dict[str, np.ndarray], dict[int, list[int]]] | None:
    """The run's metric features on rank 0, in image order, and which rank extracted which shards.

    Each rank runs :func:`harness.metrics.sample_features` once over the images of its own shards
    and sends ``{shard: features}`` to rank 0 (``gather_object``); rank 0 concatenates them in shard
    order. A rank that ``failed`` earlier, or fails here, sends its error instead, so every rank
    completes the collective; rank 0 then raises one ``RuntimeError`` naming each rank's error.
    ``None`` on the other ranks.
    """
    mine: dict[int, dict[str, np.ndarray]] = {}
    error = None if failed is None else f"{type(failed).__name__}: {failed}"
    shards = my_shards(store, rank, world)
    if error is None and shards:
        try:
            images = [np.load(store.path(k))["images"] for k in shards]  # FileNotFoundError: shard not made
            feats = sample_features(np.concatenate(images), extractor, device, inception_weights)
            ends = np.cumsum([len(x) for x in images])
            mine = {k: {name: f[end - len(x) : end] for name, f in feats.items()}
                    for k, x, end in zip(shards, images, ends)}
        except Exception as e:  # reported by rank 0, after the collective
            error = f"{type(e).__name__}: {e}"
    part = {"features": mine, "error": error}
    if world == 1:
        parts = [part]
    else:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
    if rank != 0:
        return None
    errors = [f"rank {r}: {p['error']}" for r, p in enumerate(parts) if p["error"] is not None]
    if errors:
        raise RuntimeError("metric features not extracted: " + "; ".join(errors))
    by_shard = {k: f for p in parts for k, f in p["features"].items()}
    missing = [k for k in range(store.num_shards) if k not in by_shard]
    if missing:
        raise RuntimeError(f"features of shards {missing[:5]} were not gathered")
    names = list(by_shard[0])
    if any(list(f) != names for f in by_shard.values()):
        raise RuntimeError("ranks extracted different feature sets (Inception weights or clean-fid file differ?)")
    features = {n: np.concatenate([by_shard[k][n] for k in range(store.num_shards)]) for n in names}
    return features, {r: sorted(p["features"]) for r, p in enumerate(parts)}


def gather_count(n: int) -> int:
    """Sum of ``n`` over ranks (images generated this attempt)."""
    if not (dist.is_available() and dist.is_initialized()):
        return n
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def run_distributed(spec: RunSpec, opts: RunOptions) -> dict | None:
    """Run one spec across the ranks of a torchrun job; returns the results on rank 0, None elsewhere."""
    t0 = time.perf_counter()
    rank, world, device = init(opts.device)
    opts = replace(opts, device=device)
    rdir = run_dir(spec, opts.out)
    existing = read_results(rdir)
    if existing and existing.get("status") == "complete":
        barrier()
        return existing if rank == 0 else None
    rdir.mkdir(parents=True, exist_ok=True)

    def prepare():
        t = time.perf_counter()
        torch.manual_seed(spec.seed)
        model = load_model(_model_spec(spec), spec.model_path, device)
        schedule = make_schedule(model, spec.steps, spec.spacing)
        bank = _bank(model, schedule, spec, opts)
        denoiser, facts = _quantize(spec, model, bank, rdir)
        return model, schedule, bank, denoiser, facts, time.perf_counter() - t

    # Calibrate once: rank 0 quantizes and saves; the others load what it saved.
    error = None
    if rank == 0:
        try:
            prepared = prepare()
        except Exception as e:  # recorded by rank 0 below
            error, prepared = e, None
    barrier()
    if rank != 0:
        try:
            prepared = prepare()
        except Exception as e:  # reported to rank 0 by gather_features
            error, prepared = e, None

    t = time.perf_counter()
    made = 0
    store = ShardStore(rdir / "samples", spec.num_samples)
    if prepared is not None:
        model, schedule, _, denoiser, _, _ = prepared
        try:
            made = generate_samples(model, denoiser, schedule, spec.sampler, spec.eta, spec.seed, store, device,
                                    opts.batch_size, rank, world, desc=f"{spec.method} {spec.bits} r{rank}/{world}")
        except Exception as e:
            error = e
    sample_seconds = time.perf_counter() - t
    barrier()  # every rank's shards are on disk
    total_made = gather_count(made)
    t = time.perf_counter()
    try:  # collective on every rank; raises on rank 0 only
        gathered = gather_features(store, rank, world, spec.extractor, device, opts.inception_weights, failed=error)
    except Exception as e:
        gathered, error = None, error or e  # rank 0's own earlier error keeps its traceback
    if rank != 0:
        barrier()
        return None

    # Rank 0 scores once, from the gathered features, through run_one's own pieces.
    results = new_results(spec, rdir)
    results["timings"]["sample_seconds"] = sample_seconds
    try:
        if prepared is not None:
            model, schedule, bank, denoiser, facts, prepare_seconds = prepared
            results["facts"] = dict(facts)
            results["model_fingerprint"] = bank.fingerprint  # sha256 of the FP weights this run quantized
            results["timings"]["calib_seconds"] = float(facts.get("calib_seconds", prepare_seconds))
        if error is not None:
            raise error
        features, by_rank = gathered
        images = store.load_all()  # only for the grid and the paired metrics, from the shard files
        save_grid(images, rdir / "samples_grid.png")
        metrics = score(spec, opts, model, schedule, denoiser, images, features)
        results["timings"]["metric_seconds"] = time.perf_counter() - t  # features (all ranks) + scoring
        results["metrics"] = metrics
        results["facts"]["metrics_gathered"] = "features"
        results["facts"]["feature_shards_by_rank"] = {str(r): shards for r, shards in by_rank.items()}
        results["status"] = "complete"
    except Exception as e:  # recorded, as run_one does
        record_failure(results, e)
    results["facts"]["images_generated_this_attempt"] = total_made
    results["facts"]["world_size"] = world
    results["timings"]["total_seconds"] = time.perf_counter() - t0
    write_json_atomic(rdir / "results.json", results)
    barrier()
    return results
