"""Reference sets (`bench ref build/import/ls`), scoring against a named reference, Inception at any
size, and safe Inception weights loading. Real torch-fidelity code with random-init Inception weights."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers_images import sha256_of, smooth_images
from helpers_inception import random_inception_weights
from PIL import Image

from harness import metrics as M
from harness.cli import main
from harness.metrics.reference import adm_spatial_permutation
from harness.metrics.sources import RestrictedUnpickler, center_crop_resize, load_cifar_batch

pytestmark = pytest.mark.filterwarnings("ignore:Inception weights .* differs from the published")




@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("refstats")
    weights = random_inception_weights(root / "inception-random.pth", seed=0)
    imgs = smooth_images(6, 256, 0)
    folder = root / "pngs"
    (folder / "a" / "b").mkdir(parents=True)
    names = ["00.png", "a/01.png", "a/b/02.png", "03.png", "a/04.png", "05.png"]
    for name, im in zip(names, imgs):
        Image.fromarray(im.transpose(1, 2, 0)).save(folder / name)
    npz = root / "ref_batch.npz"
    np.savez(npz, arr_0=imgs.transpose(0, 2, 3, 1))  # ADM layout [N, H, W, 3]
    tgz = root / "imgs.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name in names:
            tf.add(folder / name, arcname=f"imgs/{name}")
    store = root / "store"
    return {"root": root, "weights": str(weights), "imgs": imgs, "folder": folder, "npz": npz, "tgz": tgz,
            "store": store}


def _bench(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def built(env):
    """`bench ref build` from a folder, an ADM npz and a tar.gz of the same six 256-px images."""
    out = {}
    for name, src in (("toy-folder", env["folder"]), ("toy-npz", env["npz"]), ("toy-tgz", env["tgz"])):
        t = time.perf_counter()
        r = _bench("ref", "build", name, "--images", str(src), "--inception-weights", env["weights"],
                   "--store", str(env["store"]), "--device", "cpu", "--batch-size", "4")
        assert r.exit_code == 0, r.output
        out[name] = M.resolve_reference(name, "inception", env["weights"], cache_dir=env["store"])
        out[name].seconds = time.perf_counter() - t
    return out


def test_build_from_folder_npz_and_tar_records_manifest_and_exact_statistics(env, built):
    wsha = sha256_of(env["weights"])
    kinds = {"toy-folder": "folder", "toy-npz": "adm-npz", "toy-tgz": "tar"}
    for name, ref in built.items():
        m = ref.manifest
        assert m["name"] == name and m["extractor"] == "inception" and m["provenance"] == "built"
        assert m["num_images"] == 6 and m["resolution"] == 256 and m["kid_features"] == 6
        assert m["source"]["kind"] == kinds[name] and "center crop to 256x256" in m["preprocessing"]
        assert m["extractor_weights_sha256"] == wsha and m["extractor_weights_published"] is False
        assert m["created"] and Path(ref.path).name == f"inception-{wsha[:16]}.npz"
        assert ref.sha256 == m["stats_sha256"] == sha256_of(ref.path)
        assert ref.stats.mu["2048"].shape == (2048,) and ref.stats.sigma["spatial"].shape == (2023, 2023)
    assert built["toy-npz"].manifest["source"]["sha256"] == sha256_of(env["npz"])
    assert built["toy-tgz"].manifest["source"]["sha256"] == sha256_of(env["tgz"])
    # The folder hash covers the relative paths and the bytes of each file.
    h = hashlib.sha256()
    for rel in sorted(str(p.relative_to(env["folder"])) for p in env["folder"].rglob("*.png")):
        h.update(rel.encode() + b"\0" + hashlib.sha256((env["folder"] / rel).read_bytes()).digest())
    assert built["toy-folder"].manifest["source"]["sha256"] == h.hexdigest()

    # The statistics are those of the features of the images (lossless PNG: same pixels in every source).
    f = M.extract_features(env["imgs"], "inception", ["2048", "spatial"], inception_weights=env["weights"])
    for ref in built.values():
        for layer in ("2048", "spatial"):
            want = M.feature_statistics(f[layer])
            np.testing.assert_allclose(ref.stats.mu[layer], want["mu"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ref.stats.sigma[layer], want["sigma"], rtol=1e-4,
                                       atol=1e-5 * np.abs(want["sigma"]).max())
        kid = ref.stats.raw("2048")
        np.testing.assert_allclose(np.sort(kid, axis=0), np.sort(f["2048"], axis=0), rtol=1e-5, atol=1e-6)


def test_build_from_cifar_pickles_with_restricted_unpickler(env, tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    x = smooth_images(5, 32, 3)
    with open(d / "test_batch", "wb") as fh:  # the real files are protocol-2 pickles of a dict
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": [0, 1, 2, 3, 4],
                     "data": x.reshape(5, 3072), "filenames": [f"{i}.png" for i in range(5)]}, fh, protocol=2)
    r = _bench("ref", "build", "toy-cifar10-test", "--images", str(tmp_path), "--extractor", "cifarnet",
               "--store", str(env["store"]), "--device", "cpu")
    assert r.exit_code == 0, r.output
    ref = M.resolve_reference("toy-cifar10-test", "cifarnet", cache_dir=env["store"])
    assert ref.manifest["source"]["kind"] == "cifar10-pickles" and ref.manifest["num_images"] == 5
    assert ref.manifest["source"]["sha256"] == sha256_of(d / "test_batch")
    direct = M.compute_reference_stats(x, "cifarnet", use_cache=False)
    for layer in ("pool", "spatial"):
        np.testing.assert_allclose(ref.stats.mu[layer], direct.mu[layer], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(ref.stats.sigma[layer], direct.sigma[layer], rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(ref.stats.raw("pool"), direct.raw("pool"))  # all 5 kept, in order

    # A batch whose pickle names any other global is refused before anything runs.
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(target),))

    payload = pickle.dumps({"data": Evil()}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    with pytest.raises(pickle.UnpicklingError):
        load_cifar_batch(payload)
    assert not target.exists()


def test_import_adm_and_clean_fid_statistics_record_provenance(env, tmp_path):
    rng = np.random.default_rng(0)
    mu, mu_s = rng.normal(size=2048), rng.normal(size=2023)
    sigma, sigma_s = np.diag(rng.uniform(0.5, 2.0, 2048)), np.diag(rng.uniform(0.5, 2.0, 2023))
    adm = tmp_path / "VIRTUAL_toy256_labeled.npz"
    np.savez(adm, arr_0=np.zeros((3, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    r = _bench("ref", "import", "toy-adm", "--npz", str(adm), "--store", str(env["store"]))
    assert r.exit_code == 0, r.output
    with pytest.warns(UserWarning, match="TF Inception graph"):  # random weights are not the published port
        ref = M.resolve_reference("toy-adm", "inception", env["weights"], cache_dir=env["store"])
    m = ref.manifest
    assert m["provenance"] == "imported:adm" and m["source"]["sha256"] == sha256_of(adm) and m["num_images"] == 3
    assert m["source"]["path"] == str(adm.resolve()) and "TF Inception" in m["network"]
    assert Path(ref.path).name == "inception-imported.npz" and m["kid_features"] == 0
    # ADM flattens [17, 17, 7] (h, w, c); ours is [7, 17, 17] (c, h, w): ours[c*289 + h*17 + w] = adm[(h*17+w)*7 + c]
    perm = adm_spatial_permutation()
    assert perm[0] == 0 and perm[1] == 7 and perm[17] == 17 * 7 and perm[289] == 1 and perm[2022] == 2022
    np.testing.assert_array_equal(ref.stats.mu["spatial"][[0, 1, 289]], mu_s[[0, 7, 1]])
    np.testing.assert_array_equal(np.diag(ref.stats.sigma["spatial"])[[1, 289]], np.diag(sigma_s)[[7, 1]])
    np.testing.assert_array_equal(ref.stats.mu["2048"], mu)

    # Scoring against imported statistics: FID by hand, no KID (no raw reference features).
    feats = {"inception/2048": rng.normal(size=(4, 2048)).astype(np.float32),
             "inception/logits_unbiased": rng.normal(size=(4, 1008)).astype(np.float32),
             "inception/spatial": rng.normal(size=(4, 2023)).astype(np.float32)}
    with pytest.warns(UserWarning, match="kid/inception skipped"):
        out = M.metrics_from_features(feats, reference="toy-adm", inception_weights=env["weights"],
                                      cache_dir=str(env["store"]))
    assert set(out) == {"fid/inception", "is/inception", "sfid/inception"}
    # By hand, with the low-rank identity: Σ₁ = A Aᵀ, tr(Σ₁Σ₂)^½ = Σ sqrt(eig(Aᵀ Σ₂ A)); Σ₂ diagonal here.
    f = feats["inception/2048"].astype(np.float64)
    a = (f - f.mean(0)).T / np.sqrt(len(f) - 1)
    ev = np.linalg.eigvalsh(a.T @ (np.diag(sigma)[:, None] * a))
    d = f.mean(0) - mu
    by_hand = d @ d + (a * a).sum() + np.trace(sigma) - 2 * np.sqrt(np.clip(ev, 0, None)).sum()
    assert out["fid/inception"] == pytest.approx(by_hand, rel=1e-6)

    cf = tmp_path / "toy_clean_custom_na.npz"
    np.savez(cf, mu=mu[:16], sigma=sigma[:16, :16])
    r = _bench("ref", "import", "toy-adm", "--npz", str(cf), "--store", str(env["store"]))
    assert r.exit_code == 0, r.output
    c = M.resolve_reference("toy-adm", "clean-fid-inception", cache_dir=env["store"])
    assert c.manifest["provenance"] == "imported:clean-fid" and c.stats.mu["pool"].shape == (16,)

    bad = tmp_path / "obj.npz"
    np.savez(bad, mu=np.array([{"x": 1}], dtype=object))
    r = CliRunner().invoke(main, ["ref", "import", "x", "--npz", str(bad), "--store", str(env["store"])])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


def test_ref_ls_lists_shipped_built_and_imported(env, built):
    r = _bench("ref", "ls", "--store", str(env["store"]))
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"store: {env['store']}"
    assert any(line.startswith("cifar10-test") and "shipped" in line for line in lines)
    assert any(line.startswith("toy-folder") and "inception" in line and " 256 " in line and "built" in line
               for line in lines)
    os.environ["DMQBENCH_REFSTATS"] = str(env["store"])
    try:
        assert M.default_cache_dir() == env["store"]
        assert any(m["name"] == "toy-tgz" for m in M.list_entries())
    finally:
        del os.environ["DMQBENCH_REFSTATS"]


class _Payload:
    """Unpickling this calls os.mkdir(target): proof of code execution if the directory appears."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pickle_payload_as_inception_weights_does_not_execute(env, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no hub weights to fall back on
    target = tmp_path / "payload-ran"
    plain = tmp_path / "plain-pickle.pth"
    plain.write_bytes(pickle.dumps(_Payload(target)))
    zipped = tmp_path / "torch-save.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _Payload(target)}, zipped)
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"fc.weight": 1.0}, not_tensors)
    x = smooth_images(2, 64, 0)
    for bad in (plain, zipped, not_tensors):
        for call in (lambda bad=bad: M.validate_inception_weights(bad),
                     lambda bad=bad: M.check_extractor("inception", str(bad), 64),
                     lambda bad=bad: M.sample_features(x, "inception", inception_weights=str(bad))):
            with pytest.raises(M.MetricSetupError) as e:
                call()
            assert "\n" not in str(e.value) and str(bad) in str(e.value) and "not a plain state dict" in str(e.value) \
                or "expected a non-empty" in str(e.value)
        r = CliRunner().invoke(main, ["ref", "build", "x", "--images", str(env["folder"]), "--inception-weights",
                                      str(bad), "--store", str(tmp_path / "s"), "--device", "cpu"])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert not target.exists()
    assert not target.exists() and not (tmp_path / "s").exists()


