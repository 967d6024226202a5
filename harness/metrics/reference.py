"""Reference statistics: the store of named reference sets, and the statistics file format.

A reference set is named (``cifar10-test``, ``lsun-church-train``, ...) and has statistics per
extractor: the Fréchet layers' mean and covariance (``fid`` and ``sfid`` layers), a sample of the
KID layer's raw features, and a JSON manifest. The store is one directory,
:func:`default_cache_dir` (``$DMQBENCH_REFSTATS``, else ``$DMQ_CACHE/refstats``, else
``~/.cache/dmqbench/refstats``)::

    <store>/<name>/<extractor>-<weights sha256[:16]>.npz   built by `bench ref build`
    <store>/<name>/<extractor>-imported.npz                imported by `bench ref import`
    <store>/<name>/<extractor>-....json                    the manifest of each

so statistics are never paired with other extractor weights. The shipped file
``models/assets/cifar10-test-cifarnet.npz`` (CIFAR-10 test through the shipped CifarNet) answers
``(cifar10-test, cifarnet)`` without building anything.

``.npz`` layout (plain arrays, loaded with ``allow_pickle=False``):

* ``<layer>/mu`` (float64 ``[D]``) and ``<layer>/sigma_triu`` (float64, the upper triangle of the
  symmetric ``[D, D]`` covariance) for each Fréchet layer;
* ``<layer>/features``: raw features of the KID layer (float16 in the shipped cifarnet file,
  float32 elsewhere); absent from imported statistics;
* ``meta``: a JSON string (extractor, dataset, number of images, source and weights hashes, ...).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import models
from harness.metrics.errors import MetricSetupError
from harness.metrics.extractors import (
    CLEANFID_TORCHSCRIPT,
    INCEPTION_SHA256,
    LAYERS,
    SFID_CHANNELS,
    SFID_HW,
    extractor_weights_sha256,
    file_sha256,
    hub_inception_path,
)
from models.atomic import atomic_path, write_text_atomic

ASSET_DIR = Path(models.__file__).resolve().parent / "assets"
SHIPPED = {("cifarnet", "cifar10-test"): ASSET_DIR / "cifar10-test-cifarnet.npz"}
STORE_ENV = "DMQBENCH_REFSTATS"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
REF_EXTRACTORS = ("cifarnet", "inception", "clean-fid-inception")
__all__ = ["LAYERS", "RefStats", "Reference", "resolve_reference", "check_reference", "reference_stats"]


def default_cache_dir() -> Path:
    """The statistics store: ``$DMQBENCH_REFSTATS``, ``$DMQ_CACHE/refstats`` or ``~/.cache/dmqbench/refstats``."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser()
    return Path(os.environ.get("DMQ_CACHE", Path.home() / ".cache" / "dmqbench")).expanduser() / "refstats"


def _store(cache_dir) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


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

    def has_raw(self, layer: str) -> bool:
        return layer in self.features

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
        with atomic_path(path) as tmp:  # per process: concurrent jobs share caches
            (np.savez_compressed if compress else np.savez)(tmp, **arrays)
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RefStats:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise MetricSetupError(
                    f"{path} is not a dmqbench statistics file (no 'meta'); import ADM or clean-fid statistics "
                    f"with `bench ref import NAME --npz {path}`"
                )
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


