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
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from harness.shards import ShardStore
from harness.spec import RunSpec

if TYPE_CHECKING:
    from harness.runner import RunOptions


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
            from harness.metrics import sample_features

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
    """Run one spec across the ranks of a torchrun job (:func:`harness.runner.run_one` with rank and world)."""
    from harness.runner import run_one

    rank, world, device = init(opts.device)
    return run_one(spec, replace(opts, device=device), rank, world)
