"""Sample features and the metrics computed from them against a reference set.

:func:`compute_metrics` is two steps: :func:`sample_features` (every feature array the metrics need,
one row per image) then :func:`metrics_from_features`; torchrun ranks run the first step on their
own shards and rank 0 the second on the gathered features (:mod:`harness.distributed`).
"""

from __future__ import annotations

import warnings

import numpy as np

from harness.metrics.errors import MetricSetupError
from harness.metrics.extractors import (
    ALL_LAYERS,
    CLEANFID_TORCHSCRIPT,
    LAYERS,
    cifarnet_cleanfid_fn,
    cleanfid_features,
    cleanfid_inception,
    extract_features,
    optional_inception_weights,
    validate_inception_weights,
)
from harness.metrics.frechet import (
    clean_fid_distance,
    feature_statistics,
    fid_from_statistics,
    frechet_distance_to_features,
    inception_score,
    kernel_distance,
)
from harness.metrics.images import as_numpy, check_images
from harness.metrics.reference import RefStats, compute_reference_stats, resolve_reference

DEFAULT_REFERENCE = "cifar10-test"

# Feature arrays :func:`sample_features` returns, keyed ``<network>/<layer>``.
CIFARNET_FEATURES = tuple(f"cifarnet/{layer}" for layer in ALL_LAYERS["cifarnet"])
INCEPTION_FEATURES = tuple(f"inception/{layer}" for layer in ALL_LAYERS["inception"])
CLEANFID_CIFARNET = "cifarnet/clean_fid"  # CifarNet ``pool`` through clean-fid's PNG pipeline (no resize)
CLEANFID_INCEPTION = "clean-fid-inception/pool"  # clean-fid's TorchScript Inception pipeline
FEATURE_KEYS = (*CIFARNET_FEATURES, CLEANFID_CIFARNET, *INCEPTION_FEATURES, CLEANFID_INCEPTION)
NETWORK_FEATURES = {"cifarnet": CIFARNET_FEATURES, "inception": INCEPTION_FEATURES}


# --------------------------------------------------------------------------- references
def _resolve_reference(reference, extractor: str, device: str, batch_size: int, inception_weights, cache_dir):
    """``reference`` as a :class:`RefStats` for ``extractor`` (see :func:`metrics_from_features`)."""
    if reference is None:
        return resolve_reference(DEFAULT_REFERENCE, extractor, inception_weights, cache_dir).stats
    if isinstance(reference, RefStats):
        if reference.extractor == extractor:
            return reference
        return resolve_reference(reference.dataset, extractor, inception_weights, cache_dir).stats
    if isinstance(reference, dict):
        if extractor not in reference:
            raise ValueError(f"reference dict has no entry for extractor {extractor!r} (has {sorted(reference)})")
        return _resolve_reference(reference[extractor], extractor, device, batch_size, inception_weights, cache_dir)
    if isinstance(reference, str) or hasattr(reference, "__fspath__"):
        return resolve_reference(reference, extractor, inception_weights, cache_dir).stats
    if hasattr(reference, "stats") and hasattr(reference, "sha256"):  # a resolved Reference
        return _resolve_reference(reference.stats, extractor, device, batch_size, inception_weights, cache_dir)
    images = as_numpy(reference)
    return compute_reference_stats(
        images,
        extractor,
        dataset="custom",
        cache_dir=cache_dir,
        device=device,
        batch_size=batch_size,
        inception_weights=inception_weights,
    )


