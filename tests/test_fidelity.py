"""Fidelity to FP (harness/metrics/fidelity.py): fid_fp/kid_fp, SSIM through pytorch-msssim, LPIPS from a
local file only, and the run-directory arrays that make the FP comparison need no re-extraction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.metrics.bootstrap import fd_paired, kid_paired_replicates
from harness.metrics.errors import MetricSetupError
from harness.metrics.fidelity import fidelity_metrics, load_lpips, lpips_per_image, ssim_per_image
from harness.metrics.frechet import feature_statistics, frechet_distance
from harness.results import FEATURES, discover, load_features, save_features


def test_fid_fp_is_zero_against_itself_and_grows_with_noise() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(64, 32))
    assert fd_paired(f, f) == 0.0
    assert kid_paired_replicates(f, f, np.ones((1, 64)))[0] == 0.0
    noise = rng.normal(size=f.shape)
    fids = [fd_paired(f, f + s * noise) for s in (0.05, 0.2, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    kids = [kid_paired_replicates(f, f + s * noise, np.ones((1, 64)))[0] for s in (0.2, 1.0, 2.0)]
    assert all(a < b for a, b in zip(kids, kids[1:])), kids


@pytest.mark.parametrize("n, d", [(40, 64), (300, 16)])
def test_fid_fp_equals_the_frechet_distance_of_the_two_fits(n: int, d: int) -> None:
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, d)), rng.normal(0.2, 1.3, size=(n, d))
    sa, sb = feature_statistics(a), feature_statistics(b)
    assert fd_paired(a, b) == pytest.approx(frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"]), rel=1e-6)


def test_ssim_is_the_library_value_and_hand_checked() -> None:
    from pytorch_msssim import SSIM

    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(5, 3, 32, 32)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, size=a.shape), 0, 255).astype(np.uint8)
    per_image = ssim_per_image(a, b)
    lib = SSIM(data_range=255, channel=3)(torch.from_numpy(a).float(), torch.from_numpy(b).float())  # 0..255 scale
    assert per_image.mean() == pytest.approx(float(lib), abs=1e-5)
    assert per_image[0] != per_image[1]  # one value per image, not a batch mean
    assert np.all(ssim_per_image(a, a) == pytest.approx(1.0))
    # constant images x, y: variances and covariance 0, so SSIM = (2xy + C1) / (x² + y² + C1), C1 = 0.01²
    # (dark values, so that C1 matters: without it the value would be 2xy / (x² + y²) = 0.6)
    x, y = 2 / 255, 6 / 255
    ca, cb = np.full((1, 3, 32, 32), 2, np.uint8), np.full((1, 3, 32, 32), 6, np.uint8)
    expected = (2 * x * y + 1e-4) / (x * x + y * y + 1e-4)
    assert expected == pytest.approx(0.6559, abs=1e-4)
    assert ssim_per_image(ca, cb)[0] == pytest.approx(expected, rel=1e-4)  # float32 convolution


def _lpips_file(tmp_path: Path, net: str = "alex") -> Path:
    import lpips

    torch.manual_seed(0)
    model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    for lin in model.lins:  # lpips' linear layers are non-negative weights
        lin.model[-1].weight.data.abs_()
    path = tmp_path / f"lpips-{net}-random.pth"
    torch.save(model.state_dict(), path)
    return path


def test_lpips_from_a_local_file_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    path = _lpips_file(tmp_path)
    model = load_lpips(path)
    assert model.backbone == "alex"
    assert not (tmp_path / "torch-home").exists()  # nothing was fetched into the hub cache
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(4, 3, 32, 32)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 61, size=a.shape), 0, 255).astype(np.uint8)
    d = lpips_per_image(model, a, b, batch_size=3)
    assert np.all(lpips_per_image(model, a, a) == 0.0) and np.all(d > 0)
    with torch.no_grad():
        direct = model(torch.from_numpy(b).float() / 127.5 - 1, torch.from_numpy(a).float() / 127.5 - 1)
    assert d == pytest.approx(direct.reshape(-1).double().numpy(), rel=1e-5)
    metrics, _ = fidelity_metrics(b, a, lpips_model=model)
    assert metrics["paired/lpips/alex"] == pytest.approx(d.mean(), rel=1e-6)
    assert metrics["paired/lpips/alex_ci_low"] <= metrics["paired/lpips/alex"] <= metrics["paired/lpips/alex_ci_high"]


class Payload:  # not a tensor: a weights_only load refuses it
    pass


def test_lpips_refuses_pickles_and_foreign_files(tmp_path: Path) -> None:
    bad = tmp_path / "pickle.pth"
    torch.save({"x": Payload()}, bad)
    with pytest.raises(MetricSetupError, match="not a torch state dict"):
        load_lpips(bad)
    other = tmp_path / "other.pth"
    torch.save({"lin0.model.1.weight": torch.zeros(1, 7, 1, 1)}, other)
    with pytest.raises(MetricSetupError, match="match no backbone"):
        load_lpips(other)
    with pytest.raises(MetricSetupError, match="does not exist"):
        load_lpips(tmp_path / "missing.pth")


def test_fidelity_metrics_of_fp_against_itself_and_a_perturbed_copy() -> None:
    rng = np.random.default_rng(3)
    fp = rng.integers(30, 226, size=(24, 3, 32, 32)).astype(np.uint8)
    feats = {"cifarnet/pool": rng.normal(size=(24, 16)), "cifarnet/logits": rng.normal(size=(24, 10)),
             "cifarnet/spatial": rng.normal(size=(24, 20))}
    same, reps = fidelity_metrics(fp, fp, feats, feats)
    assert same["paired/mse"] == 0.0 and math.isinf(same["paired/psnr"]) and same["paired/ssim"] == pytest.approx(1.0)
    assert same["fid_fp/cifarnet"] == 0.0 and same["kid_fp/cifarnet"] == 0.0
    assert "paired/psnr_ci_low" not in same  # no interval around an infinite PSNR
    assert np.all(reps["fid_fp/cifarnet"] == 0.0)
    q = np.clip(fp.astype(int) + rng.integers(-8, 9, size=fp.shape), 0, 255).astype(np.uint8)
    fq = {k: v + 0.3 * rng.normal(size=v.shape) for k, v in feats.items()}
    m, reps = fidelity_metrics(q, fp, fq, feats)
    for key in ("paired/mse", "paired/psnr", "paired/ssim", "fid_fp/cifarnet", "kid_fp/cifarnet"):
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key
        assert np.isfinite(reps[key]).all()
    assert m["fid_fp/cifarnet"] > 0 and m["paired/psnr"] == pytest.approx(10 * math.log10(1 / m["paired/mse"]))
    # PSNR's interval is the image of the MSE interval
    assert m["paired/psnr_ci_low"] == pytest.approx(10 * math.log10(1 / m["paired/mse_ci_high"]))


def test_features_file_is_validated_and_runs_are_read_robustly(tmp_path: Path) -> None:
    rdir = tmp_path / "runs" / "m" / "a"
    rdir.mkdir(parents=True)
    feats = {"cifarnet/pool": np.ones((5, 3), np.float32)}
    save_features(rdir, feats)
    assert load_features(rdir, 5)["cifarnet/pool"].shape == (5, 3)
    assert load_features(rdir, 6) is None  # another sample count: extract again
    (rdir / FEATURES).write_bytes((rdir / FEATURES).read_bytes()[:40])  # truncated by a crash
    assert load_features(rdir, 5) is None
    spec = {"model": "m", "protocol": "smoke", "method": "rtn", "bits": "w8a8", "seed": 0, "preset": "fast",
            "scope": "uniform"}
    (rdir / "results.json").write_text(json.dumps({"spec": spec, "status": "complete", "metrics": {"x": 1.0}}))
    for name, text in (("b", "{not json"), ("c", "[1, 2]"), ("d", json.dumps({"spec": {"model": "m"}}))):
        (tmp_path / "runs" / "m" / name).mkdir()
        (tmp_path / "runs" / "m" / name / "results.json").write_text(text)
    runs = discover(tmp_path)
    assert [r.dir.name for r in runs] == ["a"] and runs[0].metrics == {"x": 1.0}
