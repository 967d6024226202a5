"""The metric registry: every metric family with its direction and its interval keys.

``METRICS`` is a :class:`methods.registry.Registry` keyed by a metric-name pattern (``fid/*``,
``paired/psnr``, ...); each entry is a :class:`MetricInfo` and carries ``higher_is_better`` as
registration metadata (as lm-evaluation-harness registers ``higher_is_better`` with a metric).
The leaderboard, the HTML page and ``bench regress`` ask here for a metric's direction and for
the keys of its 95% bootstrap interval (``<metric>_ci_low``, ``<metric>_ci_high``); nothing else
decides them. See docs/metrics.md for each definition and its number of bootstrap resamples.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from methods.registry import Registry

CI_LOW, CI_HIGH = "_ci_low", "_ci_high"


@dataclass(frozen=True)
class MetricInfo:
    """One metric family. ``higher_is_better``: ``True``/``False``, or ``None`` for no direction
    (a spread such as ``kid_std``, a time is lower-is-better). ``resamples``: bootstrap resamples
    of its interval, ``0`` when it carries none."""

    pattern: str
    higher_is_better: bool | None
    description: str
    resamples: int = 0
    group: str = "data"  # data: against the reference set; fidelity: against FP; cost: time

    @property
    def direction(self) -> int:
        return 0 if self.higher_is_better is None else (1 if self.higher_is_better else -1)


METRICS: Registry[MetricInfo] = Registry("metric")

FD_RESAMPLES = 200  # Fréchet-type and KID intervals (each resample recomputes mean/covariance or kernel means)
CHEAP_RESAMPLES = 1000  # per-image means (paired MSE/PSNR/SSIM/LPIPS): a resample is one weighted mean

_BUILTIN = (
    MetricInfo("fid/*", False, "Fréchet distance to the reference set", FD_RESAMPLES),
    MetricInfo("sfid/*", False, "Fréchet distance of spatial features to the reference set", FD_RESAMPLES),
    MetricInfo("clean_fid/*", False, "clean-fid Fréchet distance to the reference set", FD_RESAMPLES),
    MetricInfo("kid/*", False, "kernel (MMD²) distance to the reference set", FD_RESAMPLES),
    MetricInfo("kid_std/*", None, "spread of KID over subsets (no direction)"),
    MetricInfo("is/*", True, "Inception score of the samples", FD_RESAMPLES),
    MetricInfo("clip_score/*", True, "CLIP score of each image with its caption, 100·max(cos, 0)", CHEAP_RESAMPLES),
    MetricInfo("fid_fp/*", False, "Fréchet distance to the FP run's samples (same seeds)", FD_RESAMPLES, "fidelity"),
    MetricInfo("kid_fp/*", False, "MMD² (unbiased, paired) to the FP run's samples", FD_RESAMPLES, "fidelity"),
    MetricInfo("paired/mse", False, "pixel MSE to the FP sample of the same seed", CHEAP_RESAMPLES, "fidelity"),
    MetricInfo("paired/psnr", True, "PSNR (dB) of the mean pixel MSE to FP", CHEAP_RESAMPLES, "fidelity"),
    MetricInfo("paired/ssim", True, "SSIM to the FP sample of the same seed", CHEAP_RESAMPLES, "fidelity"),
    MetricInfo("paired/lpips/*", False, "LPIPS distance to the FP sample of the same seed", CHEAP_RESAMPLES,
               "fidelity"),
    MetricInfo("paired/eps_mse", False, "noise-prediction MSE on FP trajectories (16 probe images)", 0, "fidelity"),
    MetricInfo("time/*", False, "wall time in seconds", 0, "cost"),
)
for _info in _BUILTIN:
    METRICS.register(_info.pattern, _info, higher_is_better=_info.higher_is_better, resamples=_info.resamples,
                     interval=(CI_LOW, CI_HIGH) if _info.resamples else ())


def interval_of(key: str) -> tuple[str, str] | None:
    """``(metric, "low"|"high")`` when ``key`` is an interval key (``fid/cifarnet_ci_low``), else ``None``."""
    for suffix, side in ((CI_LOW, "low"), (CI_HIGH, "high")):
        if key.endswith(suffix):
            return key[: -len(suffix)], side
    return None


def interval_keys(metric: str) -> tuple[str, str]:
    """The keys under which ``metric``'s 95% interval is stored."""
    return metric + CI_LOW, metric + CI_HIGH


def lookup(metric: str) -> MetricInfo | None:
    """The registered family of ``metric``: its exact name, else the most specific matching pattern."""
    if interval_of(metric) is not None:
        return None
    if metric in METRICS:
        return METRICS[metric]
    matches = [p for p in METRICS.names() if fnmatch.fnmatchcase(metric, p)]
    if not matches:
        return None
    return METRICS[max(matches, key=lambda p: len(p.replace("*", "")))]


def direction(metric: str) -> int:
    """-1: lower is better; +1: higher is better; 0: no direction or not registered (an interval key)."""
    info = lookup(metric)
    return 0 if info is None else info.direction


def direction_label(metric: str) -> str:
    return {-1: "lower is better", 1: "higher is better", 0: "no direction"}[direction(metric)]


def has_interval(metric: str) -> bool:
    info = lookup(metric)
    return info is not None and info.resamples > 0


def interval(metrics: dict, metric: str) -> tuple[float, float] | None:
    """``(low, high)`` of ``metric`` from a metrics dict, or ``None`` when it has none."""
    lo, hi = (metrics.get(k) for k in interval_keys(metric))
    if isinstance(lo, int | float) and isinstance(hi, int | float):
        return float(lo), float(hi)
    return None
