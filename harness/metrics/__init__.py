"""Sample-quality metrics: FID / IS / KID / sFID / clean-FID, keyed by the network that computed them.

Every key is ``<metric>/<network>``: ``fid/cifarnet`` is a Fréchet distance in CifarNet's feature
space and is *not* comparable with a published (Inception) FID. Inception metrics need an
Inception weights file (``inception_weights=`` or torch-fidelity's hub cache file), read safely
(:func:`load_inception_state_dict`); ``clean_fid/inception`` additionally needs clean-fid's
TorchScript file in ``/tmp``. See docs/metrics.md for the definitions, the reference-set store and
the preprocessing rules.

Modules:

* :mod:`.frechet`: the math (Fréchet distance and its low-rank form, torch-fidelity's FID/IS/KID,
  clean-fid's Fréchet distance, streaming mean/covariance);
* :mod:`.extractors`: CifarNet and Inception (+ sFID tap) registered with torch-fidelity, Inception
  weights loading and hashing, clean-fid's pipeline, :func:`check_extractor`;
* :mod:`.reference`: reference statistics, the named store, ``bench ref`` build/import,
  :func:`resolve_reference`, :func:`check_reference`;
* :mod:`.sources`: reference image sources (folders, ADM ``.npz``, tar, CIFAR-10 pickles);
* :mod:`.score`: :func:`sample_features`, :func:`metrics_from_features`, :func:`compute_metrics`;
* :mod:`.images`: input checks and :func:`paired_metrics`;
* :mod:`.registry`: ``METRICS``, every metric family with its direction and interval keys;
* :mod:`.bootstrap`: bootstrap intervals over images and the paired significance test;
* :mod:`.fidelity`: fidelity to FP (``paired/ssim``, ``paired/lpips/*``, ``fid_fp``, ``kid_fp``) and intervals;
* :mod:`.floor`: the sampling floor of N real test images.
"""

from harness.metrics.errors import MetricSetupError
from harness.metrics.extractors import (
    ALL_LAYERS,
    CLEANFID_TORCHSCRIPT,
    INCEPTION_FILENAME,
    INCEPTION_SHA256,
    INCEPTION_URL,
    LAYERS,
    SFID_CHANNELS,
    check_extractor,
    extract_features,
    extractor_weights_sha256,
    get_extractor,
    hub_inception_path,
    inception_weights_info,
    load_inception_state_dict,
    validate_inception_weights,
)
from harness.metrics.frechet import (
    RunningStatistics,
    feature_statistics,
    frechet_distance,
    frechet_distance_to_features,
)
from harness.metrics.images import check_images, paired_metrics
from harness.metrics.reference import (
    Reference,
    RefStats,
    build_reference,
    check_reference,
    compute_reference_stats,
    default_cache_dir,
    import_stats,
    list_entries,
    reference_stats,
    resolve_reference,
)
from harness.metrics.registry import METRICS, MetricInfo, direction, interval_keys
from harness.metrics.score import (
    CIFARNET_FEATURES,
    CLEANFID_CIFARNET,
    CLEANFID_INCEPTION,
    FEATURE_KEYS,
    INCEPTION_FEATURES,
    compute_metrics,
    metrics_from_features,
    sample_features,
)

__all__ = [
    "ALL_LAYERS",
    "CIFARNET_FEATURES",
    "CLEANFID_CIFARNET",
    "CLEANFID_INCEPTION",
    "CLEANFID_TORCHSCRIPT",
    "FEATURE_KEYS",
    "INCEPTION_FEATURES",
    "INCEPTION_FILENAME",
    "INCEPTION_SHA256",
    "INCEPTION_URL",
    "LAYERS",
    "METRICS",
    "SFID_CHANNELS",
    "MetricInfo",
    "MetricSetupError",
    "RefStats",
    "Reference",
    "RunningStatistics",
    "build_reference",
    "check_extractor",
    "check_images",
    "check_reference",
    "compute_metrics",
    "compute_reference_stats",
    "default_cache_dir",
    "direction",
    "extract_features",
    "extractor_weights_sha256",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_to_features",
    "get_extractor",
    "hub_inception_path",
    "import_stats",
    "inception_weights_info",
    "interval_keys",
    "list_entries",
    "load_inception_state_dict",
    "metrics_from_features",
    "paired_metrics",
    "reference_stats",
    "resolve_reference",
    "sample_features",
    "validate_inception_weights",
]
