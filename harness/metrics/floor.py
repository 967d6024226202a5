"""The sampling floor: the metrics of N *real* test images against the reference set.

A model that reproduced the data distribution exactly would still score ``fid/cifarnet > 0`` with
N samples (a Fréchet distance estimated from N images is biased upwards, and noisy). The floor
is that number: N images drawn (seed :data:`DRAW_SEED`) from the CIFAR-10 test set, scored against
the shipped ``cifar10-test`` reference with the embedded CifarNet exactly like a run's samples,
with the same bootstrap intervals. ``bench floor --data PATH`` writes
``models/assets/cifar10-test-cifarnet-floor.json``; the leaderboard shows the entry for the runs' N.
"""

from __future__ import annotations

import numpy as np

from harness.metrics.bootstrap import LEVEL, SEED
from harness.metrics.registry import FD_RESAMPLES, interval_keys

SIZES = (32, 64, 128, 256, 512, 1024, 2048, 5000)
DRAW_SEED = 0
FLOOR_METRICS = ("fid/cifarnet", "kid/cifarnet", "is/cifarnet")  # sfid's 980-dim covariance is too slow at 5000
FORMAT = 1


def floor_entry(images: np.ndarray, device: str = "cpu") -> dict[str, dict[str, float]]:
    """``{metric: {"value", "ci_low", "ci_high"}}`` of uint8 ``images`` ``[N,3,32,32]`` against ``cifar10-test``."""
    from harness.metrics.fidelity import data_intervals
    from harness.metrics.score import metrics_from_features, sample_features

    feats = sample_features(images, "cifarnet", device, clean_fid=False)
    metrics = {k: v for k, v in metrics_from_features(feats, device=device).items() if k in FLOOR_METRICS}
    intervals, _ = data_intervals(feats, metrics)
    out = {}
    for k, v in sorted(metrics.items()):
        lo, hi = interval_keys(k)
        if not all(np.isfinite(x) for x in (v, intervals[lo], intervals[hi])):
            raise ValueError(f"floor: non-finite {k} for {len(images)} images")
        out[k] = {"value": float(v), "ci_low": float(intervals[lo]), "ci_high": float(intervals[hi])}
    return out


def sampling_floor(test_images: np.ndarray, sizes=SIZES, device: str = "cpu", progress=None) -> dict:
    """The floor file's content for every N in ``sizes`` (each N a prefix of one seeded permutation)."""
    order = np.random.default_rng(DRAW_SEED).permutation(len(test_images))
    entries = {}
    for n in sizes:
        if n > len(test_images):
            raise ValueError(f"floor: {n} images asked, the test set has {len(test_images)}")
        entries[str(n)] = floor_entry(test_images[np.sort(order[:n])], device)
        if progress is not None:
            progress(n, entries[str(n)])
    return {"format": FORMAT, "reference": "cifar10-test", "extractor": "cifarnet", "metrics": list(FLOOR_METRICS),
            "draw": {"seed": DRAW_SEED, "rule": "the first N of numpy default_rng(seed).permutation(10000)"},
            "bootstrap": {"seed": SEED, "resamples": FD_RESAMPLES, "level": LEVEL,
                          "rule": "value + quantiles (2.5%, 97.5%) of the centred replicates"},
            "sizes": entries}
