"""The metric math: Fréchet distance (FID, sFID, clean-FID), KID and IS from feature arrays.

FID, IS and KID call torch-fidelity's own metric functions so that their conventions (float64
statistics, IS splits and shuffling, KID polynomial kernel and subsets) are torch-fidelity's;
:func:`frechet_distance` is the same formula with scipy, and :func:`frechet_distance_to_features`
its exact low-rank form for fewer samples than feature dimensions (sFID's 2023 dims).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _f64(features) -> np.ndarray:
    return features.double().cpu().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), with ``scipy.linalg.sqrtm`` (float64).

    If the product's square root is not finite (singular covariances), ``eps`` is added to both
    diagonals, as pytorch-fid/clean-fid do; a small imaginary part from round-off is dropped.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"Fréchet distance: shapes differ: {mu1.shape} vs {mu2.shape}, {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance_to_features(features, mu2, sigma2) -> float:
    """Fréchet distance between the Gaussian fit of ``features`` ``[N, D]`` and ``(mu2, sigma2)``.

    Equals ``frechet_distance(**feature_statistics(features), mu2, sigma2)``. When ``N - 1 < D`` the
    sample covariance is ``Σ₁ = A Aᵀ`` with ``A`` the centred features / sqrt(N-1) (``D x N``), and the
    exact identity ``tr (Σ₁Σ₂)^½ = tr (Aᵀ Σ₂ A)^½`` (same non-zero eigenvalues) replaces the ``D x D``
    sqrtm of a singular product by an ``N x N`` symmetric eigenproblem: faster and better conditioned.
    """
    f = _f64(features)
    n, d = f.shape
    if np.shape(mu2) != (d,):
        raise ValueError(f"Fréchet distance: features have {d} dims, the reference {np.shape(mu2)}")
    if n - 1 >= d:
        st = feature_statistics(f)
        return frechet_distance(st["mu"], st["sigma"], mu2, sigma2)
    mu1 = f.mean(axis=0)
    a = (f - mu1).T / math.sqrt(n - 1)
    m = a.T @ np.asarray(sigma2, np.float64) @ a
    ev = np.linalg.eigvalsh(0.5 * (m + m.T))
    diff = mu1 - np.asarray(mu2, np.float64)
    tr_covmean = float(np.sqrt(np.clip(ev, 0.0, None)).sum())
    return float(diff @ diff + (a * a).sum() + np.trace(sigma2) - 2.0 * tr_covmean)


def feature_statistics(features) -> dict[str, np.ndarray]:
    """``{"mu", "sigma"}`` in float64 (torch-fidelity's statistics dict format)."""
    f = _f64(features)
    return {"mu": f.mean(axis=0), "sigma": np.cov(f, rowvar=False)}


class RunningStatistics:
    """Mean and sample covariance of feature rows seen in chunks (no need to hold them all).

    Chunks are merged with the pairwise update of Chan, Golub & LeVeque (1979): per chunk its
    own mean and centred scatter, then ``M2 = M2_a + M2_b + δδᵀ·n_a·n_b/n`` — float64 and free of
    the cancellation of the ``Σx xᵀ − n μ μᵀ`` form. :meth:`statistics` equals
    :func:`feature_statistics` of the concatenated rows up to float64 round-off.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, features) -> None:
        f = _f64(features)
        nb = len(f)
        if nb == 0:
            return
        mb = f.mean(axis=0)
        c = f - mb
        m2b = c.T @ c
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.m2 = self.m2 + m2b + np.outer(delta, delta) * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n

    def statistics(self) -> dict[str, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.n}")
        return {"mu": self.mean.copy(), "sigma": self.m2 / (self.n - 1)}


def fid_from_statistics(stats_a: dict, stats_b: dict) -> float:
    """torch-fidelity's ``fid_statistics_to_metric`` on two ``{"mu", "sigma"}`` dicts."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {k: np.asarray(v, np.float64) for k, v in stats_a.items()}
    b = {k: np.asarray(v, np.float64) for k, v in stats_b.items()}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: np.ndarray) -> float:
    """torch-fidelity's ``isc_features_to_metric`` (softmax in float64, shuffled with seed 2020),
    with ``min(10, N // 2)`` splits so that a small sample still has two images per split."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    splits = max(1, min(10, len(logits) // 2))
    out = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True, rng_seed=2020)
    return float(out[KEY_METRIC_ISC_MEAN])


def kernel_distance(f_samples: np.ndarray, f_ref: np.ndarray, kid_subsets: int) -> tuple[float, float]:
    """torch-fidelity's KID (cubic polynomial kernel) mean and std, subset size ``min(1000, N_s, N_ref)``."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(1000, len(f_samples), len(f_ref))
    out = kid_features_to_metric(
        torch.from_numpy(np.asarray(f_samples, np.float32)),
        torch.from_numpy(np.asarray(f_ref, np.float32)),
        kid_subsets=kid_subsets,
        kid_subset_size=size,
        verbose=False,
    )
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def clean_fid_distance(features: np.ndarray, ref_pool: dict) -> float:
    """``cleanfid.fid.frechet_distance`` of the features' Gaussian fit vs reference ``{"mu", "sigma"}``."""
    from cleanfid.fid import frechet_distance as cfid_frechet

    st = feature_statistics(features)
    return float(cfid_frechet(st["mu"], st["sigma"], ref_pool["mu"], ref_pool["sigma"]))