def test_inception_metrics_on_64_and_256_px_samples_are_finite(env, built):
    ref = built["toy-folder"]
    for size, n in ((64, 6), (256, 4)):
        x = smooth_images(n, size, 10 + size)
        feats = M.sample_features(x, "inception", inception_weights=env["weights"], batch_size=4)
        assert set(feats) == set(M.INCEPTION_FEATURES)
        assert feats["inception/spatial"].shape == (n, 2023)
        out = M.metrics_from_features(feats, reference="toy-folder", inception_weights=env["weights"],
                                      cache_dir=str(env["store"]), kid_subsets=5)
        assert set(out) == {"fid/inception", "is/inception", "sfid/inception", "kid/inception", "kid_std/inception"}
        assert all(np.isfinite(v) for v in out.values()), out
        # torch-fidelity's sqrtm FID vs the exact low-rank form (N < 2048), on the stored statistics
        by_eig = M.frechet_distance_to_features(feats["inception/2048"], ref.stats.mu["2048"], ref.stats.sigma["2048"])
        assert out["fid/inception"] == pytest.approx(by_eig, rel=1e-4) and out["fid/inception"] > 0
    # the same reference given as its statistics file
    by_path = M.metrics_from_features(feats, reference=ref.path, inception_weights=env["weights"], kid_subsets=5)
    assert by_path == out