# --------------------------------------------------------------------------- statistics of an image array
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
    :func:`default_cache_dir`) as ``<dataset>-<extractor>-<hash>.npz`` where the hash covers the
    images and the extractor weights.
    """
    from harness.metrics.extractors import extract_features
    from harness.metrics.images import check_images

    images = images_uint8.numpy() if hasattr(images_uint8, "numpy") else np.asarray(images_uint8)
    check_images(images, "reference images")
    if extractor not in LAYERS:
        raise ValueError(f"unknown extractor {extractor!r}; expected one of {sorted(LAYERS)}")
    data_sha = images_sha256(images)
    weights_sha = extractor_weights_sha256(extractor, inception_weights)
    key = sha256_bytes(data_sha.encode(), extractor.encode(), weights_sha.encode())[:16]
    cached = _store(cache_dir) / f"{dataset}-{extractor}-{key}.npz"
    if use_cache and cached.is_file():
        return RefStats.load(cached)

    layers = LAYERS[extractor]
    fd_layers = sorted({layers[m] for m in ("fid", "sfid") if m in layers})
    feats = extract_features(
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


# --------------------------------------------------------------------------- the named store
def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise MetricSetupError(f"reference name {name!r}: use letters, digits, '.', '_' and '-' (e.g. cifar10-train)")
    return name


def _weights_key(extractor: str, inception_weights: str | None) -> str | None:
    """The weights sha256 a built entry of ``extractor`` is keyed by, or ``None`` when it cannot be known."""
    if extractor == "inception":
        if inception_weights is None and not hub_inception_path().is_file():
            return None
        return extractor_weights_sha256("inception", inception_weights)
    if extractor == "clean-fid-inception":
        return file_sha256(CLEANFID_TORCHSCRIPT) if CLEANFID_TORCHSCRIPT.is_file() else None
    return extractor_weights_sha256(extractor)


def entry_path(name: str, extractor: str, weights_sha256: str | None, cache_dir=None) -> Path:
    """``<store>/<name>/<extractor>-<sha[:16]>.npz`` (``-imported`` when ``weights_sha256`` is ``None``)."""
    tag = weights_sha256[:16] if weights_sha256 else "imported"
    return _store(cache_dir) / check_name(name) / f"{extractor}-{tag}.npz"


def write_entry(ref: RefStats, path: Path, manifest: dict) -> dict:
    """Save ``ref`` at ``path`` and its manifest (``manifest`` + stats sha256, date) beside it."""
    ref.save(path)
    full = dict(manifest)
    full.update(
        name=ref.dataset,
        extractor=ref.extractor,
        stats_file=path.name,
        stats_sha256=file_sha256(path),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        layers={k: list(np.shape(v)) for k, v in ref.mu.items()},
        kid_features=int(len(next(iter(ref.features.values())))) if ref.features else 0,
    )
    write_text_atomic(path.with_suffix(".json"), json.dumps(full, indent=1, sort_keys=True) + "\n")
    return full


def list_entries(cache_dir=None) -> list[dict]:
    """The manifests of every stored entry (plus the shipped file), sorted by name and extractor."""
    out = []
    for (extractor, name), p in SHIPPED.items():
        if p.is_file():
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
            out.append({"name": name, "extractor": extractor, "provenance": "shipped", "path": str(p),
                        "num_images": meta.get("num_images"), "resolution": 32,
                        "extractor_weights_sha256": meta.get("extractor_weights_sha256"),
                        "source": meta.get("source")})
    root = _store(cache_dir)
    if root.is_dir():
        for j in sorted(root.glob("*/*.json")):
            try:
                m = json.loads(j.read_text())
            except (OSError, ValueError):
                continue
            m["path"] = str(j.with_suffix(".npz"))
            out.append(m)
    return sorted(out, key=lambda m: (m.get("name", ""), m.get("extractor", ""), m.get("created", "")))


@dataclass
class Reference:
    """A resolved reference: its ``name``, ``extractor``, statistics file ``path`` and ``sha256``, ``manifest``.

    ``stats`` (a :class:`RefStats`) is read on first use, so :func:`check_reference` stays fast.
    """

    name: str
    extractor: str
    path: str
    sha256: str
    manifest: dict = field(default_factory=dict)
    _stats: RefStats | None = field(default=None, repr=False)

    @property
    def stats(self) -> RefStats:
        if self._stats is None:
            self._stats = RefStats.load(self.path)
            if self.path in {str(p) for p in SHIPPED.values()}:
                _check_shipped_weights(self._stats)
        return self._stats

    @property
    def provenance(self) -> str:
        return self.manifest.get("provenance", "built")

    def describe(self) -> dict:
        """What a run records about its reference."""
        return {"name": self.name, "extractor": self.extractor, "sha256": self.sha256, "path": self.path,
                "provenance": self.provenance, "num_images": self.manifest.get("num_images")}


def _fix_command(name: str, extractor: str) -> str:
    if extractor == "cifarnet":
        return f"`bench ref build {name} --images DIR --extractor cifarnet`"
    if extractor == "clean-fid-inception":
        return f"`bench ref build {name} --images DIR --inception-weights W` with {CLEANFID_TORCHSCRIPT} present"
    return f"`bench ref build {name} --images DIR --inception-weights W` (or `bench ref import {name} --npz FILE`)"


def resolve_reference(
    name_or_path, extractor: str, inception_weights: str | None = None, cache_dir=None
) -> Reference:
    """The reference statistics ``name_or_path`` for ``extractor``; a one-line :class:`MetricSetupError` if none.

    ``name_or_path``: a stored statistics ``.npz`` file (its manifest, if any, beside it), or a name
    looked up as: the shipped file for ``(cifar10-test, cifarnet)``; the store entry built with the
    same extractor weights (``inception_weights``, else torch-fidelity's hub cache file); an
    imported entry (ADM statistics for ``inception``, clean-fid's for ``clean-fid-inception``); a
    legacy cache file ``<store>/<name>-<extractor>-*.npz`` (the newest).
    """
    if extractor not in REF_EXTRACTORS:
        raise MetricSetupError(f"unknown extractor {extractor!r}; expected one of {list(REF_EXTRACTORS)}")
    s = os.fspath(name_or_path)
    if s.endswith(".npz") or os.sep in s:
        p = Path(s).expanduser()
        if not p.is_file():
            raise MetricSetupError(
                f"reference statistics file not found: {p}; build one with {_fix_command('NAME', extractor)}"
            )
        mpath = p.with_suffix(".json")
        manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
        with np.load(p, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise MetricSetupError(
                    f"{p} is not a dmqbench statistics file; import it with `bench ref import NAME --npz {p}`"
                )
            meta = json.loads(str(z["meta"]))
        if meta.get("extractor") != extractor:
            raise MetricSetupError(f"{p} holds {meta.get('extractor')!r} statistics, not {extractor!r}")
        return Reference(meta.get("dataset", p.stem), extractor, str(p), manifest.get("stats_sha256") or file_sha256(p),
                         manifest or {"provenance": "file", "num_images": meta.get("num_images")})
    name = check_name(s)
    shipped = SHIPPED.get((extractor, name))
    if shipped is not None and shipped.is_file():
        return Reference(name, extractor, str(shipped), file_sha256(shipped),
                         {"provenance": "shipped", "num_images": 10000})
    root = _store(cache_dir)
    wsha = _weights_key(extractor, inception_weights)
    candidates = ([entry_path(name, extractor, wsha, cache_dir)] if wsha else []) + [
        entry_path(name, extractor, None, cache_dir)
    ]
    if extractor == "cifarnet":
        candidates = candidates[:1]  # nothing imports CifarNet statistics
    for p in candidates:
        if p.is_file():
            mpath = p.with_suffix(".json")
            manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
            if manifest.get("provenance", "").startswith("imported") and extractor == "inception" and wsha:
                if wsha != INCEPTION_SHA256:
                    warnings.warn(
                        f"reference {name!r} holds statistics of the TF Inception graph (imported); the Inception "
                        f"weights in use (sha256 {wsha[:12]}) are not the published port, so */inception values "
                        "against it mean nothing",
                        stacklevel=2,
                    )
            return Reference(name, extractor, str(p), manifest.get("stats_sha256") or file_sha256(p), manifest)
    hits = sorted(root.glob(f"{name}-{extractor}-*.npz"), key=lambda q: q.stat().st_mtime) if root.is_dir() else []
    if hits:
        return Reference(name, extractor, str(hits[-1]), file_sha256(hits[-1]), {"provenance": "legacy-cache"})
    weights = f" (extractor weights sha256 {wsha[:12]})" if wsha else ""
    if extractor == "inception" and wsha is None:
        weights = " (and no Inception weights to match built statistics: pass --inception-weights W)"
    raise MetricSetupError(
        f"no reference statistics {name!r} for extractor {extractor!r}{weights} in {root}: "
        f"build them with {_fix_command(name, extractor)}"
    )


def check_reference(name_or_path, extractor: str, inception_weights: str | None = None, cache_dir=None) -> Reference:
    """Plan-time check: :func:`resolve_reference` without reading the statistics (a one-line error if missing)."""
    return resolve_reference(name_or_path, extractor, inception_weights, cache_dir)


def reference_stats(
    extractor: str = "cifarnet", dataset: str = "cifar10-test", cache_dir: str | Path | None = None,
    inception_weights: str | None = None,
) -> RefStats:
    """The :class:`RefStats` of reference ``dataset`` for ``extractor`` (see :func:`resolve_reference`).

    Raises ``FileNotFoundError`` (a :class:`MetricSetupError` message, with the fix) when there are none.
    """
    try:
        return resolve_reference(dataset, extractor, inception_weights, cache_dir).stats
    except MetricSetupError as e:
        raise FileNotFoundError(str(e)) from None


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
            "recompute it with `python -m harness.metrics.reference --data PATH`",
            stacklevel=3,
        )


# --------------------------------------------------------------------------- import (ADM, clean-fid)
def adm_spatial_permutation(channels: int = SFID_CHANNELS, hw: int = SFID_HW) -> np.ndarray:
    """Index map from ADM's spatial feature order to ours: ``ours = adm[perm]``.

    ADM flattens the ``[17, 17, 7]`` NHWC map (index ``(h*17 + w)*7 + c``); the ``spatial`` layer
    here flattens ``[7, 17, 17]`` (index ``c*289 + h*17 + w``). The Fréchet distance is invariant
    only to a permutation applied to *both* sides, so imported statistics are reordered.
    """
    c, h, w = np.meshgrid(np.arange(channels), np.arange(hw), np.arange(hw), indexing="ij")
    return ((h * hw + w) * channels + c).reshape(-1)


def import_stats(name: str, npz: str | Path, fmt: str = "auto", cache_dir=None) -> tuple[Path, dict]:
    """Store precomputed statistics: an ADM reference batch (``mu``, ``sigma``, ``mu_s``, ``sigma_s``) as
    ``inception`` statistics, or clean-fid's (``mu``, ``sigma``) as ``clean-fid-inception`` ones."""
    check_name(name)
    p = Path(npz).expanduser()
    if not p.is_file():
        raise MetricSetupError(f"--npz {p}: no such file")
    try:
        z = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise MetricSetupError(f"--npz {p}: not a readable .npz of plain arrays ({type(e).__name__}: {e})") from None
    with z:
        keys = set(z.files)
        if fmt == "auto":
            fmt = "adm" if {"mu_s", "sigma_s"} <= keys else "clean-fid"
        need = {"adm": {"mu", "sigma", "mu_s", "sigma_s"}, "clean-fid": {"mu", "sigma"}}.get(fmt)
        if need is None:
            raise MetricSetupError(f"--format must be adm, clean-fid or auto, got {fmt!r}")
        if not need <= keys:
            raise MetricSetupError(f"{p}: {fmt} statistics need arrays {sorted(need)}; the file has {sorted(keys)}")
        arr = {k: np.asarray(z[k], np.float64) for k in need}
        n_images = int(z["arr_0"].shape[0]) if "arr_0" in keys else None
    d = arr["mu"].shape
    if arr["mu"].ndim != 1 or arr["sigma"].shape != d * 2:
        raise MetricSetupError(f"{p}: mu {arr['mu'].shape} and sigma {arr['sigma'].shape} are not [D] and [D, D]")
    if fmt == "adm":
        perm = adm_spatial_permutation()
        if arr["mu"].shape != (2048,) or arr["mu_s"].shape != perm.shape or arr["sigma_s"].shape != perm.shape * 2:
            raise MetricSetupError(
                f"{p}: ADM statistics must be 2048-d pool and {perm.size}-d spatial; got {arr['mu'].shape}, "
                f"{arr['mu_s'].shape}"
            )
        mu = {"2048": arr["mu"], "spatial": arr["mu_s"][perm]}
        sigma = {"2048": arr["sigma"], "spatial": arr["sigma_s"][np.ix_(perm, perm)]}
        extractor, network = "inception", "TF Inception graph 2015-12-05 (pool_3, mixed_6/conv first 7 channels)"
    else:
        mu, sigma = {"pool": arr["mu"]}, {"pool": arr["sigma"]}
        extractor, network = "clean-fid-inception", "clean-fid TorchScript Inception 2015-12-05 (pool)"
    source = {"kind": f"{fmt}-stats-npz", "path": str(p.resolve()), "sha256": file_sha256(p)}
    meta = {"num_images": n_images, "source": source, "layers": LAYERS[extractor], "extractor_weights_sha256": None}
    ref = RefStats(extractor, name, mu, sigma, {}, meta)
    out = entry_path(name, extractor, None, cache_dir)
    manifest = write_entry(ref, out, {
        "provenance": f"imported:{fmt}",
        "network": network,
        "num_images": n_images,
        "source": source,
        "extractor_weights_sha256": None,
        "resolution": None,
        "preprocessing": "as computed by the file's producer",
        "notes": "no raw features: KID cannot be computed against this entry"
        + ("; spatial statistics reordered from NHWC to channel-major" if fmt == "adm" else ""),
    })
    return out, manifest


# --------------------------------------------------------------------------- build
def build_reference(
    name: str,
    images: str | Path,
    extractor: str = "inception",
    inception_weights: str | None = None,
    *,
    resolution: int | None = None,
    split: str | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    kid_features: int = 10000,
    cache_dir=None,
    echo=None,
) -> list[tuple[Path, dict]]:
    """Compute and store the statistics of reference set ``name`` from the images at ``images``.

    Streams the images in chunks (Fréchet statistics by :class:`RunningStatistics`), keeps the KID
    layer's features of ``min(N, kid_features)`` images chosen with a fixed seed (0), and for
    ``extractor="inception"`` also builds ``clean-fid-inception`` statistics when clean-fid's
    TorchScript file is present. Returns ``[(npz path, manifest)]``.
    """
    from harness.metrics.extractors import (
        ALL_LAYERS,
        check_extractor,
        cleanfid_features,
        cleanfid_inception,
        extract_features,
        inception_weights_info,
        resolve_inception_weights,
    )
    from harness.metrics.frechet import RunningStatistics
    from harness.metrics.sources import open_source

    check_name(name)
    if split is None:
        split = "test" if name.endswith("test") else "train"
    src = open_source(images, resolution, split)
    check_extractor(extractor, inception_weights, src.resolution)
    weights = resolve_inception_weights(inception_weights) if extractor == "inception" else None
    nets = [extractor]
    if extractor == "inception" and CLEANFID_TORCHSCRIPT.is_file():
        nets.append("clean-fid-inception")
    lay = {net: LAYERS[net] for net in nets}
    fd = {net: sorted({lay[net][m] for m in ("fid", "sfid") if m in lay[net]}) for net in nets}
    run = {net: {layer: RunningStatistics() for layer in fd[net]} for net in nets}
    kid_rows: dict[str, list] = {net: [] for net in nets}
    keep = np.zeros(src.count, bool)
    keep[np.random.default_rng(0).choice(src.count, min(src.count, kid_features), replace=False)] = True
    seen = 0
    cfid_model = cleanfid_inception(device) if "clean-fid-inception" in nets else None
    for chunk in src.chunks(batch_size * 4):
        sel = keep[seen : seen + len(chunk)]
        for net in nets:
            if net == "clean-fid-inception":
                f = {"pool": cleanfid_features(chunk, cfid_model, device, batch_size, resize=True)}
            else:
                wanted = sorted(set(fd[net]) | {lay[net]["kid"]})
                assert set(wanted) <= set(ALL_LAYERS[net])
                f = extract_features(chunk, net, wanted, device, batch_size, weights)
            for layer in fd[net]:
                run[net][layer].update(f[layer])
            kid_rows[net].append(np.asarray(f[lay[net]["kid"]], np.float32)[sel])
        seen += len(chunk)
        if echo:
            echo(f"  {seen}/{src.count} images")
    if seen != src.count:
        raise MetricSetupError(f"{images}: read {seen} images, listed {src.count}")
    source = src.describe()
    out = []
    for net in nets:
        wsha = extractor_weights_sha256(net, weights)
        mu, sigma = {}, {}
        for layer in fd[net]:
            st = run[net][layer].statistics()
            mu[layer], sigma[layer] = st["mu"], st["sigma"]
        raw = {lay[net]["kid"]: np.concatenate(kid_rows[net])}
        meta = {
            "num_images": src.count,
            "image_shape": [3, src.resolution, src.resolution],
            "source": source,
            "extractor_weights_sha256": wsha,
            "features_sha256": {k: features_sha256(v) for k, v in raw.items()},
            "raw_features_dtype": "float32",
            "layers": lay[net],
        }
        ref = RefStats(net, name, mu, sigma, raw, meta)
        manifest = {
            "provenance": "built",
            "num_images": src.count,
            "source": source,
            "resolution": src.resolution,
            "preprocessing": src.preprocessing,
            "extractor_weights_sha256": wsha,
            "kid_seed": 0,
        }
        if net == "inception":
            info = inception_weights_info(weights)
            manifest["extractor_weights_path"] = info["path"]
            manifest["extractor_weights_published"] = info["matches_published"]
        path = entry_path(name, net, wsha, cache_dir)
        out.append((path, write_entry(ref, path, manifest)))
    return out


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
