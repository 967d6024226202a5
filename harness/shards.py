"""Sharded, resumable sample storage: ``samples/shard-00000.npz`` + ``manifest.json``.

Shard k always holds images ``[k * shard_size, (k + 1) * shard_size)`` of the run (uint8
NCHW), whatever the batch size or the number of workers, so an interrupted run resumes
from its last complete shard and workers (torchrun ranks) split the work by shard.
A shard is written to a temporary file and renamed into place: it exists whole or not
at all, and the manifest only lists shards whose file is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SHARD_SIZE = 64


class ShardStore:
    def __init__(self, root: str | Path, num_samples: int, shard_size: int = SHARD_SIZE) -> None:
        self.root = Path(root)
        self.num_samples = num_samples
        self.shard_size = shard_size

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples)

    def path(self, k: int) -> Path:
        return self.root / f"shard-{k:05d}.npz"

    def is_done(self, k: int) -> bool:
        return self.path(k).exists()

    def pending(self, rank: int = 0, world: int = 1) -> list[int]:
        return [k for k in range(rank, self.num_shards, world) if not self.is_done(k)]

    def write(self, k: int, images: np.ndarray) -> None:
        lo, hi = self.shard_range(k)
        if images.dtype != np.uint8 or images.shape[0] != hi - lo:
            raise ValueError(f"shard {k} needs {hi - lo} uint8 images, got {images.shape} {images.dtype}")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path(k).with_name(f".tmp-{k:05d}-{os.getpid()}.npz")
        np.savez(tmp, images=images, start=lo)
        os.replace(tmp, self.path(k))
        self._write_manifest()

    def _write_manifest(self) -> None:
        done = [k for k in range(self.num_shards) if self.is_done(k)]
        manifest = {"num_samples": self.num_samples, "shard_size": self.shard_size, "complete_shards": done,
                    "complete": len(done) == self.num_shards}
        tmp = self.root / f".manifest-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.root / "manifest.json")

    @property
    def complete(self) -> bool:
        return all(self.is_done(k) for k in range(self.num_shards))

    def load_all(self) -> np.ndarray:
        if not self.complete:
            missing = [k for k in range(self.num_shards) if not self.is_done(k)]
            raise FileNotFoundError(f"samples in {self.root} are incomplete: shards {missing[:5]} missing")
        return np.concatenate([np.load(self.path(k))["images"] for k in range(self.num_shards)])
