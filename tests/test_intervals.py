"""Bootstrap intervals, paired significance and the interval rule of ``bench regress`` (harness/metrics/bootstrap.py,
harness/leaderboard.py, harness/regress.py), on synthetic data with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness import regress as R
from harness.leaderboard import significance_marks, summarise
from harness.metrics.bootstrap import (
    centred_interval,
    fd_to_reference_replicates,
    mean_replicates,
    resample_weights,
    significance,
)
from harness.metrics.fidelity import fidelity_metrics
from harness.metrics.frechet import feature_statistics, frechet_distance
from harness.metrics.registry import direction, interval_keys, interval_of, lookup
from harness.results import discover, long_table, save_replicates


def test_resample_weights_are_counts_of_a_seeded_draw() -> None:
    w = resample_weights(7, 5, seed=3)
    assert w.shape == (5, 7) and (w.sum(axis=1) == 7).all() and (w >= 0).all()
    idx = np.random.default_rng(3).integers(0, 7, size=(5, 7))
    assert np.array_equal(w[2], np.bincount(idx[2], minlength=7))
    assert np.array_equal(w, resample_weights(7, 5, seed=3))  # every run of 7 images gets the same resamples


def test_centred_interval_hand_computed() -> None:
    # replicates 0..4 (mean 2) centred: -2..2; linear quantiles at 2.5% / 97.5% of 5 points: -1.9, 1.9
    lo, hi = centred_interval(10.0, np.arange(5.0))
    assert (lo, hi) == pytest.approx((8.1, 11.9))
    with pytest.raises(ValueError, match="non-finite"):
        centred_interval(1.0, np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="non-finite"):
        centred_interval(float("nan"), np.arange(5.0))


def test_interval_of_a_normal_mean_covers_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(12345)
    n, reps, mu = 60, 200, 1.5
    w = resample_weights(n, 1000)
    covered = 0
    for _ in range(reps):
        x = rng.normal(mu, 2.0, n)
        lo, hi = centred_interval(x.mean(), mean_replicates(x, w))
        covered += lo <= mu <= hi
    assert 0.9 <= covered / reps <= 0.99, covered / reps


def test_frechet_replicates_match_scipy_and_a_hand_computed_case() -> None:
    # 1-D: rows {0, 2}: mean 1, sample variance 2; reference N(0, 2): d² = 1 + 2 + 2 - 2·sqrt(2·2) = 1
    f = np.array([[0.0], [2.0]])
    got = fd_to_reference_replicates(f, [0.0], [[2.0]], np.array([[1.0, 1.0], [2.0, 0.0]]))
    assert got[0] == pytest.approx(1.0)
    assert got[1] == pytest.approx(2.0)  # both draws are row 0: mean 0, variance 0 -> 0 + 0 + 2 - 0
    rng = np.random.default_rng(0)
    for n, d in ((40, 64), (200, 16)):  # sample space and feature space
        x = rng.normal(size=(n, d))
        ref = feature_statistics(rng.normal(0.3, 1.2, size=(500, d)))
        st = feature_statistics(x)
        expected = frechet_distance(st["mu"], st["sigma"], ref["mu"], ref["sigma"])
        full = fd_to_reference_replicates(x, ref["mu"], ref["sigma"], np.ones((1, n)))[0]
        assert full == pytest.approx(expected, rel=1e-6)
        # a resample equals the distance of the explicitly repeated rows
        w = resample_weights(n, 1, seed=7)[0]
        rows = np.repeat(x, w.astype(int), axis=0)
        st_b = feature_statistics(rows)
        expected_b = frechet_distance(st_b["mu"], st_b["sigma"], ref["mu"], ref["sigma"])
        assert fd_to_reference_replicates(x, ref["mu"], ref["sigma"], w[None])[0] == pytest.approx(expected_b, rel=1e-6)


def test_paired_significance_flips_with_a_known_shift() -> None:
    rng = np.random.default_rng(1)
    n = 128
    w = resample_weights(n, 1000)
    a = rng.normal(0.0, 1.0, n)
    b = a + rng.normal(0.0, 0.1, n)  # the same images, a little noise: no real difference
    _, lo, hi, sig = significance(b.mean(), mean_replicates(b, w), a.mean(), mean_replicates(a, w))
    assert not sig and lo < 0 < hi
    shifted = b + 0.1  # a shift the pairing resolves (per-image noise 0.1, se ~0.009) though it is < 1 sd of a
    d, lo, hi, sig = significance(shifted.mean(), mean_replicates(shifted, w), a.mean(), mean_replicates(a, w))
    assert sig and lo > 0 and d == pytest.approx(0.1 + (b - a).mean())
    # unpaired resamples would not resolve it: the interval of each mean is wider than the shift
    lo_a, hi_a = centred_interval(a.mean(), mean_replicates(a, w))
    assert hi_a - lo_a > 0.2


def _images(seed: int, n: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 216, size=(n, 3, 32, 32)).astype(np.uint8)


def _write_run(out: Path, method: str, bits: str, images_q: np.ndarray, images_fp: np.ndarray) -> None:
    rdir = out / "runs" / "m" / f"{method}-{bits}"
    rdir.mkdir(parents=True)
    metrics, reps = fidelity_metrics(images_q, images_fp)
    spec = {"model": "m", "protocol": "smoke", "method": method, "bits": bits, "seed": 0, "preset": "fast",
            "scope": "uniform", "num_samples": len(images_q)}
    (rdir / "results.json").write_text(json.dumps({"spec": spec, "status": "complete", "metrics": metrics}))
    save_replicates(rdir, reps)


def test_leaderboard_mark_flips_when_a_known_shift_is_added(tmp_path: Path) -> None:
    fp = _images(0)
    rng = np.random.default_rng(5)
    noise = rng.integers(-6, 7, size=fp.shape)
    rtn = np.clip(fp + noise, 0, 255).astype(np.uint8)
    other = rng.integers(-6, 7, size=fp.shape)  # an error of the same distribution: no real difference
    same = np.clip(fp + other, 0, 255).astype(np.uint8)
    worse = np.clip(fp + 2 * noise, 0, 255).astype(np.uint8)  # twice the error on every image
    for method, imgs in (("fp", fp), ("rtn", rtn), ("near", same), ("far", worse)):
        _write_run(tmp_path, method, "fp" if method == "fp" else "w8a8", imgs, fp)
    runs = discover(tmp_path, complete_only=True)
    marks = significance_marks(runs)
    assert marks[("m", "smoke", "cifar10-test", "far", "w8a8", "fast", "uniform", "paired/mse")] == "worse"
    assert marks[("m", "smoke", "cifar10-test", "near", "w8a8", "fast", "uniform", "paired/mse")] == "same"
    assert marks[("m", "smoke", "cifar10-test", "far", "w8a8", "fast", "uniform", "paired/psnr")] == "worse"
    summary = summarise(long_table(runs), runs)
    far = summary[(summary["method"] == "far") & (summary["metric"] == "paired/mse")].iloc[0]
    assert far["vs_rtn"] == "worse" and far["ci_low"] < far["mean"] < far["ci_high"]
    assert not any(interval_of(m) for m in summary["metric"])  # interval keys became columns


def test_registry_directions_and_interval_keys() -> None:
    assert direction("fid_fp/cifarnet") == -1 and direction("paired/ssim") == 1 and direction("is/inception") == 1
    assert direction("paired/lpips/alex") == -1 and direction("kid_std/cifarnet") == 0
    assert direction("fid/cifarnet_ci_low") == 0 and lookup("fid/cifarnet_ci_high") is None
    assert interval_keys("paired/psnr") == ("paired/psnr_ci_low", "paired/psnr_ci_high")
    assert interval_of("kid_fp/inception_ci_high") == ("kid_fp/inception", "high")
    assert lookup("paired/mse").pattern == "paired/mse" and lookup("time/calib_seconds").pattern == "time/*"


def test_regress_flags_a_move_outside_the_interval_and_passes_one_inside() -> None:
    tol = {"abs": 100.0}  # a window that would pass anything: the interval replaces it
    ci = (9.0, 12.0)
    assert R.judge("fid/cifarnet", 10.0, 11.9, tol, ci)[0] == R.OK
    assert R.judge("fid/cifarnet", 10.0, 12.1, tol, ci)[0] == R.REGRESSED
    assert R.judge("fid/cifarnet", 10.0, 8.9, tol, ci)[0] == R.IMPROVED
    assert R.judge("paired/psnr", 30.0, 28.0, {"rel": 0.5}, (29.0, 31.0))[0] == R.REGRESSED  # higher is better
    assert R.judge("paired/psnr", 30.0, 31.5, {"rel": 0.5}, (29.0, 31.0))[0] == R.IMPROVED
    assert R.judge("fid/cifarnet", 10.0, float("nan"), tol, ci)[0] == R.REGRESSED
    key = {"model": "m", "protocol": "smoke", "method": "rtn", "bits": "w8a8", "seed": 0, "preset": "fast",
           "scope": "uniform"}
    base = {"runs": [{"key": key, "metrics": {"fid_fp/cifarnet": 1.0, "fid_fp/cifarnet_ci_low": 0.8,
                                              "fid_fp/cifarnet_ci_high": 1.3, "paired/mse": 0.01}}]}

    def report(fid_fp: float):
        res = {"spec": key, "status": "complete",
               "metrics": {"fid_fp/cifarnet": fid_fp, "fid_fp/cifarnet_ci_low": 0.0, "fid_fp/cifarnet_ci_high": 9.0,
                           "paired/mse": 0.01, "paired/ssim": 0.9, "paired/ssim_ci_low": 0.8}}
        return R.compare(base, {R.run_key(key): res})

    inside, outside = report(1.25), report(1.35)
    assert inside.ok and not outside.ok
    assert [(r.metric, r.verdict) for r in outside.failures] == [("fid_fp/cifarnet", R.REGRESSED)]
    # a metric absent from the baseline is "new" (its interval keys are not rows of their own)
    assert [(r.metric, r.verdict) for r in inside.rows if r.verdict == R.NEW] == [("paired/ssim", R.NEW)]


def test_runs_scored_against_different_references_never_share_a_table(tmp_path: Path) -> None:
    from harness.leaderboard import tables, to_markdown

    for ref, fid in (("cifar10-test", 10.0), ("cifar10-train", 20.0)):
        rdir = tmp_path / "runs" / "m" / f"rtn-{ref}"
        rdir.mkdir(parents=True)
        spec = {"model": "m", "protocol": "smoke", "reference": ref, "method": "rtn", "bits": "w8a8", "seed": 0,
                "preset": "fast", "scope": "uniform", "num_samples": 8}
        (rdir / "results.json").write_text(json.dumps({"spec": spec, "status": "complete",
                                                        "metrics": {"fid/cifarnet": fid}}))
    runs = discover(tmp_path, complete_only=True)
    tabs = tables(summarise(long_table(runs), runs))
    assert {k[:3] for k in tabs} == {("m", "smoke", "cifar10-test"), ("m", "smoke", "cifar10-train")}
    assert [t.loc["rtn", "w8a8"] for t in tabs.values()] == ["10", "20"]  # one value per table, never averaged
    md = to_markdown(tabs)
    assert "reference `cifar10-test`" in md and "reference `cifar10-train`" in md
