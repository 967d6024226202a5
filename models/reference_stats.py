"""Reference statistics (mean, covariance, raw KID features) of a real image set through an extractor.

The shipped file ``models/assets/cifar10-test-cifarnet.npz`` holds the CIFAR-10 **test** split
(10k images) through the shipped CifarNet. Other (dataset, extractor) pairs are computed with
:func:`compute_reference_stats` and cached on disk under a key that hashes the image bytes and
the extractor weights, so a cached file can never be paired with different data or weights.

``.npz`` layout (all plain arrays, loadable with ``allow_pickle=False``):

* ``<layer>/mu`` (float64 ``[D]``) and ``<layer>/sigma`` (float64 ``[D, D]``) for each Fréchet
  layer (``pool``/``spatial`` for cifarnet, ``2048``/``spatial`` for inception);
* ``<layer>/features``: the raw features of the KID layer; stored as **float16** in the shipped
  cifarnet file to keep it small (KID from float16-rounded features moves by far less than its
  subset standard deviation), float32 in computed caches;
* ``meta``: a JSON string: extractor, dataset, number of images, data sha256 (of the uint8 array
  and, when known, of the source archive), extractor weights sha256, features sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ASSET_DIR = Path(__file__).resolve().parent / "assets"
SHIPPED = {("cifarnet", "cifar10-test"): ASSET_DIR / "cifar10-test-cifarnet.npz"}

# Which feature layer feeds which metric, per extractor name (see harness/metrics.py).
LAYERS: dict[str, dict[str, str]] = {
    "cifarnet": {"fid": "pool", "kid": "pool", "isc": "logits", "sfid": "spatial"},
    "inception": {"fid": "2048", "kid": "2048", "isc": "logits_unbiased", "sfid": "spatial"},
    "clean-fid-inception": {"fid": "pool", "kid": "pool"},
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("DMQ_CACHE", Path.home() / ".cache" / "dmqbench")) / "refstats"


@dataclass
class RefStats:
    """Reference statistics of one image set through one extractor."""

    extractor: str
    dataset: str
    mu: dict[str, np.ndarray]
    sigma: dict[str, np.ndarray]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    path: str | None = None

    @property
    def num_images(self) -> int:
        return int(self.meta.get("num_images", 0))

    def stats(self, layer: str) -> dict[str, np.ndarray]:
        """``{"mu", "sigma"}`` (float64) of ``layer``, torch-fidelity's statistics format."""
        if layer not in self.mu:
            raise KeyError(f"reference {self.dataset}/{self.extractor} has no layer {layer!r} (has {sorted(self.mu)})")
        return {"mu": self.mu[layer], "sigma": self.sigma[layer]}

    def raw(self, layer: str) -> np.ndarray:
        """Raw float32 ``[N, D]`` features of ``layer`` (for KID)."""
        if layer not in self.features:
            raise KeyError(f"reference {self.dataset}/{self.extractor} stores no raw {layer!r} features")
        return self.features[layer].astype(np.float32)

    def save(self, path: str | Path, compress: bool = False) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for k in self.mu:
            arrays[f"{k}/mu"] = np.asarray(self.mu[k], dtype=np.float64)
            # A covariance is symmetric: its upper triangle is the whole of it, in half the bytes.
            sigma = np.asarray(self.sigma[k], dtype=np.float64)
            arrays[f"{k}/sigma_triu"] = sigma[np.triu_indices(sigma.shape[0])]
        for k, v in self.features.items():
            arrays[f"{k}/features"] = v
        meta = dict(self.meta, extractor=self.extractor, dataset=self.dataset)
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")  # per process: concurrent jobs share caches
        (np.savez_compressed if compress else np.savez)(tmp, **arrays)
        tmp.replace(path)
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RefStats:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            mu, sigma, feats = {}, {}, {}
            for key in z.files:
                if key == "meta":
                    continue
                layer, kind = key.rsplit("/", 1)
                if kind == "sigma_triu":
                    sigma[layer] = _from_triu(z[key])
                else:
                    {"mu": mu, "sigma": sigma, "features": feats}[kind][layer] = z[key]
        return cls(meta["extractor"], meta["dataset"], mu, sigma, feats, meta, str(path))


def _from_triu(triu: np.ndarray) -> np.ndarray:
    d = int((np.sqrt(8 * triu.size + 1) - 1) / 2)
    full = np.zeros((d, d), dtype=triu.dtype)
    full[np.triu_indices(d)] = triu
    return full + np.triu(full, 1).T


def sha256_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def images_sha256(images: np.ndarray) -> str:
    """Hash of a uint8 image array (shape + bytes)."""
    a = np.ascontiguousarray(images)
    return sha256_bytes(str(a.shape).encode(), str(a.dtype).encode(), a.tobytes())


def features_sha256(features: np.ndarray) -> str:
    a = np.ascontiguousarray(features)
    return sha256_bytes(str(a.shape).encode(), str(a.dtype).encode(), a.tobytes())


