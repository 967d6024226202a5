"""Feature sets: one float32 row per image, and features split by image concatenate (torchrun gathers them)."""

from __future__ import annotations

import numpy as np
import pytest

from harness import metrics as M


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(64, 3, 32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def features(images) -> dict[str, np.ndarray]:
    return M.sample_features(images)


def test_features_are_float32_rows_per_image(images, features):
    assert set(M.CIFARNET_FEATURES) | {M.CLEANFID_CIFARNET} <= set(features)
    assert all(f.dtype == np.float32 and f.shape[0] == len(images) for f in features.values())


def test_features_of_parts_concatenate_to_features_of_whole(images, features):
    # Uneven parts, one of a single image (a run's last shard can hold one): row i depends on image i only.
    cuts = [(0, 1), (1, 40), (40, 64)]
    parts = [M.sample_features(images[a:b]) for a, b in cuts]
    assert all(list(p) == list(features) for p in parts)
    joined = {k: np.concatenate([p[k] for p in parts]) for k in features}
    for k, whole in features.items():
        # Other batch shapes may take other CPU kernels: equal up to float32 round-off.
        np.testing.assert_allclose(joined[k], whole, rtol=1e-5, atol=1e-5 * float(np.abs(whole).max()), err_msg=k)
    a, b = M.metrics_from_features(joined, kid_subsets=20), M.metrics_from_features(features, kid_subsets=20)
    assert a.keys() == b.keys()
    assert all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-9) for k in a), (a, b)


def test_clean_fid_off_and_bad_inputs(images, features):
    no_cfid = M.sample_features(images[:8], clean_fid=False)
    assert set(no_cfid) == set(M.CIFARNET_FEATURES) | (set(features) & set(M.INCEPTION_FEATURES))
    assert "clean_fid/cifarnet" not in M.metrics_from_features(no_cfid, kid_subsets=5)
    with pytest.raises(ValueError, match="missing"):
        M.metrics_from_features({k: v for k, v in features.items() if k != "cifarnet/pool"})
    with pytest.raises(ValueError, match="unknown"):
        M.metrics_from_features({**features, "cifarnet/typo": features["cifarnet/pool"]})
    with pytest.raises(ValueError, match="same N"):
        M.metrics_from_features({**features, "cifarnet/logits": features["cifarnet/logits"][:10]})
    with pytest.raises(ValueError, match="uint8"):
        M.sample_features(images.astype(np.float32))
    with pytest.raises(ValueError, match="not found"):  # bad weights fail before any extraction
        M.sample_features(images, inception_weights="/nonexistent/inception.pth")
