"""Sharded, resumable sample storage: ``samples/shard-00000.npz`` + ``manifest.json``.

Shard k always holds images ``[k * shard_size, (k + 1) * shard_size)`` of the run (uint8
NCHW), whatever the batch size or the number of workers, so an interrupted run resumes
from its last complete shard and workers (torchrun ranks) split the work by shard.
A shard is written to a temporary file and renamed into place: it exists whole or not
at all, and the manifest only lists shards whose file is complete.

A shard that exists but does not load (a truncated or damaged file: a disk that filled up under
another tool, a copy that stopped) is never trusted: :meth:`ShardStore.pending` and
:meth:`ShardStore.load_all` move it aside to ``shard-K.npz.corrupt`` and name it, and the run
makes it again. Running out of space while writing a shard raises :class:`DiskFullError`
naming the file and the bytes the run still needs; no partial file is left.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from models.atomic import DiskFullError, atomic_path, write_text_atomic

__all__ = ["DiskFullError", "CorruptShardError", "ShardStore", "SHARD_SIZE"]

SHARD_SIZE = 64


class CorruptShardError(OSError):
    """A shard file that does not load; it has been moved aside and is made again on the rerun."""


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

    def quarantine(self, k: int, why: str = "") -> Path:
        """Move shard k aside to ``shard-K.npz.corrupt`` (an older one there is replaced); returns that path."""
        bad = self.path(k).with_name(self.path(k).name + ".corrupt")
        os.replace(self.path(k), bad)
        self._write_manifest()
        return bad

    def _intact(self, k: int) -> bool:
        """Cheap structural check (the zip directory at the end of the file): catches truncated files."""
        try:
            with zipfile.ZipFile(self.path(k)) as z:
                return "images.npy" in z.namelist()
        except (OSError, zipfile.BadZipFile, ValueError, EOFError):
            return False

    def verify(self) -> list[Path]:
        """Quarantine every existing shard that is not intact; returns the ``.corrupt`` paths."""
        return [self.quarantine(k) for k in range(self.num_shards) if self.is_done(k) and not self._intact(k)]

    def pending(self, rank: int = 0, world: int = 1) -> list[int]:
        for k in range(rank, self.num_shards, world):
            if self.is_done(k) and not self._intact(k):
                self.quarantine(k)  # made again below, like any missing shard
        return [k for k in range(rank, self.num_shards, world) if not self.is_done(k)]

    def write(self, k: int, images: np.ndarray) -> None:
        lo, hi = self.shard_range(k)
        if images.dtype != np.uint8 or images.shape[0] != hi - lo:
            raise ValueError(f"shard {k} needs {hi - lo} uint8 images, got {images.shape} {images.dtype}")
        per_image = images.nbytes // max(1, images.shape[0])
        with atomic_path(self.path(k), need_bytes=(self.num_samples - lo) * per_image + 2**20) as tmp:
            np.savez(tmp, images=images, start=lo)
        self._write_manifest()

    def _write_manifest(self) -> None:
        done = [k for k in range(self.num_shards) if self.is_done(k)]
        manifest = {"num_samples": self.num_samples, "shard_size": self.shard_size, "complete_shards": done,
                    "complete": len(done) == self.num_shards}
        write_text_atomic(self.root / "manifest.json", json.dumps(manifest, indent=1))

    @property
    def complete(self) -> bool:
        return all(self.is_done(k) for k in range(self.num_shards))

    def load_all(self) -> np.ndarray:
        if not self.complete:
            missing = [k for k in range(self.num_shards) if not self.is_done(k)]
            raise FileNotFoundError(f"samples in {self.root} are incomplete: shards {missing[:5]} missing")
        return np.concatenate([self.load(k) for k in range(self.num_shards)])

    def load(self, k: int) -> np.ndarray:
        """Shard k's images; a file that does not load is moved aside and named in :class:`CorruptShardError`."""
        path = self.path(k)
        try:
            with np.load(path) as z:
                images = z["images"]
            lo, hi = self.shard_range(k)
            if images.dtype != np.uint8 or images.shape[0] != hi - lo:
                raise ValueError(f"holds {images.shape} {images.dtype}, expected {hi - lo} uint8 images")
            return images
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            bad = self.quarantine(k)
            raise CorruptShardError(f"sample shard {path} does not load ({type(e).__name__}: {e}); moved to {bad}: "
                                    "rerun the same command to make it again") from None
