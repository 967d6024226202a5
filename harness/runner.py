"""Run one spec end to end: model -> calibration -> method -> sampling -> metrics -> results.json.

Each stage leaves its product on disk (calibration facts and the quantized model,
sample shards, results), so a run killed at any point resumes at the stage it was in,
and a complete run is skipped. Workers call :func:`run_one`; only the driver mirrors
results into MLflow (see harness/sweep.py).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import methods
from harness.calibration import CALIB_SEED_BASE, EVAL_SEED_STRIDE, TrajectoryBank, eval_seeds
from harness.generate import generate_samples, make_schedule
from harness.shards import ShardStore
from harness.spec import RunSpec
from harness.tracking import git_revision, read_results, versions, write_json_atomic
from methods.base import BitConfig
from methods.quant.calibrate import call_at_step
from methods.quant.surgery import UNIFORM
from models.loading import load_model
from models.registry import ZOO, at_path, get_model, local_model

PROBE_IMAGES = 16  # images whose FP trajectories score paired/eps_mse


@dataclass
class RunOptions:
    out: Path
    device: str = "cpu"
    batch_size: int = 64
    inception_weights: str | None = None

    @property
    def cache_dir(self) -> Path:
        return Path(self.out) / "cache"


def run_dir(spec: RunSpec, out: Path) -> Path:
    return Path(out) / "runs" / spec.run_name


def is_complete(spec: RunSpec, out: Path) -> bool:
    res = read_results(run_dir(spec, out))
    return res is not None and res.get("status") == "complete"


def _model_spec(spec: RunSpec):
    if spec.model_path is None:
        return get_model(spec.model)
    return at_path(get_model(spec.model), spec.model_path) if spec.model in ZOO else local_model(spec.model_path)


def _bank(model, schedule, spec: RunSpec, opts: RunOptions, seed_base: int = CALIB_SEED_BASE) -> TrajectoryBank:
    """FP trajectories of this run's model and sampler (calibration seeds by default), cached under OUT/cache."""
    return TrajectoryBank(model, schedule, spec.sampler, spec.eta, opts.cache_dir, opts.device, opts.batch_size,
                          seed_base=seed_base, model_key=f"{spec.model}:{spec.model_path}")


def _quantize(spec: RunSpec, model, bank: TrajectoryBank, rdir: Path):
    """Calibrate once; later attempts reload the saved quantized denoiser and its facts."""
    saved, facts_path = rdir / "quantized_unet.pt", rdir / "calibration.json"
    if saved.exists() and facts_path.exists():
        unet = torch.load(saved, map_location=bank.device, weights_only=False)
        return model.denoiser.with_unet(unet), json.loads(facts_path.read_text())
    cls = methods.get(spec.method)
    method = cls(cls.config_cls.from_dict(spec.method_config) if spec.method_config else None)
    scope = UNIFORM if spec.scope == "uniform" else method.paper_scope()
    artifact_dir = rdir / "artifacts"
    artifact_dir.mkdir(parents=True, exist_ok=True)
    bits = BitConfig.parse(spec.bits) if spec.bits != "fp" else BitConfig(16, 16)
    # The method quantizes a copy: the bank keeps the untouched FP denoiser for calibration and probes.
    result = method.quantize(copy.deepcopy(model.denoiser), bank, bits, scope, artifact_dir)
    facts = dict(result.facts)
    if cls.quantizes:
        torch.save(result.denoiser.unet, saved)
    if "coverage" in facts:  # the per-layer bit report, logged with the run as an artifact
        write_json_atomic(artifact_dir / "coverage.json", facts["coverage"])
    write_json_atomic(facts_path, facts)
    return result.denoiser, facts


@torch.no_grad()
def eps_mse(denoiser, probe, device) -> float:
    """paired/eps_mse: mean over steps of the noise-prediction MSE on the FP trajectory states."""
    errs = []
    for s in range(probe.num_steps):
        batch = probe.at(torch.arange(probe.num_images), torch.full((probe.num_images,), s))
        eps = call_at_step(denoiser, batch, probe.num_steps, device).float().cpu()
        errs.append(torch.mean((eps - probe.eps[:, s].float()) ** 2).item())
    return float(np.mean(errs))


def save_grid(images: np.ndarray, path: Path, n: int = 64) -> None:
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(torch.from_numpy(images[:n]), nrow=8, padding=1)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


WORKER_ENV = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
              "SLURM_RESTART_COUNT", "RANK", "WORLD_SIZE")


def worker_environment() -> dict[str, str]:
    """Where this attempt ran: host, pid and the scheduler variables that are set (GPU pinning,
    Slurm job and restart count, torchrun rank)."""
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    return {"host": socket.gethostname(), "pid": str(os.getpid()), **env}


def new_results(spec: RunSpec, rdir: Path) -> dict:
    """The ``results.json`` skeleton of one attempt (also writes ``spec.json``)."""
    (rdir / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True))
    first = spec.seed * EVAL_SEED_STRIDE
    return {
        "spec": spec.to_dict(),
        "config_hash": spec.config_hash,
        "seeds": {"eval": f"{first}..{first + spec.num_samples - 1}", "run_seed": spec.seed},
        "versions": versions(),
        "git_revision": git_revision(),
        "worker": worker_environment(),
        "timings": {},
        "metrics": {},
        "facts": {},
        "status": "running",
    }


