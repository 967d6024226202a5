"""Fidelity to the FP model, and the bootstrap intervals of every metric of a run.

A quantized run and its FP reference sample image ``i`` from the same noise, so they are compared
image by image (``paired/mse``, ``paired/psnr``, ``paired/ssim``, ``paired/lpips/<backbone>``) and as
distributions in each extractor's feature space (``fid_fp/<net>``, ``kid_fp/<net>``). Every metric
gets its 95% bootstrap interval (``<metric>_ci_low``/``_ci_high``) and its replicates, which the run
keeps (``bootstrap.npz``) for the leaderboard's paired significance test (:mod:`.bootstrap`).
Definitions: docs/metrics.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from harness.metrics.bootstrap import (
    add_interval,
    fd_paired_replicates,
    fd_to_reference_replicates,
    is_replicates,
    kid_paired_replicates,
    kid_to_reference_replicates,
    mean_replicates,
    resample_weights,
)
from harness.metrics.errors import MetricSetupError
from harness.metrics.extractors import LAYERS
from harness.metrics.images import as_numpy, check_images, paired_metrics
from harness.metrics.registry import CHEAP_RESAMPLES, FD_RESAMPLES, interval_keys

NETWORKS = ("cifarnet", "inception")  # feature key prefix -> fid_fp/<net>, kid_fp/<net>
LPIPS_BACKBONES = {"alex": [64, 192, 384, 256, 256], "vgg": [64, 128, 256, 512, 512],
                   "squeeze": [64, 128, 256, 384, 384, 512, 512]}


def _networks(features: dict) -> list[str]:
    return [net for net in NETWORKS if f"{net}/{LAYERS[net]['fid']}" in features]


# --------------------------------------------------------------------------- per-image values
def _unit(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0


def ssim_per_image(samples_a: np.ndarray, samples_b: np.ndarray) -> np.ndarray:
    """SSIM of each image pair (uint8 ``[N,3,H,W]``, data range 1) with pytorch-msssim's implementation
    (Wang et al. 2004: Gaussian window 11, σ 1.5, K = (0.01, 0.03), valid convolution; mean over the
    channels and window positions)."""
    from pytorch_msssim import ssim

    a, b = as_numpy(samples_a), as_numpy(samples_b)
    out = ssim(_unit(a), _unit(b), data_range=1.0, size_average=False)
    return out.double().numpy().reshape(len(a))


def load_lpips(path: str | Path):
    """An ``lpips.LPIPS`` module whose backbone and linear layers are the local file ``path``
    (``torch.load(weights_only=True)``, a ``{name: Tensor}`` state dict of the whole module). The backbone
    (``alex``, ``vgg`` or ``squeeze``) is read from the file's layer shapes; the module is built with
    ``pretrained=False, pnet_rand=True``, so neither lpips nor torchvision fetches any weights."""
    import lpips

    path = Path(path)
    if not path.is_file():
        raise MetricSetupError(f"--lpips-weights {path} does not exist: pass a local LPIPS state-dict file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MetricSetupError(f"--lpips-weights {path} is not a torch state dict ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise MetricSetupError(f"--lpips-weights {path}: expected a non-empty {{name: Tensor}} state dict")
    backbone = lpips_backbone(sd)
    model = lpips.LPIPS(pretrained=False, net=backbone, pnet_rand=True, verbose=False)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise MetricSetupError(f"--lpips-weights {path}: not an LPIPS {backbone} state dict "
                               f"({str(e).splitlines()[0][:200]})") from None
    model.backbone = backbone
    return model.eval()


def lpips_backbone(state_dict: dict) -> str:
    """``alex``/``vgg``/``squeeze`` from the output channels of the linear layers ``lin<k>.model.1.weight``."""
    chans = []
    k = 0
    while f"lin{k}.model.1.weight" in state_dict:
        chans.append(int(state_dict[f"lin{k}.model.1.weight"].shape[1]))
        k += 1
    for name, expected in LPIPS_BACKBONES.items():
        if chans == expected:
            return name
    raise MetricSetupError(f"LPIPS weights: linear layers with {chans} input channels match no backbone "
                           f"({', '.join(f'{k}: {v}' for k, v in LPIPS_BACKBONES.items())})")


@torch.no_grad()
def lpips_per_image(model, samples_a: np.ndarray, samples_b: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """LPIPS distance of each image pair (inputs scaled to [-1, 1], lpips' convention)."""
    a, b = as_numpy(samples_a), as_numpy(samples_b)
    out = []
    for i in range(0, len(a), batch_size):
        x = _unit(a[i:i + batch_size]).float() * 2 - 1
        y = _unit(b[i:i + batch_size]).float() * 2 - 1
        out.append(model(x, y).reshape(-1).double().numpy())
    return np.concatenate(out)


# --------------------------------------------------------------------------- fidelity to FP
def fidelity_metrics(images_q: np.ndarray, images_fp: np.ndarray, features_q: dict | None = None,
                     features_fp: dict | None = None, lpips_model=None) -> tuple[dict[str, float], dict]:
    """Every metric of ``images_q`` against the FP samples of the same seeds, with intervals.

    Returns ``(metrics, replicates)``: ``paired/mse``, ``paired/psnr`` (``inf`` for identical images, then
    without an interval), ``paired/ssim``, ``paired/lpips/<backbone>`` when ``lpips_model`` is given, and
    ``fid_fp/<net>``, ``kid_fp/<net>`` for every network whose features both sides have.
    """
    q, fp = as_numpy(images_q), as_numpy(images_fp)
    check_images(q, "samples_q")
    check_images(fp, "samples_fp")
    if q.shape != fp.shape:
        raise ValueError(f"fidelity metrics: shapes differ {q.shape} vs {fp.shape}")
    n = len(q)
    metrics: dict[str, float] = dict(paired_metrics(q, fp))
    reps: dict[str, np.ndarray] = {}
    w = resample_weights(n, CHEAP_RESAMPLES)
    d = q.astype(np.float64) / 255.0 - fp.astype(np.float64) / 255.0
    mse_i = (d * d).reshape(n, -1).mean(axis=1)
    mse_reps = mean_replicates(mse_i, w)
    add_interval(metrics, reps, "paired/mse", metrics["paired/mse"], mse_reps)
    # PSNR is a decreasing function of the mean MSE: its interval is the image of the MSE interval.
    lo, hi = metrics[interval_keys("paired/mse")[0]], metrics[interval_keys("paired/mse")[1]]
    if math.isfinite(metrics["paired/psnr"]) and lo > 0:
        metrics["paired/psnr_ci_low"] = 10.0 * math.log10(1.0 / hi)
        metrics["paired/psnr_ci_high"] = 10.0 * math.log10(1.0 / lo)
        reps["paired/psnr"] = 10.0 * np.log10(1.0 / mse_reps)
    ssim_i = ssim_per_image(q, fp)
    metrics["paired/ssim"] = float(ssim_i.mean())
    add_interval(metrics, reps, "paired/ssim", metrics["paired/ssim"], mean_replicates(ssim_i, w))
    if lpips_model is not None:
        key = f"paired/lpips/{getattr(lpips_model, 'backbone', lpips_model.pnet_type)}"
        lp = lpips_per_image(lpips_model, q, fp)
        metrics[key] = float(lp.mean())
        add_interval(metrics, reps, key, metrics[key], mean_replicates(lp, w))
    if features_q is not None and features_fp is not None:
        wf = resample_weights(n, FD_RESAMPLES)
        for net in _networks(features_q):
            if net not in _networks(features_fp):
                continue
            lay = LAYERS[net]
            fq, ff = features_q[f"{net}/{lay['fid']}"], features_fp[f"{net}/{lay['fid']}"]
            if len(fq) != n or len(ff) != n:
                raise ValueError(f"fid_fp/{net}: {len(fq)} and {len(ff)} feature rows for {n} images")
            full = np.ones((1, n))
            point = float(fd_paired_replicates(fq, ff, full)[0])
            metrics[f"fid_fp/{net}"] = point
            add_interval(metrics, reps, f"fid_fp/{net}", point, fd_paired_replicates(fq, ff, wf))
            kq, kf = features_q[f"{net}/{lay['kid']}"], features_fp[f"{net}/{lay['kid']}"]
            point = float(kid_paired_replicates(kq, kf, full)[0])
            metrics[f"kid_fp/{net}"] = point
            add_interval(metrics, reps, f"kid_fp/{net}", point, kid_paired_replicates(kq, kf, wf))
    return metrics, reps


# --------------------------------------------------------------------------- data-side intervals
def data_intervals(features: dict, metrics: dict[str, float], reference=None, inception_weights=None,
                   cache_dir=None) -> tuple[dict[str, float], dict]:
    """Intervals of the extractor metrics in ``metrics`` (``fid``, ``sfid``, ``clean_fid``, ``kid``, ``is``
    per network), computed from the run's ``features`` against the same reference as the point values."""
    from harness.metrics.score import CLEANFID_CIFARNET, _resolve_reference

    out: dict[str, float] = {}
    reps: dict[str, np.ndarray] = {}
    for net in _networks(features):
        if f"fid/{net}" not in metrics:
            continue
        lay = LAYERS[net]
        ref = _resolve_reference(reference, net, "cpu", 256, inception_weights if net == "inception" else None,
                                 cache_dir)
        n = len(features[f"{net}/{lay['fid']}"])
        w = resample_weights(n, FD_RESAMPLES)
        todo = [(f"fid/{net}", features[f"{net}/{lay['fid']}"], ref.stats(lay["fid"])),
                (f"sfid/{net}", features[f"{net}/{lay['sfid']}"], ref.stats(lay["sfid"]))]
        if net == "cifarnet" and CLEANFID_CIFARNET in features and "clean_fid/cifarnet" in metrics:
            todo.append(("clean_fid/cifarnet", features[CLEANFID_CIFARNET], ref.stats("pool")))
        for key, f, st in todo:
            if key in metrics:
                add_interval(out, reps, key, metrics[key], fd_to_reference_replicates(f, st["mu"], st["sigma"], w))
        if f"kid/{net}" in metrics and ref.has_raw(lay["kid"]):
            r = kid_to_reference_replicates(features[f"{net}/{lay['kid']}"], ref.raw(lay["kid"]), w)
            add_interval(out, reps, f"kid/{net}", metrics[f"kid/{net}"], r)
        if f"is/{net}" in metrics:
            r = is_replicates(features[f"{net}/{lay['isc']}"], w)
            add_interval(out, reps, f"is/{net}", metrics[f"is/{net}"], r)
    return out, reps
