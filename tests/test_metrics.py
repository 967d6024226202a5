"""Metric layer tests: real torch-fidelity / clean-fid code, shipped assets and synthetic data only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers_inception import random_inception_weights

from harness import metrics as M

CIFARNET_KEYS = {
    "fid/cifarnet",
    "is/cifarnet",
    "sfid/cifarnet",
    "kid/cifarnet",
    "kid_std/cifarnet",
    "clean_fid/cifarnet",
}


def _images(n: int, seed: int) -> np.ndarray:
    """Smooth-ish synthetic 32x32 images (random low-res colour fields upsampled), uint8 [n,3,32,32]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, 4, 4), generator=g) * 255
    x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    x = x + torch.randn((n, 3, 32, 32), generator=g) * 12
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


# --------------------------------------------------------------------------- Fréchet distance
@pytest.mark.parametrize("dim", [8, 64])
def test_frechet_distance_matches_torch_fidelity_and_clean_fid(dim):
    from cleanfid.fid import frechet_distance as cfid_fd
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(dim)
    a = rng.normal(size=(600, dim)) @ rng.normal(size=(dim, dim))
    b = 0.7 * rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim)) + 0.3
    sa, sb = M.feature_statistics(a), M.feature_statistics(b)
    ours = M.frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])
    tf = fid_statistics_to_metric(sa, sb, verbose=False)[KEY_METRIC_FID]
    cf = float(cfid_fd(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"]))
    assert ours > 0
    assert _rel(ours, tf) < 1e-6
    assert _rel(ours, cf) < 1e-6


@pytest.mark.parametrize("n", [10, 40, 200])
def test_low_rank_frechet_equals_sqrtm_and_torch_fidelity(n):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(n)
    d = 64
    ref = rng.normal(size=(1000, d)) @ rng.normal(size=(d, d))
    feats = 0.5 * rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 1.0
    sr, sf = M.feature_statistics(ref), M.feature_statistics(feats)
    fast = M.frechet_distance_to_features(feats, sr["mu"], sr["sigma"])
    tf = fid_statistics_to_metric(sf, sr, verbose=False)[KEY_METRIC_FID]
    assert _rel(fast, tf) < 1e-6
    if n > d:
        assert _rel(fast, M.frechet_distance(sf["mu"], sf["sigma"], sr["mu"], sr["sigma"])) < 1e-6


def test_frechet_distance_hand_case():
    # 1-D: (m1-m2)^2 + s1 + s2 - 2 sqrt(s1 s2) = (m1-m2)^2 + (sqrt s1 - sqrt s2)^2
    assert M.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)
    # identical Gaussians -> 0
    s = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert M.frechet_distance([0, 1], s, [0, 1], s) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError):
        M.frechet_distance([0, 1], s, [0, 1, 2], np.eye(3))


# --------------------------------------------------------------------------- paired metrics
def test_paired_metrics_hand_computed():
    a = np.zeros((2, 3, 4, 4), np.uint8)
    b = np.full((2, 3, 4, 4), 51, np.uint8)  # 51/255 = 0.2 -> mse 0.04, psnr 10*log10(25)
    out = M.paired_metrics(a, b)
    assert set(out) == {"paired/mse", "paired/psnr"}
    assert out["paired/mse"] == pytest.approx(0.04, rel=1e-12)
    assert out["paired/psnr"] == pytest.approx(10 * math.log10(25.0), rel=1e-12)

    c = a.copy()
    c[1, 2, 3, 3] = 255  # one full-scale pixel among 96 values -> mse 1/96, psnr 10*log10(96)
    out = M.paired_metrics(a, c)
    assert out["paired/mse"] == pytest.approx(1 / 96, rel=1e-12)
    assert out["paired/psnr"] == pytest.approx(10 * math.log10(96.0), rel=1e-12)

    assert M.paired_metrics(b, b) == {"paired/mse": 0.0, "paired/psnr": math.inf}
    with pytest.raises(ValueError):
        M.paired_metrics(a, b[:1])
    with pytest.raises(ValueError):
        M.paired_metrics(a.astype(np.float32), b)


def test_inception_score_hand_computed():
    """Two images, one split: IS = exp(mean_x KL(p(y|x) || p(y))). With p(y|x) = (0.9, 0.1) and (0.1, 0.9),
    p(y) = (0.5, 0.5) and each KL = 0.9 ln 1.8 + 0.1 ln 0.2 = 0.368064..., so IS = exp(0.368064) = 1.444935."""
    from harness.metrics.frechet import inception_score

    logits = np.log(np.array([[0.9, 0.1], [0.1, 0.9]]))
    assert inception_score(logits) == pytest.approx(1.444935, abs=1e-6)
    assert inception_score(np.log(np.array([[0.5, 0.5], [0.5, 0.5]]))) == pytest.approx(1.0)  # no information