def score(spec: RunSpec, opts: RunOptions, model, schedule, denoiser, images: np.ndarray,
          features: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Every metric of a run: the extractor metrics (from ``features`` when the ranks of a torchrun
    job extracted them, else from ``images``), the paired metrics against FP, and paired/eps_mse."""
    from harness.metrics import metrics_from_features, sample_features

    if features is None:
        features = sample_features(images, spec.extractor, opts.device, opts.inception_weights)
    metrics = metrics_from_features(features, device=opts.device, inception_weights=opts.inception_weights)
    metrics.update(paired_to_reference(spec, images, opts.out))  # {} while FP is still sampling
    probe_seed_base = spec.seed * EVAL_SEED_STRIDE
    probe_bank = _bank(model, schedule, spec, opts, seed_base=probe_seed_base)
    probe = probe_bank.trajectories(min(PROBE_IMAGES, spec.num_samples))
    assert eval_seeds(spec.seed, 0, 1)[0] == probe_seed_base  # the probe images are the first eval images
    metrics["paired/eps_mse"] = eps_mse(denoiser, probe, opts.device)
    return metrics


def record_failure(results: dict, error: BaseException) -> None:
    """Mark an attempt failed, with the error and its traceback (the sweep goes on)."""
    results["status"] = "failed"
    results["error"] = f"{type(error).__name__}: {error}"
    results["traceback"] = "".join(traceback.format_exception(error))


def run_one(spec: RunSpec, opts: RunOptions) -> dict:
    """Run (or resume) one spec and return its results; failures are recorded, not raised."""
    rdir = run_dir(spec, opts.out)
    existing = read_results(rdir)
    if existing and existing.get("status") == "complete":
        return existing
    rdir.mkdir(parents=True, exist_ok=True)
    results = new_results(spec, rdir)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(spec.seed)
        model = load_model(_model_spec(spec), spec.model_path, opts.device)
        schedule = make_schedule(model, spec.steps, spec.spacing)
        bank = _bank(model, schedule, spec, opts)
        t = time.perf_counter()
        denoiser, facts = _quantize(spec, model, bank, rdir)
        results["facts"] = facts
        results["model_fingerprint"] = bank.fingerprint  # sha256 of the FP weights this run quantized
        results["timings"]["calib_seconds"] = float(facts.get("calib_seconds", time.perf_counter() - t))

        t = time.perf_counter()
        store = ShardStore(rdir / "samples", spec.num_samples)
        made = generate_samples(
            model,
            denoiser,
            schedule,
            spec.sampler,
            spec.eta,
            spec.seed,
            store,
            opts.device,
            opts.batch_size,
            desc=f"{spec.method} {spec.bits}",
        )
        results["timings"]["sample_seconds"] = time.perf_counter() - t
        results["facts"]["images_generated_this_attempt"] = made
        images = store.load_all()
        save_grid(images, rdir / "samples_grid.png")

        t = time.perf_counter()
        metrics = score(spec, opts, model, schedule, denoiser, images)
        results["timings"]["metric_seconds"] = time.perf_counter() - t
        results["metrics"] = metrics
        results["status"] = "complete"
    except Exception as e:  # recorded; the sweep goes on
        record_failure(results, e)
    results["timings"]["total_seconds"] = time.perf_counter() - t0
    write_json_atomic(rdir / "results.json", results)
    return results


def paired_to_reference(spec: RunSpec, images: np.ndarray, out: Path) -> dict[str, float]:
    """``paired/mse`` and ``paired/psnr`` against the FP run of the same seeds, or ``{}`` while
    its samples are incomplete (one array job runs both at once; the driver fills them in later
    with :func:`add_paired_metrics`)."""
    from harness.metrics import paired_metrics

    if spec.method == "fp":
        return paired_metrics(images, images)
    ref = ShardStore(run_dir(spec.fp_reference(), out) / "samples", spec.num_samples)
    return paired_metrics(images, ref.load_all()) if ref.complete else {}


def needs_paired(spec: RunSpec, out: Path) -> bool:
    """A complete run still without its paired metrics."""
    return _lacks_paired(read_results(run_dir(spec, out)))


def _lacks_paired(res: dict | None) -> bool:
    return res is not None and res.get("status") == "complete" and "paired/mse" not in res.get("metrics", {})


def add_paired_metrics(spec: RunSpec, out: Path) -> bool:
    """Driver side: add the paired metrics to a complete run whose FP reference finished after it.
    Returns whether ``results.json`` was updated (atomically)."""
    rdir = run_dir(spec, out)
    res = read_results(rdir)
    if not _lacks_paired(res):
        return False
    images = ShardStore(rdir / "samples", spec.num_samples).load_all()
    paired = paired_to_reference(spec, images, out)
    if not paired:
        return False
    res["metrics"].update(paired)
    write_json_atomic(rdir / "results.json", res)
    return True
