"""Test helpers: deterministic image sets and file hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 [n, 3, size, size]: upsampled random colour fields (not flat, not pure noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, 6, 6), generator=g) * 255
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()
