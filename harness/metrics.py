"""Sample-quality metrics: FID / IS / KID / sFID / clean-FID, keyed by the network that computed them.

Every key is ``<metric>/<network>``: ``fid/cifarnet`` is a Fréchet distance in CifarNet's feature
space and is *not* comparable with a published (Inception) FID. Inception metrics are produced
only when an Inception weights file is available (``inception_weights=`` or torch-fidelity's hub
cache file); ``clean_fid/inception`` additionally needs clean-fid's TorchScript file in ``/tmp``.

:func:`compute_metrics` is two steps: :func:`sample_features` (every feature array the metrics need,
one row per image) then :func:`metrics_from_features`; torchrun ranks run the first step on their
own shards and rank 0 the second on the gathered features (:mod:`harness.distributed`).

* FID, IS, KID: torch-fidelity's own metric functions (``fid_statistics_to_metric``,
  ``isc_features_to_metric``, ``kid_features_to_metric``) on features extracted by the extractor
  registered with torch-fidelity (``"cifarnet"``, ``"inception-v3-sfid"``) through torch-fidelity's
  ``get_featuresdict_from_dataset``. The reference side is precomputed statistics
  (:mod:`models.reference_stats`), which ``calculate_metrics`` cannot take as an input.
* sFID: :func:`frechet_distance` (scipy ``sqrtm``; its exact low-rank form
  :func:`frechet_distance_to_features` when samples < dims) of the ``spatial`` features: CifarNet's group-2
  map, or Inception's ``Mixed_6d.branch1x1`` first 7 channels at 17x17 (2023 dims, as in ADM).
* clean-FID: clean-fid's own pipeline (PNG files -> ``get_folder_features`` with a custom feature
  extractor and no resize -> ``cleanfid.fid.frechet_distance``).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILENAME
CLEANFID_TORCHSCRIPT = Path("/tmp") / "inception-2015-12-05.pt"
SFID_CHANNELS = 7  # ADM: first 7 channels of mixed_6/conv (Mixed_6d.branch1x1), 17x17 -> 2023 dims
TF_CIFARNET = "cifarnet"
TF_INCEPTION = "inception-v3-sfid"

_EXTRACTOR_CACHE: dict[tuple, torch.nn.Module] = {}


# --------------------------------------------------------------------------- Fréchet distance
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
    f = features.double().cpu().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    n, d = f.shape
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
    f = features.double().cpu().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
    return {"mu": f.mean(axis=0), "sigma": np.cov(f, rowvar=False)}


# --------------------------------------------------------------------------- paired metrics
def paired_metrics(samples_q: np.ndarray, samples_fp: np.ndarray) -> dict[str, float]:
    """Pixel agreement of quantised vs full-precision samples from the same noise.

    ``paired/mse``: mean over all pixels and channels of ``(q/255 − fp/255)²``;
    ``paired/psnr``: ``10·log10(1 / mse)`` dB (peak 1.0; ``inf`` when identical).
    """
    q, fp = _as_numpy(samples_q), _as_numpy(samples_fp)
    check_images(q, "samples_q", square32=False)
    check_images(fp, "samples_fp", square32=False)
    if q.shape != fp.shape:
        raise ValueError(f"paired_metrics: shapes differ {q.shape} vs {fp.shape}")
    d = q.astype(np.float64) / 255.0 - fp.astype(np.float64) / 255.0
    mse = float(np.mean(d * d))
    psnr = math.inf if mse == 0.0 else float(10.0 * math.log10(1.0 / mse))
    return {"paired/mse": mse, "paired/psnr": psnr}


# --------------------------------------------------------------------------- input checks
def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def check_images(x: np.ndarray, what: str = "samples", square32: bool = False, min_images: int = 2) -> None:
    """Raise ``ValueError`` unless ``x`` is uint8 ``[N,3,H,W]`` (32x32 if ``square32``) with ``N >= min_images``."""
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what} must be a uint8 array [N,3,H,W]; got {x.dtype} {tuple(x.shape)}")
    if square32 and tuple(x.shape[2:]) != (32, 32):
        raise ValueError(f"{what}: CifarNet takes 32x32 images; got {tuple(x.shape[2:])}")
    if len(x) < min_images:
        raise ValueError(f"{what}: need at least {min_images} images, got {len(x)}")


# --------------------------------------------------------------------------- torch-fidelity extractors
def _tf():
    import torch_fidelity  # noqa: F401  (imports torchvision; keep it lazy)

    _register()
    return torch_fidelity


def _register() -> None:
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if TF_CIFARNET in FEATURE_EXTRACTORS_REGISTRY and TF_INCEPTION in FEATURE_EXTRACTORS_REGISTRY:
        return

    class CifarNetFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity wrapper of :class:`models.cifarnet.CifarNet` (uint8 32x32 in)."""

        def __init__(self, name, features_list, cifarnet_path=None, **kwargs):
            super().__init__(name, features_list)
            from models.cifarnet import load_cifarnet

            self.net = load_cifarnet(cifarnet_path)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return "pool", "logits", "spatial"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros((1, 3, 32, 32), dtype=torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
                raise ValueError(f"cifarnet extractor expects uint8 Bx3x32x32, got {getattr(x, 'shape', x)}")
            feats = self.net.features(x)
            return tuple(feats[k].float() for k in self.features_list)

    class InceptionV3SFID(FeatureExtractorInceptionV3):
        """torch-fidelity's InceptionV3 plus ``spatial``: Mixed_6d.branch1x1, first 7 channels, 17x17 (2023-d)."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list, **kwargs)
            self._tap = None
            self.Mixed_6d.branch1x1.register_forward_hook(self._hook)

        def _hook(self, module, inputs, output):
            self._tap = output[:, :SFID_CHANNELS].flatten(1).to(torch.float32)

        @staticmethod
        def get_provided_features_list():
            return (*FeatureExtractorInceptionV3.get_provided_features_list(), "spatial")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(metric)

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):
            requested = list(self.features_list)
            inner = [f for f in requested if f != "spatial"] or ["768"]  # "768" runs past Mixed_6d
            saved = self.features_list
            self.features_list = inner
            try:
                out = dict(zip(inner, super().forward(x)))
            finally:
                self.features_list = saved
            out["spatial"] = self._tap
            self._tap = None
            return tuple(out[f] for f in requested)

    for name, cls in ((TF_CIFARNET, CifarNetFeatureExtractor), (TF_INCEPTION, InceptionV3SFID)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(name, cls)


def _tf_name(extractor: str) -> str:
    return {"cifarnet": TF_CIFARNET, "inception": TF_INCEPTION}[extractor]


# Every layer an extractor provides to the metric layer; one cached instance computes them all.
ALL_LAYERS = {"cifarnet": ("pool", "logits", "spatial"), "inception": ("2048", "logits_unbiased", "spatial")}


def get_extractor(extractor: str, device: str = "cpu", inception_weights: str | None = None):
    """The registered torch-fidelity extractor instance for ``extractor`` (cached per weights/device)."""
    tf = _tf()
    from torch_fidelity.utils import create_feature_extractor

    layers = ALL_LAYERS[extractor]
    weights = str(inception_weights) if extractor == "inception" else None
    key = (extractor, layers, weights, str(device))
    if key not in _EXTRACTOR_CACHE:
        kwargs = {"verbose": False, "feature_extractor_compile": False}
        if extractor == "inception":
            kwargs["feature_extractor_weights_path"] = weights
        fe = create_feature_extractor(_tf_name(extractor), list(layers), cuda=False, **kwargs)
        _EXTRACTOR_CACHE[key] = fe.to(device)
    del tf
    return _EXTRACTOR_CACHE[key]


class _UInt8Images(torch.utils.data.Dataset):
    """Dataset yielding uint8 CHW tensors, torch-fidelity's input contract."""

    def __init__(self, images: np.ndarray):
        self.x = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def extract_features(
    images: np.ndarray,
    extractor: str,
    layers,
    device: str = "cpu",
    batch_size: int = 256,
    inception_weights: str | None = None,
) -> dict[str, np.ndarray]:
    """Features ``{layer: float32 [N, D]}`` of uint8 ``images`` through torch-fidelity's machinery."""
    if extractor == "clean-fid-inception":
        return {"pool": _cleanfid_features(images, _cleanfid_inception(device), device, batch_size, resize=True)}
    from torch_fidelity.utils import get_featuresdict_from_dataset

    unknown = set(layers) - set(ALL_LAYERS[extractor])
    if unknown:
        raise ValueError(f"extractor {extractor!r} has no layers {sorted(unknown)}; it has {ALL_LAYERS[extractor]}")
    fe = get_extractor(extractor, device, _resolve_inception(inception_weights) if extractor == "inception" else None)
    cuda = str(device).startswith("cuda")
    with torch.no_grad():
        feats = get_featuresdict_from_dataset(
            _UInt8Images(images), fe, batch_size, cuda=cuda, save_cpu_ram=True, verbose=False
        )
    return {k: feats[k].float().cpu().numpy() for k in layers}


def extractor_weights_sha256(extractor: str, inception_weights: str | None = None) -> str:
    if extractor == "cifarnet":
        from models.cifarnet import DEFAULT_ASSET_DIR

        return _file_sha256(DEFAULT_ASSET_DIR / "model.safetensors")
    if extractor == "inception":
        return _file_sha256(_resolve_inception(inception_weights))
    if extractor == "clean-fid-inception":
        return _file_sha256(CLEANFID_TORCHSCRIPT)
    raise ValueError(f"unknown extractor {extractor!r}")


_SHA_CACHE: dict[tuple, str] = {}


def _file_sha256(path) -> str:
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


# --------------------------------------------------------------------------- Inception weights
def hub_inception_path() -> Path:
    """Where torch-fidelity looks for (and downloads) its Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def validate_inception_weights(path: str | os.PathLike) -> Path:
    """Check that ``path`` loads into torch-fidelity's InceptionV3; raise a one-line ``ValueError`` if not.

    Loads the file with torch-fidelity's own loader (the instance is cached for the metric run).
    """
    p = Path(path).expanduser()
    fix = f"download {INCEPTION_FILENAME} from {INCEPTION_URL}, or drop the option to report only */cifarnet metrics"
    if not p.is_file():
        raise ValueError(f"Inception weights file not found: {p}; {fix}")
    try:
        get_extractor("inception", "cpu", str(p))
    except Exception as e:  # noqa: BLE001 - any load failure becomes one clean message
        msg = " ".join(str(e).split())[:200]
        raise ValueError(f"Inception weights {p} could not be loaded ({type(e).__name__}: {msg}); {fix}") from e
    return p


def _resolve_inception(inception_weights: str | None) -> str:
    if inception_weights is not None:
        return str(validate_inception_weights(inception_weights))
    hub = hub_inception_path()
    if hub.is_file():
        return str(validate_inception_weights(hub))
    raise ValueError(f"no Inception weights: pass inception_weights= or place {INCEPTION_FILENAME} at {hub}")


def random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised torch-fidelity InceptionV3 state dict to ``path`` (for tests/dry runs).

    The numbers it gives mean nothing; it exercises the real weight-loading and feature code.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Blank(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    empty = p.with_name(p.name + ".empty")
    torch.save({}, empty)
    torch.manual_seed(seed)
    try:
        blank = _Blank("blank", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        empty.unlink()
    # He-normal convs (PyTorch's default init shrinks activations to ~1e-8 over Inception's depth,
    # which would make every feature degenerate); BN keeps identity running statistics.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in blank.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight.shape[1]))
    torch.save(blank.state_dict(), p)
    return p


# --------------------------------------------------------------------------- clean-fid
def _cleanfid_features(images: np.ndarray, model_fn, device: str, batch_size: int, resize: bool) -> np.ndarray:
    """Run clean-fid's own folder pipeline on lossless PNGs with ``model_fn``.

    ``resize=False`` replaces clean-fid's 299x299 resize by the identity (small-input extractors).
    """
    from cleanfid import fid as cfid
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="dmq-cleanfid-") as d:
        for i, im in enumerate(images):
            Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))).save(os.path.join(d, f"{i:06d}.png"))
        feats = cfid.get_folder_features(
            d,
            model=model_fn,
            num_workers=0,
            batch_size=batch_size,
            device=torch.device(device),
            mode="clean",
            custom_fn_resize=None if resize else (lambda x: x),
            verbose=False,
        )
    return np.asarray(feats, dtype=np.float32)


def _cifarnet_cleanfid_fn(device: str):
    fe = get_extractor("cifarnet", device)

    def fn(x: torch.Tensor) -> torch.Tensor:  # float [0,255] Bx3x32x32 from clean-fid
        return fe.net.features(x.round().clamp(0, 255).to(torch.uint8))["pool"]

    return fn


def _cleanfid_inception(device: str):
    if not CLEANFID_TORCHSCRIPT.is_file():
        raise FileNotFoundError(f"clean-fid TorchScript Inception not found at {CLEANFID_TORCHSCRIPT}")
    from cleanfid.features import build_feature_extractor

    return build_feature_extractor("clean", device=torch.device(device), use_dataparallel=False)


# --------------------------------------------------------------------------- references
def _resolve_reference(reference, extractor: str, device: str, batch_size: int, inception_weights, cache_dir):
    from models import reference_stats as R

    if reference is None:
        return R.reference_stats(extractor, "cifar10-test", cache_dir=cache_dir)
    if isinstance(reference, R.RefStats):
        if reference.extractor == extractor:
            return reference
        return R.reference_stats(extractor, reference.dataset, cache_dir=cache_dir)
    if isinstance(reference, dict):
        if extractor not in reference:
            raise ValueError(f"reference dict has no entry for extractor {extractor!r} (has {sorted(reference)})")
        return _resolve_reference(reference[extractor], extractor, device, batch_size, inception_weights, cache_dir)
    images = _as_numpy(reference)
    return R.compute_reference_stats(
        images,
        extractor,
        dataset="custom",
        cache_dir=cache_dir,
        device=device,
        batch_size=batch_size,
        inception_weights=inception_weights,
    )


def _kid(f_samples: np.ndarray, f_ref: np.ndarray, kid_subsets: int) -> tuple[float, float]:
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


def _fid_tf(stats_a: dict, stats_b: dict) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {k: np.asarray(v, np.float64) for k, v in stats_a.items()}
    b = {k: np.asarray(v, np.float64) for k, v in stats_b.items()}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def _is_tf(logits: np.ndarray) -> float:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    splits = max(1, min(10, len(logits) // 2))
    return float(
        isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True, rng_seed=2020)[
            KEY_METRIC_ISC_MEAN
        ]
    )


# Feature arrays :func:`sample_features` returns, keyed ``<network>/<layer>``.
CIFARNET_FEATURES = tuple(f"cifarnet/{layer}" for layer in ALL_LAYERS["cifarnet"])
INCEPTION_FEATURES = tuple(f"inception/{layer}" for layer in ALL_LAYERS["inception"])
CLEANFID_CIFARNET = "cifarnet/clean_fid"  # CifarNet ``pool`` through clean-fid's PNG pipeline (no resize)
CLEANFID_INCEPTION = "clean-fid-inception/pool"  # clean-fid's TorchScript Inception pipeline
FEATURE_KEYS = (*CIFARNET_FEATURES, CLEANFID_CIFARNET, *INCEPTION_FEATURES, CLEANFID_INCEPTION)


def _network_metrics(features: dict, net: str, ref, kid_subsets: int) -> dict:
    """FID, IS, sFID, KID (+ std) of ``net``'s features against ``ref`` (layers: ``LAYERS[net]``)."""
    from models.reference_stats import LAYERS

    lay = LAYERS[net]
    f = {layer: features[f"{net}/{layer}"] for layer in ALL_LAYERS[net]}
    out = {
        f"fid/{net}": _fid_tf(feature_statistics(f[lay["fid"]]), ref.stats(lay["fid"])),
        f"is/{net}": _is_tf(f[lay["isc"]]),
        f"sfid/{net}": frechet_distance_to_features(f[lay["sfid"]], **_ref_pair(ref.stats(lay["sfid"]))),
    }
    kid_m, kid_s = _kid(f[lay["kid"]], ref.raw(lay["kid"]), kid_subsets)
    out[f"kid/{net}"], out[f"kid_std/{net}"] = kid_m, kid_s
    return out


def _clean_fid(features: np.ndarray, ref) -> float:
    """``cleanfid.fid.frechet_distance`` of the features' Gaussian fit vs the reference ``pool`` statistics."""
    from cleanfid.fid import frechet_distance as cfid_frechet

    st, pool = feature_statistics(features), ref.stats("pool")
    return float(cfid_frechet(st["mu"], st["sigma"], pool["mu"], pool["sigma"]))


def _ref_pair(b: dict) -> dict:
    return {"mu2": b["mu"], "sigma2": b["sigma"]}


def _inception_weights(inception_weights: str | None) -> str | None:
    """Validated Inception weights: the given file, else torch-fidelity's hub cache file, else ``None``."""
    if inception_weights is not None:
        return str(validate_inception_weights(inception_weights))
    if hub_inception_path().is_file():
        return str(validate_inception_weights(hub_inception_path()))
    return None


def _check_features(features) -> int:
    """Validate a :func:`sample_features` dict; returns its number of images."""
    unknown = set(features) - set(FEATURE_KEYS)
    missing = [k for k in CIFARNET_FEATURES if k not in features]
    partial = [k for k in INCEPTION_FEATURES if k not in features] if set(INCEPTION_FEATURES) & set(features) else []
    if unknown or missing or partial:
        raise ValueError(
            f"features: unknown keys {sorted(unknown)}, missing {missing + partial}; expected keys from {FEATURE_KEYS}"
        )
    rows = {k: np.shape(v) for k, v in features.items()}
    n = {s[0] if len(s) == 2 else -1 for s in rows.values()}
    if len(n) != 1 or min(n) < 2:
        raise ValueError(f"features must be [N, D] arrays with the same N >= 2; got {rows}")
    return n.pop()


def sample_features(
    samples: np.ndarray,
    extractor: str = "cifarnet",
    device: str = "cpu",
    inception_weights: str | None = None,
    batch_size: int = 256,
    *,
    clean_fid: bool = True,
) -> dict[str, np.ndarray]:
    """Every feature array the metrics of uint8 ``samples`` ``[N,3,32,32]`` need, float32 ``[N, D]`` in image order.

    Keys: ``cifarnet/pool``, ``cifarnet/logits``, ``cifarnet/spatial`` (the registered torch-fidelity
    extractor); ``cifarnet/clean_fid`` (CifarNet ``pool`` through clean-fid's pipeline) if ``clean_fid``;
    ``inception/2048``, ``inception/logits_unbiased``, ``inception/spatial`` when Inception weights are
    given or in torch-fidelity's hub cache; ``clean-fid-inception/pool`` when, in addition, ``clean_fid``
    and clean-fid's TorchScript file is in ``/tmp``. Row ``i`` depends on image ``i`` only, so the
    features of a split set, concatenated, are those of the whole set up to float round-off.
    """
    if extractor != "cifarnet":
        raise ValueError(f"unknown extractor {extractor!r}: only 'cifarnet' (+ Inception when weights exist)")
    samples = _as_numpy(samples)
    check_images(samples, "samples", square32=True, min_images=1)
    weights = _inception_weights(inception_weights)  # fail before any work

    f = extract_features(samples, "cifarnet", ALL_LAYERS["cifarnet"], device, batch_size)
    out = {f"cifarnet/{layer}": v for layer, v in f.items()}
    if clean_fid:
        out[CLEANFID_CIFARNET] = _cleanfid_features(
            samples, _cifarnet_cleanfid_fn(device), device, batch_size, resize=False
        )
    if weights is not None:
        f = extract_features(samples, "inception", ALL_LAYERS["inception"], device, batch_size, weights)
        out.update({f"inception/{layer}": v for layer, v in f.items()})
        if clean_fid and CLEANFID_TORCHSCRIPT.is_file():
            out[CLEANFID_INCEPTION] = _cleanfid_features(
                samples, _cleanfid_inception(device), device, batch_size, resize=True
            )
    return out


def metrics_from_features(
    features: dict[str, np.ndarray],
    reference=None,
    device: str = "cpu",
    inception_weights: str | None = None,
    batch_size: int = 256,
    *,
    cache_dir: str | None = None,
    kid_subsets: int = 100,
) -> dict[str, float]:
    """The :func:`compute_metrics` dict from :func:`sample_features` output (any concatenation of it).

    Computes the ``*/cifarnet`` metrics; ``clean_fid/cifarnet`` when ``cifarnet/clean_fid`` is present;
    the ``*/inception`` ones when ``inception/*`` features are present; ``clean_fid/inception`` when
    ``clean-fid-inception/pool`` is present and its reference statistics are available (else a
    warning). ``reference`` as in :func:`compute_metrics`; ``device``, ``inception_weights`` (those
    the features were extracted with) and ``batch_size`` serve only to compute reference-image statistics.
    """
    _check_features(features)
    ref = _resolve_reference(reference, "cifarnet", device, batch_size, None, cache_dir)
    out = _network_metrics(features, "cifarnet", ref, kid_subsets)
    if CLEANFID_CIFARNET in features:
        out["clean_fid/cifarnet"] = _clean_fid(features[CLEANFID_CIFARNET], ref)
    if INCEPTION_FEATURES[0] in features:
        ref_i = _resolve_reference(reference, "inception", device, batch_size, inception_weights, cache_dir)
        out.update(_network_metrics(features, "inception", ref_i, kid_subsets))
        if CLEANFID_INCEPTION in features:
            try:
                ref_c = _resolve_reference(reference, "clean-fid-inception", device, batch_size, None, cache_dir)
            except FileNotFoundError as e:
                warnings.warn(f"clean_fid/inception skipped: {e}", stacklevel=2)
            else:
                out["clean_fid/inception"] = _clean_fid(features[CLEANFID_INCEPTION], ref_c)
    return out


def compute_metrics(
    samples: np.ndarray,
    extractor: str = "cifarnet",
    reference=None,
    device: str = "cpu",
    inception_weights: str | None = None,
    batch_size: int = 256,
    *,
    cache_dir: str | None = None,
    kid_subsets: int = 100,
    clean_fid: bool = True,
) -> dict[str, float]:
    """Metrics of uint8 ``samples`` ``[N,3,H,W]`` against a reference set, keyed ``<metric>/<network>``.

    ``metrics_from_features(sample_features(samples, ...), reference, ...)``.

    ``reference``: ``None`` (shipped CIFAR-10 test statistics through CifarNet; Inception ones from
    the cache), a :class:`models.reference_stats.RefStats`, a dict ``{extractor: RefStats}``, or a
    uint8 array of reference images (statistics computed and cached per extractor).

    Returns ``fid/cifarnet``, ``is/cifarnet``, ``sfid/cifarnet``, ``kid/cifarnet``,
    ``kid_std/cifarnet``, ``clean_fid/cifarnet``; plus ``fid/inception``, ``is/inception``,
    ``sfid/inception``, ``kid/inception``, ``kid_std/inception`` when Inception weights are given or
    in torch-fidelity's hub cache; plus ``clean_fid/inception`` when clean-fid's TorchScript file is
    in ``/tmp`` (and reference images are given or its statistics are cached).
    """
    if extractor != "cifarnet":
        raise ValueError(f"unknown extractor {extractor!r}: only 'cifarnet' (+ Inception when weights exist)")
    samples = _as_numpy(samples)
    check_images(samples, "samples", square32=True)
    weights = _inception_weights(inception_weights)  # fail before any work
    features = sample_features(samples, extractor, device, weights, batch_size, clean_fid=clean_fid)
    return metrics_from_features(
        features, reference, device, weights, batch_size, cache_dir=cache_dir, kid_subsets=kid_subsets
    )