# --------------------------------------------------------------------------- cifarnet metrics
def test_cifarnet_metric_keys_small_n_against_shipped_reference():
    out = M.compute_metrics(_images(12, 0), kid_subsets=20)
    assert set(out) == CIFARNET_KEYS
    assert all(np.isfinite(v) for v in out.values())
    assert out["fid/cifarnet"] > 0 and out["sfid/cifarnet"] > 0
    # clean-fid's pipeline sees the same pixels (lossless PNG, no resize), so only the
    # Fréchet implementation differs.
    assert _rel(out["clean_fid/cifarnet"], out["fid/cifarnet"]) < 1e-4


def test_identical_sets_and_kid_with_image_reference(tmp_path):
    ref = _images(40, 1)
    same = M.compute_metrics(ref, reference=ref, cache_dir=str(tmp_path), kid_subsets=10, clean_fid=False)
    other = M.compute_metrics(_images(40, 2) // 2, reference=ref, cache_dir=str(tmp_path), kid_subsets=10)
    assert set(other) == CIFARNET_KEYS
    # KID of a set against itself is not 0 but, by hand, -(2/m)(mean k(x,x) - mean_{i!=j} k(x_i,x_j)) with the
    # cubic kernel k(x,y) = (x.y/d + 1)^3 (unbiased within-set terms, full cross term; the subset size adapts
    # to N=40, so the one subset is the whole set); a darker set scores far above it.
    def pool(images):
        return M.sample_features(images, "cifarnet", clean_fid=False)["cifarnet/pool"].astype(np.float64)

    f = pool(ref)
    k = (f @ f.T / f.shape[1] + 1) ** 3
    m = len(f)
    by_hand = -(2 / m) * (np.diag(k).mean() - (k.sum() - np.trace(k)) / (m * (m - 1)))
    assert same["kid/cifarnet"] == pytest.approx(by_hand, rel=1e-3)
    # Two sets, by hand: unbiased within-set means (off-diagonal) minus twice the full cross mean.
    g = pool(_images(40, 2) // 2)
    kg, kfg = (g @ g.T / g.shape[1] + 1) ** 3, (f @ g.T / f.shape[1] + 1) ** 3
    off = lambda a: (a.sum() - np.trace(a)) / (m * (m - 1))  # noqa: E731
    assert other["kid/cifarnet"] == pytest.approx(off(k) + off(kg) - 2 * kfg.mean(), rel=1e-3)
    assert other["kid/cifarnet"] > 0 > same["kid/cifarnet"]
    assert same["fid/cifarnet"] < 1e-3 * other["fid/cifarnet"]
    assert same["sfid/cifarnet"] < 1e-3 * other["sfid/cifarnet"]
    assert list(tmp_path.glob("custom-cifarnet-*.npz")), "reference statistics were not cached"


def test_rejects_bad_samples():
    with pytest.raises(ValueError):
        M.compute_metrics(_images(4, 0).astype(np.float32))
    with pytest.raises(ValueError):
        M.compute_metrics(np.zeros((4, 3, 64, 64), np.uint8))


# --------------------------------------------------------------------------- Inception path
def test_inception_random_init_weights_end_to_end(tmp_path):
    weights = random_inception_weights(tmp_path / "inception-random.pth", seed=0)
    assert M.validate_inception_weights(weights) == weights
    feats = M.extract_features(
        _images(2, 3), "inception", ["2048", "logits_unbiased", "spatial"], inception_weights=str(weights)
    )
    assert feats["spatial"].shape == (2, 17 * 17 * 7) == (2, 2023)
    assert feats["2048"].shape == (2, 2048) and feats["logits_unbiased"].shape == (2, 1008)

    out = M.compute_metrics(
        _images(4, 4),
        reference=_images(4, 5),
        inception_weights=str(weights),
        cache_dir=str(tmp_path),
        kid_subsets=5,
        clean_fid=False,
    )
    for k in ("fid/inception", "is/inception", "sfid/inception", "fid/cifarnet", "sfid/cifarnet"):
        assert k in out and np.isfinite(out[k]), k
    assert list(tmp_path.glob("custom-inception-*.npz"))


def test_missing_or_bad_inception_weights_give_one_line_value_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError) as e:
        M.validate_inception_weights(missing)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError) as e:
        M.validate_inception_weights(junk)
    assert str(junk) in str(e.value) and "\n" not in str(e.value)

    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="could not be loaded"):
        M.compute_metrics(_images(4, 0), inception_weights=str(wrong))
