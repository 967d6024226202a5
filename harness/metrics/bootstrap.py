"""Bootstrap intervals over images, and the paired bootstrap that marks a difference significant.

A resample draws N image indices with replacement; it is held as the count ``w_i`` of each image
(:func:`resample_weights`), seeded with :data:`SEED`, so that every run with N images uses the *same*
resamples. Every method samples image ``i`` from the same noise, so the replicate ``b`` of two runs
is computed on the same images and their difference is a paired bootstrap replicate of the
difference (:func:`significance`).

The interval of a statistic with point value ``θ̂`` and replicates ``θ*_b`` is the bias-shifted
percentile interval ``[θ̂ + q_2.5(θ* − mean θ*), θ̂ + q_97.5(θ* − mean θ*)]`` (:func:`centred_interval`):
Fréchet distances computed on resamples are biased upwards (a resample repeats images), so the
plain percentile interval of FID can miss its own point value; subtracting the replicates' mean
keeps their spread and drops that bias. For a mean of per-image values it is the percentile interval
up to the tiny difference between the sample mean and the replicates' mean.

The replicates are computed from the Gram matrices of the N feature rows, so a resample costs an
eigenvalue problem of the size of its distinct images (about 0.63 N), not a D x D matrix square root
(see docs/metrics.md, "Intervals"). Replicates are exact for the resample, not approximations.
"""

from __future__ import annotations

import numpy as np

SEED = 20250  # the bootstrap seed (documented in docs/metrics.md); never the run's seed
LEVEL = 0.95


def resample_weights(n: int, resamples: int, seed: int = SEED) -> np.ndarray:
    """``[resamples, n]`` counts: row ``b`` counts how often each image is drawn in resample ``b`` (sums to ``n``)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    w = np.zeros((resamples, n), np.float64)
    np.add.at(w, (np.repeat(np.arange(resamples), n), idx.ravel()), 1.0)
    return w


def centred_interval(point: float, replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """``θ̂ + quantiles(θ* − mean θ*)`` at ``(1 ± level) / 2``. Raises ``ValueError`` on non-finite input."""
    r = np.asarray(replicates, np.float64)
    if not np.isfinite(point) or r.size == 0 or not np.isfinite(r).all():
        raise ValueError(f"bootstrap interval of a non-finite statistic (point {point}, "
                         f"{int(np.size(r) - np.isfinite(r).sum())} non-finite replicates)")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(r - r.mean(), [a, 1.0 - a])
    return float(point + lo), float(point + hi)


def mean_replicates(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Replicates of the mean of per-image ``values`` ``[N]``."""
    v = np.asarray(values, np.float64)
    return weights @ v / v.shape[0]


def significance(point_a: float, reps_a: np.ndarray, point_b: float, reps_b: np.ndarray,
                 level: float = LEVEL) -> tuple[float, float, float, bool]:
    """Paired bootstrap of ``a − b`` (replicates on the same resamples): ``(diff, low, high, significant)``,
    significant when the interval excludes 0."""
    ra, rb = np.asarray(reps_a, np.float64), np.asarray(reps_b, np.float64)
    if ra.shape != rb.shape:
        raise ValueError(f"paired bootstrap needs replicates of the same resamples; got {ra.shape} and {rb.shape}")
    d = float(point_a) - float(point_b)
    lo, hi = centred_interval(d, ra - rb, level)
    return d, lo, hi, bool(lo > 0 or hi < 0)