def _stats_from_features(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(f, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def compute_reference_stats(
    images_uint8,
    extractor: str = "cifarnet",
    *,
    dataset: str = "custom",
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    inception_weights: str | None = None,
    raw_dtype=np.float32,
    source: dict | None = None,
    use_cache: bool = True,
) -> RefStats:
    """Statistics of ``images_uint8`` (``[N,3,H,W]`` uint8 array or tensor) through ``extractor``.

    ``extractor`` is ``"cifarnet"``, ``"inception"`` (torch-fidelity InceptionV3 with the sFID tap;
    needs ``inception_weights`` or the torch hub cache file) or ``"clean-fid-inception"`` (clean-fid's
    TorchScript Inception pipeline). Results are cached in ``cache_dir`` (default
    ``$DMQ_CACHE/refstats`` or ``~/.cache/dmqbench/refstats``) as
    ``<dataset>-<extractor>-<hash>.npz`` where the hash covers the images and the extractor weights.
    """
    from harness import metrics as M  # lazy: the metric layer owns the extractors

    images = images_uint8.numpy() if hasattr(images_uint8, "numpy") else np.asarray(images_uint8)
    M.check_images(images, "reference images")
    if extractor not in LAYERS:
        raise ValueError(f"unknown extractor {extractor!r}; expected one of {sorted(LAYERS)}")
    data_sha = images_sha256(images)
    weights_sha = M.extractor_weights_sha256(extractor, inception_weights)
    key = sha256_bytes(data_sha.encode(), extractor.encode(), weights_sha.encode())[:16]
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cdir / f"{dataset}-{extractor}-{key}.npz"
    if use_cache and cached.is_file():
        return RefStats.load(cached)

    layers = LAYERS[extractor]
    fd_layers = sorted({layers[m] for m in ("fid", "sfid") if m in layers})
    feats = M.extract_features(
        images, extractor, fd_layers, device=device, batch_size=batch_size, inception_weights=inception_weights
    )
    mu, sigma = {}, {}
    for layer in fd_layers:
        mu[layer], sigma[layer] = _stats_from_features(feats[layer])
    kid_layer = layers["kid"]
    raw = {kid_layer: np.asarray(feats[kid_layer], dtype=np.float32).astype(raw_dtype)}
    meta = {
        "num_images": int(len(images)),
        "image_shape": list(images.shape[1:]),
        "data_sha256": data_sha,
        "source": source,
        "extractor_weights_sha256": weights_sha,
        "features_sha256": {k: features_sha256(v) for k, v in raw.items()},
        "raw_features_dtype": np.dtype(raw_dtype).name,
        "layers": layers,
    }
    ref = RefStats(extractor, dataset, mu, sigma, raw, meta)
    if use_cache:
        ref.save(cached)
    return ref


def reference_stats(
    extractor: str = "cifarnet", dataset: str = "cifar10-test", cache_dir: str | Path | None = None
) -> RefStats:
    """Load reference statistics: the shipped file for (cifarnet, cifar10-test), else a cached one.

    Raises ``FileNotFoundError`` (with the fix) when neither is available.
    """
    shipped = SHIPPED.get((extractor, dataset))
    if shipped is not None and shipped.is_file():
        ref = RefStats.load(shipped)
        _check_shipped_weights(ref)
        return ref
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    hits = sorted(cdir.glob(f"{dataset}-{extractor}-*.npz"), key=lambda p: p.stat().st_mtime) if cdir.is_dir() else []
    if hits:
        if len(hits) > 1:
            warnings.warn(
                f"{len(hits)} cached {dataset}/{extractor} reference files in {cdir}; using the newest {hits[-1].name}",
                stacklevel=2,
            )
        return RefStats.load(hits[-1])
    raise FileNotFoundError(
        f"no reference statistics for dataset {dataset!r} through {extractor!r}: not shipped and not cached in "
        f"{cdir}. Compute them once with models.reference_stats.compute_reference_stats(images, {extractor!r}, "
        f"dataset={dataset!r}) or pass the reference images to compute_metrics(reference=...)."
    )


def _check_shipped_weights(ref: RefStats) -> None:
    if ref.extractor != "cifarnet":
        return
    from models.cifarnet import DEFAULT_ASSET_DIR

    cfg = DEFAULT_ASSET_DIR / "config.json"
    if not cfg.is_file():
        return
    want = json.loads(cfg.read_text()).get("weights_sha256")
    have = ref.meta.get("extractor_weights_sha256")
    if want and have and want != have:
        warnings.warn(
            f"{ref.path} was computed with CifarNet weights {have[:12]} but the shipped weights are {want[:12]}; "
            "recompute it with `python -m models.reference_stats --data PATH`",
            stacklevel=3,
        )


def build_shipped_cifar10_test(data: str, cache_dir: str | None = None, device: str = "cpu") -> RefStats:
    """(Re)build ``models/assets/cifar10-test-cifarnet.npz`` from a CIFAR-10 source."""
    from models.cifar10 import load_cifar10

    x, _, src = load_cifar10(data, "test", cache_dir=cache_dir)
    ref = compute_reference_stats(
        x,
        "cifarnet",
        dataset="cifar10-test",
        device=device,
        raw_dtype=np.float16,
        source=src.to_dict(),
        use_cache=False,
    )
    ref.save(SHIPPED[("cifarnet", "cifar10-test")], compress=True)
    return ref


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description="rebuild the shipped CIFAR-10 test reference statistics")
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args()
    r = build_shipped_cifar10_test(a.data, a.cache_dir)
    print(r.path, {k: v.shape for k, v in r.mu.items()}, r.meta["extractor_weights_sha256"][:12])