def test_cifarnet_refuses_64_px_with_one_line(env):
    x = smooth_images(4, 64, 0)
    for call in (lambda: M.compute_metrics(x), lambda: M.sample_features(x),
                 lambda: M.check_extractor("cifarnet", None, 64)):
        with pytest.raises(M.MetricSetupError, match="CifarNet takes 32x32") as e:
            call()
        assert "\n" not in str(e.value) and "inception" in str(e.value)
    M.check_extractor("cifarnet", None, 32)
    M.check_extractor("inception", env["weights"], (256, 256))
    with pytest.raises(M.MetricSetupError, match="square"):
        M.check_extractor("inception", env["weights"], (256, 128))
    with pytest.raises(M.MetricSetupError, match="unknown extractor"):
        M.check_extractor("dino", None, 32)


def test_check_reference_is_fast_and_names_the_fix(env, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    t = time.perf_counter()
    with pytest.raises(M.MetricSetupError) as e:
        M.check_reference("lsun-church-train", "inception", env["weights"], cache_dir=tmp_path / "empty")
    msg = str(e.value)
    assert "\n" not in msg and "bench ref build lsun-church-train --images DIR --inception-weights W" in msg
    with pytest.raises(M.MetricSetupError, match="pass --inception-weights W"):
        M.check_reference("lsun-church-train", "inception", None, cache_dir=tmp_path / "empty")
    with pytest.raises(M.MetricSetupError, match="--extractor cifarnet"):
        M.check_reference("cifar10-train", "cifarnet", cache_dir=tmp_path / "empty")
    with pytest.raises(M.MetricSetupError, match="no Inception weights"):
        M.check_extractor("inception", None, 256)
    shipped = M.check_reference("cifar10-test", "cifarnet")
    assert shipped.name == "cifar10-test" and shipped.sha256 == sha256_of(shipped.path) and shipped._stats is None
    assert time.perf_counter() - t < 1.0


def test_default_reference_is_the_shipped_cifar10_test(env):
    x = smooth_images(8, 32, 5)
    feats = M.sample_features(x, clean_fid=False)
    default = M.metrics_from_features(feats, kid_subsets=5)
    assert M.metrics_from_features(feats, reference="cifar10-test", kid_subsets=5) == default
    shipped = M.resolve_reference("cifar10-test", "cifarnet")
    assert M.metrics_from_features(feats, reference=shipped.path, kid_subsets=5) == default


def test_running_statistics_and_center_crop_hand_cases():
    rs = M.RunningStatistics()
    rs.update(np.array([[0.0, 1.0]]))
    rs.update(np.array([[2.0, 1.0], [4.0, 4.0]]))
    st = rs.statistics()  # column 0: mean 2, var ((-2)^2+0+2^2)/2 = 4; column 1: mean 2, var (1+1+4)/2 = 3
    np.testing.assert_allclose(st["mu"], [2.0, 2.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(st["sigma"], [[4.0, 3.0], [3.0, 3.0]], rtol=0, atol=1e-15)
    a = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)
    np.testing.assert_array_equal(center_crop_resize(Image.fromarray(a), 4), a[:, 2:6])  # short side = 4: crop only
    big = np.zeros((16, 24, 3), np.uint8)
    big[:, :, 0] = 200  # box-halving then crop keeps a uniform colour exactly
    np.testing.assert_array_equal(center_crop_resize(Image.fromarray(big), 4), np.broadcast_to([200, 0, 0], (4, 4, 3)))


def test_store_manifest_is_json_next_to_npz(env, built):
    ref = built["toy-npz"]
    m = json.loads(Path(ref.path).with_suffix(".json").read_text())
    assert m == ref.manifest