# --------------------------------------------------------------------------- Fréchet distance
def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (eigenvalues below 0 from round-off clipped)."""
    ev, vec = np.linalg.eigh(0.5 * (sigma + sigma.T))
    return (vec * np.sqrt(np.clip(ev, 0.0, None))) @ vec.T


def _centred_gram(k: np.ndarray, ws: np.ndarray, n: int) -> np.ndarray:
    """``(X_s − 1μᵀ)(Y_s − 1νᵀ)ᵀ`` from ``k = X_s Y_sᵀ`` on the drawn rows ``s`` with counts ``ws``."""
    a = k @ ws / n  # x_i · ν
    b = ws @ k / n  # μ · y_j
    c = ws @ a / n  # μ · ν
    return k - a[:, None] - b[None, :] + c


def _weighted_cov(f: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = w.sum()
    mu = w @ f / n
    c = f - mu
    return mu, (c * w[:, None]).T @ c / (n - 1)


def fd_to_reference_replicates(features, mu2, sigma2, weights: np.ndarray) -> np.ndarray:
    """Fréchet distance between the Gaussian fit of each weighted resample of ``features`` ``[N, D]``
    and ``(mu2, sigma2)``; row ``b`` of ``weights`` is resample ``b`` (all ones: the full set)."""
    f, mu2, sigma2 = _f64(features), _f64(mu2), _f64(sigma2)
    n, d = f.shape
    s2h = psd_sqrt(sigma2)
    tr2, m2 = float(np.trace(sigma2)), float(mu2 @ mu2)
    out = np.empty(len(weights))
    if n <= d:  # sample space: eigenvalues of an (#distinct images)² matrix
        g = f @ s2h
        kg, kf, fm = g @ g.T, f @ f.T, f @ mu2
        for i, w in enumerate(weights):
            s = np.flatnonzero(w)
            ws, sq = w[s], np.sqrt(w[s])
            kss = kg[np.ix_(s, s)]
            m = sq[:, None] * _centred_gram(kss, ws, n) * sq[None, :] / (n - 1)
            tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum()
            pss = kf[np.ix_(s, s)]
            mu_sq = ws @ pss @ ws / n**2
            tr1 = (ws @ np.diag(pss) - n * mu_sq) / (n - 1)
            diff = mu_sq - 2.0 * (ws @ fm[s]) / n + m2
            out[i] = diff + tr1 + tr2 - 2.0 * tr_sqrt
    else:  # feature space: eigenvalues of Σ₂^½ Σ₁ Σ₂^½ (D x D)
        for i, w in enumerate(weights):
            mu1, s1 = _weighted_cov(f, w)
            m = s2h @ s1 @ s2h
            tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None)).sum()
            diff = mu1 - mu2
            out[i] = diff @ diff + np.trace(s1) + tr2 - 2.0 * tr_sqrt
    return out


def fd_paired_replicates(features_a, features_b, weights: np.ndarray) -> np.ndarray:
    """Fréchet distance between the Gaussian fits of ``features_a`` and ``features_b`` (``[N, D]``, row ``i``
    of both from image seed ``i``), each resample drawing the same rows from both.

    ``tr (Σ_a Σ_b)^½`` is the sum of the singular values of ``A_aᵀ A_b`` (``Σ = A Aᵀ``) in sample space,
    of ``Σ_a^½ Σ_b^½`` in feature space. Identical inputs give exactly 0.
    """
    fa, fb = _f64(features_a), _f64(features_b)
    if fa.shape != fb.shape:
        raise ValueError(f"paired Fréchet distance: shapes differ {fa.shape} vs {fb.shape}")
    if np.array_equal(fa, fb):
        return np.zeros(len(weights))
    n, d = fa.shape
    out = np.empty(len(weights))
    if n <= d:
        kab, kaa, kbb = fa @ fb.T, fa @ fa.T, fb @ fb.T
        for i, w in enumerate(weights):
            s = np.flatnonzero(w)
            ws, sq = w[s], np.sqrt(w[s])
            ix = np.ix_(s, s)
            x = sq[:, None] * _centred_gram(kab[ix], ws, n) * sq[None, :] / (n - 1)
            tr_sqrt = np.linalg.svd(x, compute_uv=False).sum()
            paa, pbb, pab = kaa[ix], kbb[ix], kab[ix]
            maa, mbb, mab = ws @ paa @ ws / n**2, ws @ pbb @ ws / n**2, ws @ pab @ ws / n**2
            tra = (ws @ np.diag(paa) - n * maa) / (n - 1)
            trb = (ws @ np.diag(pbb) - n * mbb) / (n - 1)
            out[i] = (maa + mbb - 2.0 * mab) + tra + trb - 2.0 * tr_sqrt
    else:
        for i, w in enumerate(weights):
            mua, sa = _weighted_cov(fa, w)
            mub, sb = _weighted_cov(fb, w)
            tr_sqrt = np.linalg.svd(psd_sqrt(sa) @ psd_sqrt(sb), compute_uv=False).sum()
            diff = mua - mub
            out[i] = diff @ diff + np.trace(sa) + np.trace(sb) - 2.0 * tr_sqrt
    return np.maximum(out, 0.0)  # a distance: round-off below 0 is 0


def fd_paired(features_a, features_b) -> float:
    """The Fréchet distance between the Gaussian fits of two feature sets of N rows each."""
    n = np.shape(features_a)[0]
    return float(fd_paired_replicates(features_a, features_b, np.ones((1, n)))[0])


# --------------------------------------------------------------------------- KID (cubic polynomial kernel)
def poly_kernel(x, y) -> np.ndarray:
    """torch-fidelity's KID kernel ``(xᵀy / D + 1)³``."""
    x, y = _f64(x), _f64(y)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _offdiag_sum(k: np.ndarray, w: np.ndarray) -> float:
    """Sum of ``h(z_p, z_q)`` over ordered pairs of distinct draws ``p ≠ q`` of a resample with counts ``w``."""
    return float(w @ k @ w - w @ np.diag(k))


