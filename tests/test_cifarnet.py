"""CifarNet, its shipped weights/card and the shipped CIFAR-10 test reference statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from harness.metrics.reference import SHIPPED, RefStats, features_sha256, reference_stats
from models.cifarnet import DEFAULT_ASSET_DIR, CifarNet, load_cifarnet, num_params


def _uint8(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_features_shapes_and_temperature():
    torch.manual_seed(0)
    net = CifarNet(widths=(16, 32, 48), spatial_channels=8).eval()
    net.temperature.fill_(2.0)
    x = _uint8(5)
    f = net.features(x)
    assert set(f) == {"pool", "logits", "spatial"}
    assert f["pool"].shape == (5, 48)
    assert f["logits"].shape == (5, 10)
    assert net.spatial_hw == 7 and f["spatial"].shape == (5, 8 * 7 * 7) == (5, net.spatial_dim)
    with torch.no_grad():
        raw = net(net.normalize(x))
    torch.testing.assert_close(f["logits"], raw / 2.0)
    with pytest.raises(ValueError):
        net.features(torch.zeros((1, 3, 28, 28), dtype=torch.uint8))


def test_whitening_whitens_training_patches():
    net = CifarNet(widths=(8, 8, 8), spatial_channels=4)
    # correlated colour images so that whitening has something to undo
    base = torch.rand(64, 1, 32, 32) * 200
    x = (base.repeat(1, 3, 1, 1) + torch.rand(64, 3, 32, 32) * 50).to(torch.uint8)
    net.init_whitening(x)
    with torch.no_grad():
        y = net.whiten(net.normalize(x))[:, :12]  # the 12 positive filters
    z = y.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = torch.cov(z.T)
    # whitened up to the eps regulariser: near-identity for the well-conditioned directions
    assert torch.allclose(torch.diag(cov)[:6], torch.ones(6, dtype=torch.float64), atol=0.1)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 0.05


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    net = CifarNet(widths=(8, 16, 24), spatial_channels=4).eval()
    net.temperature.fill_(1.5)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(net.config))
    loaded = load_cifarnet(tmp_path)
    x = _uint8(3)
    for k, v in net.features(x).items():
        torch.testing.assert_close(loaded.features(x)[k], v)


def test_missing_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench train extractor cifarnet"):
        load_cifarnet(tmp_path / "nowhere")


# --------------------------------------------------------------------------- shipped assets
def test_shipped_cifarnet_and_card():
    cfg = json.loads((DEFAULT_ASSET_DIR / "config.json").read_text())
    card = (DEFAULT_ASSET_DIR / "README.md").read_text()
    net = load_cifarnet()
    assert num_params(net) == cfg["params"]
    assert 0.5 < cfg["test_accuracy"] <= 1.0
    assert 0.05 < cfg["temperature"] < 20
    assert float(net.temperature) == pytest.approx(cfg["temperature"])
    assert cfg["data_train"]["sha256"] in card
    assert f"{cfg['test_accuracy']:.4f}" in card
    assert "bench train extractor cifarnet --data" in card
    assert net.spatial_dim <= 2048


def test_shipped_reference_consistent_with_shipped_net():
    ref = reference_stats("cifarnet", "cifar10-test")
    cfg = json.loads((DEFAULT_ASSET_DIR / "config.json").read_text())
    assert isinstance(ref, RefStats) and ref.path == str(SHIPPED[("cifarnet", "cifar10-test")])
    assert SHIPPED[("cifarnet", "cifar10-test")].stat().st_size < 15e6
    assert ref.num_images == 10000
    assert ref.meta["extractor_weights_sha256"] == cfg["weights_sha256"]
    assert ref.meta["source"]["sha256"] == cfg["data_test"]["sha256"]
    net = load_cifarnet()
    assert ref.mu["pool"].shape == (net.pool_dim,) and ref.sigma["pool"].shape == (net.pool_dim,) * 2
    assert ref.mu["spatial"].shape == (net.spatial_dim,)
    assert ref.sigma["spatial"].dtype == np.float64
    stored = ref.features["pool"]
    assert stored.shape == (10000, net.pool_dim)
    assert features_sha256(stored) == ref.meta["features_sha256"]["pool"]
    # the raw features agree with the stored mean (float16 storage rounding only)
    assert np.allclose(stored.astype(np.float64).mean(0), ref.mu["pool"], rtol=1e-2, atol=1e-2)

    # Logits of the shipped net on the reference features: CIFAR-10 test is balanced (1000 per
    # class), and with the fitted temperature the mean confidence should track the card's accuracy.
    with torch.no_grad():
        logits = net.head(torch.from_numpy(ref.raw("pool"))) / net.temperature
    p = logits.softmax(1)
    counts = torch.bincount(p.argmax(1), minlength=10)
    assert counts.min() > 600 and counts.max() < 1400, counts
    assert abs(float(p.max(1).values.mean()) - cfg["test_accuracy"]) < 0.05
