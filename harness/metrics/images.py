"""Image-array checks shared by the metric code, and the paired (pixel) metrics."""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.metrics.errors import MetricSetupError

# Input resolution of each extractor: CifarNet is built for 32x32; torch-fidelity's Inception
# resizes any square input to 299x299 (TF1-compatible bilinear), as the TF evaluators do.


def as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def check_images(
    x: np.ndarray, what: str = "samples", square32: bool = False, min_images: int = 2, extractor: str | None = None
) -> None:
    """Raise ``ValueError`` unless ``x`` is uint8 ``[N,3,H,W]`` with ``N >= min_images`` that ``extractor`` takes.

    ``extractor="cifarnet"`` (or the older ``square32=True``) needs 32x32 images; ``"inception"`` any
    square size.
    """
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{what} must be a uint8 array [N,3,H,W]; got {x.dtype} {tuple(x.shape)}")
    if square32:
        extractor = "cifarnet"
    if extractor is not None:
        check_image_size(extractor, tuple(x.shape[2:]), what)
    if len(x) < min_images:
        raise ValueError(f"{what}: need at least {min_images} images, got {len(x)}")


def check_image_size(extractor: str, hw, what: str = "samples") -> None:
    """One-line :class:`MetricSetupError` unless ``extractor`` takes images of height x width ``hw``."""
    from harness.metrics.extractors import EXTRACTORS

    if extractor not in EXTRACTORS:
        raise MetricSetupError(f"unknown extractor {extractor!r}; expected one of {EXTRACTORS.names()}")
    h, w = (int(hw), int(hw)) if np.isscalar(hw) else (int(hw[0]), int(hw[1]))
    size = EXTRACTORS.get(extractor).size
    if size is not None and (h, w) != (size, size):
        raise MetricSetupError(
            f"{what}: CifarNet takes 32x32 images; got {(h, w)}: use extractor 'inception' "
            "with --inception-weights W for other sizes"
        )
    if h != w or h < 1:
        raise MetricSetupError(f"{what}: the Inception metrics take square images; got {(h, w)}")


def paired_metrics(samples_q: np.ndarray, samples_fp: np.ndarray) -> dict[str, float]:
    """Pixel agreement of quantised vs full-precision samples from the same noise.

    ``paired/mse``: mean over all pixels and channels of ``(q/255 − fp/255)²``;
    ``paired/psnr``: ``10·log10(1 / mse)`` dB (peak 1.0; ``inf`` when identical).
    """
    q, fp = as_numpy(samples_q), as_numpy(samples_fp)
    check_images(q, "samples_q")
    check_images(fp, "samples_fp")
    if q.shape != fp.shape:
        raise ValueError(f"paired_metrics: shapes differ {q.shape} vs {fp.shape}")
    d = q.astype(np.float64) / 255.0 - fp.astype(np.float64) / 255.0
    mse = float(np.mean(d * d))
    psnr = math.inf if mse == 0.0 else float(10.0 * math.log10(1.0 / mse))
    return {"paired/mse": mse, "paired/psnr": psnr}