def kid_to_reference_replicates(features, ref_features, weights: np.ndarray) -> np.ndarray:
    """Replicates of the unbiased MMD² to the reference features, *less its constant reference term*
    ``mean_{i≠j} k(y_i, y_j)`` (the same for every resample and every run, so it cancels in intervals
    built with :func:`centred_interval` and in paired differences)."""
    f = _f64(features)
    n = len(f)
    kxx = poly_kernel(f, f)
    r = poly_kernel(f, ref_features).mean(axis=1)
    return np.array([_offdiag_sum(kxx, w) / (n * (n - 1)) - 2.0 * (w @ r) / n for w in weights])


def kid_paired_replicates(features_a, features_b, weights: np.ndarray) -> np.ndarray:
    """Unbiased MMD² of paired samples (Gretton et al. 2012, the U-statistic with
    ``h(i, j) = k(a_i, a_j) + k(b_i, b_j) − k(a_i, b_j) − k(a_j, b_i)`` over ``i ≠ j``) on each resample;
    identical inputs give exactly 0."""
    fa, fb = _f64(features_a), _f64(features_b)
    if fa.shape != fb.shape:
        raise ValueError(f"paired KID: shapes differ {fa.shape} vs {fb.shape}")
    n = len(fa)
    kab = poly_kernel(fa, fb)
    h = poly_kernel(fa, fa) + poly_kernel(fb, fb) - kab - kab.T
    return np.array([_offdiag_sum(h, w) / (n * (n - 1)) for w in weights])


# --------------------------------------------------------------------------- IS
def is_replicates(logits, weights: np.ndarray) -> np.ndarray:
    """``exp(mean_i KL(p_i ‖ p̄))`` (one split) of each resample, softmax in float64."""
    z = _f64(logits)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    ent = (p * logp).sum(axis=1)  # Σ_c p log p per image
    n = len(z)
    out = np.empty(len(weights))
    for i, w in enumerate(weights):
        pbar = w @ p / n
        out[i] = np.exp((w @ ent) / n - pbar @ np.log(np.clip(pbar, 1e-300, None)))
    return out


# --------------------------------------------------------------------------- intervals of a metrics dict
def add_interval(metrics: dict, replicates: dict, key: str, point: float, reps: np.ndarray) -> None:
    """Store ``key``'s interval (``key_ci_low``/``key_ci_high``) and its replicates."""
    from harness.metrics.registry import interval_keys

    lo_key, hi_key = interval_keys(key)
    metrics[lo_key], metrics[hi_key] = centred_interval(point, reps)
    replicates[key] = np.asarray(reps, np.float64)