def _network_metrics(features: dict, net: str, ref: RefStats, kid_subsets: int) -> dict:
    """FID, IS, sFID, KID (+ std) of ``net``'s features against ``ref`` (layers: ``LAYERS[net]``).

    KID is left out (with a warning) when ``ref`` stores no raw features (imported statistics).
    """
    lay = LAYERS[net]
    f = {layer: features[f"{net}/{layer}"] for layer in ALL_LAYERS[net]}
    sfid = ref.stats(lay["sfid"])
    out = {
        f"fid/{net}": fid_from_statistics(feature_statistics(f[lay["fid"]]), ref.stats(lay["fid"])),
        f"is/{net}": inception_score(f[lay["isc"]]),
        f"sfid/{net}": frechet_distance_to_features(f[lay["sfid"]], mu2=sfid["mu"], sigma2=sfid["sigma"]),
    }
    if ref.has_raw(lay["kid"]):
        out[f"kid/{net}"], out[f"kid_std/{net}"] = kernel_distance(f[lay["kid"]], ref.raw(lay["kid"]), kid_subsets)
    else:
        warnings.warn(f"kid/{net} skipped: reference {ref.dataset!r} stores no raw features (imported)", stacklevel=3)
    return out


def _check_features(features) -> int:
    """Validate a :func:`sample_features` dict; returns its number of images."""
    unknown = set(features) - set(FEATURE_KEYS)
    missing = []
    for keys in NETWORK_FEATURES.values():
        if set(keys) & set(features):
            missing += [k for k in keys if k not in features]
    if not (set(FEATURE_KEYS) - {CLEANFID_CIFARNET, CLEANFID_INCEPTION}) & set(features):
        missing += list(CIFARNET_FEATURES)
    if CLEANFID_CIFARNET in features and CIFARNET_FEATURES[0] not in features:
        missing += [k for k in CIFARNET_FEATURES if k not in missing]
    if CLEANFID_INCEPTION in features and INCEPTION_FEATURES[0] not in features:
        missing += [k for k in INCEPTION_FEATURES if k not in missing]
    if unknown or missing:
        raise ValueError(
            f"features: unknown keys {sorted(unknown)}, missing {missing}; expected keys from {FEATURE_KEYS}"
        )
    rows = {k: np.shape(v) for k, v in features.items()}
    n = {s[0] if len(s) == 2 else -1 for s in rows.values()}
    if len(n) != 1 or min(n) < 2:
        raise ValueError(f"features must be [N, D] arrays with the same N >= 2; got {rows}")
    return n.pop()


