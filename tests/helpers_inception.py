"""Test scaffolding: a randomly initialised torch-fidelity InceptionV3 weights file.

The numbers it gives mean nothing; it exercises the real weight-loading and feature code
without the (not downloadable here) published weights.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised torch-fidelity InceptionV3 state dict (plain tensors) to ``path``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Blank(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    empty = p.with_name(p.name + ".empty")
    torch.save({}, empty)
    torch.manual_seed(seed)
    try:
        blank = _Blank("blank", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        empty.unlink()
    # He-normal convs (PyTorch's default init shrinks activations to ~1e-8 over Inception's depth,
    # which would make every feature degenerate); BN keeps identity running statistics.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in blank.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight.shape[1]))
    torch.save(blank.state_dict(), p)
    return p