# --------------------------------------------------------------------------- the two steps
def sample_features(
    samples: np.ndarray,
    extractor: str = "cifarnet",
    device: str = "cpu",
    inception_weights: str | None = None,
    batch_size: int = 256,
    *,
    clean_fid: bool = True,
) -> dict[str, np.ndarray]:
    """Every feature array the metrics of uint8 ``samples`` ``[N,3,H,W]`` need, float32 ``[N, D]`` in image order.

    ``extractor="cifarnet"`` (32x32 samples only): ``cifarnet/pool``, ``cifarnet/logits``,
    ``cifarnet/spatial`` and, if ``clean_fid``, ``cifarnet/clean_fid`` (CifarNet ``pool`` through
    clean-fid's pipeline); plus the Inception features below when Inception weights are given or in
    torch-fidelity's hub cache.

    ``extractor="inception"`` (any square size; torch-fidelity resizes to 299): the weights are
    required; ``inception/2048``, ``inception/logits_unbiased``, ``inception/spatial`` and, when
    ``clean_fid`` and clean-fid's TorchScript file is in ``/tmp``, ``clean-fid-inception/pool``.

    Row ``i`` depends on image ``i`` only, so the features of a split set, concatenated, are those
    of the whole set up to float round-off.
    """
    if extractor not in NETWORK_FEATURES:
        raise MetricSetupError(f"unknown extractor {extractor!r}; expected one of {sorted(NETWORK_FEATURES)}")
    samples = as_numpy(samples)
    check_images(samples, "samples", min_images=1, extractor=extractor)
    if extractor == "inception":
        from harness.metrics.extractors import resolve_inception_weights

        weights = str(validate_inception_weights(resolve_inception_weights(inception_weights)))
    else:
        weights = optional_inception_weights(inception_weights)  # fail before any work

    out: dict[str, np.ndarray] = {}
    if extractor == "cifarnet":
        f = extract_features(samples, "cifarnet", ALL_LAYERS["cifarnet"], device, batch_size)
        out.update({f"cifarnet/{layer}": v for layer, v in f.items()})
        if clean_fid:
            out[CLEANFID_CIFARNET] = cleanfid_features(
                samples, cifarnet_cleanfid_fn(device), device, batch_size, resize=False
            )
    if weights is not None:
        f = extract_features(samples, "inception", ALL_LAYERS["inception"], device, batch_size, weights)
        out.update({f"inception/{layer}": v for layer, v in f.items()})
        if clean_fid and CLEANFID_TORCHSCRIPT.is_file():
            out[CLEANFID_INCEPTION] = cleanfid_features(
                samples, cleanfid_inception(device), device, batch_size, resize=True
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

    Computes the ``*/cifarnet`` metrics when ``cifarnet/*`` features are present (``clean_fid/cifarnet``
    with ``cifarnet/clean_fid``); the ``*/inception`` ones when ``inception/*`` features are present;
    ``clean_fid/inception`` when ``clean-fid-inception/pool`` is present and the reference has
    clean-fid statistics (else a warning). ``reference`` as in :func:`compute_metrics`;
    ``inception_weights`` must be the file the features were extracted with (it selects the
    reference entry built with the same weights); ``device`` and ``batch_size`` serve only to
    compute statistics of reference images.
    """
    _check_features(features)
    out: dict[str, float] = {}
    if CIFARNET_FEATURES[0] in features:
        ref = _resolve_reference(reference, "cifarnet", device, batch_size, None, cache_dir)
        out.update(_network_metrics(features, "cifarnet", ref, kid_subsets))
        if CLEANFID_CIFARNET in features:
            out["clean_fid/cifarnet"] = clean_fid_distance(features[CLEANFID_CIFARNET], ref.stats("pool"))
    if INCEPTION_FEATURES[0] in features:
        ref_i = _resolve_reference(reference, "inception", device, batch_size, inception_weights, cache_dir)
        out.update(_network_metrics(features, "inception", ref_i, kid_subsets))
        if CLEANFID_INCEPTION in features:
            try:
                ref_c = _resolve_reference(reference, "clean-fid-inception", device, batch_size, None, cache_dir)
            except (FileNotFoundError, MetricSetupError) as e:
                warnings.warn(f"clean_fid/inception skipped: {e}", stacklevel=2)
            else:
                out["clean_fid/inception"] = clean_fid_distance(features[CLEANFID_INCEPTION], ref_c.stats("pool"))
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

    ``reference``: ``None`` (``cifar10-test``: the shipped CIFAR-10 test statistics through
    CifarNet; Inception ones from the store), a reference name or statistics file (see
    :func:`harness.metrics.resolve_reference`), a :class:`RefStats`, a dict ``{extractor: RefStats}``,
    or a uint8 array of reference images (statistics computed and cached per extractor).

    Returns ``fid``, ``is``, ``sfid``, ``kid``, ``kid_std`` per network (``/cifarnet`` for 32x32
    samples with the default extractor, ``/inception`` when Inception weights are given or in
    torch-fidelity's hub cache, or with ``extractor="inception"``), ``clean_fid/cifarnet``, and
    ``clean_fid/inception`` when clean-fid's TorchScript file is in ``/tmp`` and the reference has
    clean-fid statistics.
    """
    samples = as_numpy(samples)
    if extractor not in NETWORK_FEATURES:
        raise MetricSetupError(f"unknown extractor {extractor!r}; expected one of {sorted(NETWORK_FEATURES)}")
    check_images(samples, "samples", extractor=extractor)
    features = sample_features(samples, extractor, device, inception_weights, batch_size, clean_fid=clean_fid)
    weights = None
    if INCEPTION_FEATURES[0] in features:
        from harness.metrics.extractors import resolve_inception_weights

        weights = resolve_inception_weights(inception_weights)
    return metrics_from_features(
        features, reference, device, weights, batch_size, cache_dir=cache_dir, kid_subsets=kid_subsets
    )
