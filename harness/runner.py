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
from harness.metrics.errors import MetricSetupError
from harness.sampling_form import sampling_form
from harness.shards import ShardStore
from harness.spec import RunSpec
from harness.tracking import git_revision, read_results, versions, write_json_atomic
from harness.weights_record import record_weights
from methods.base import BitConfig
from methods.envelope import load_quantized, save_quantized
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
    lpips_weights: str | None = None  # local LPIPS state dict: adds paired/lpips/<backbone>
    clip_model: str | None = None  # local CLIP directory: adds clip_score/<name> to text-to-image runs

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


def method_for(spec: RunSpec):
    """The spec's method instance (its recorded config), scope and bit config."""
    cls = methods.get(spec.method)
    method = cls(cls.config_cls.from_dict(spec.method_config) if spec.method_config else None)
    scope = UNIFORM if spec.scope == "uniform" else method.paper_scope()
    bits = BitConfig.parse(spec.bits) if spec.bits != "fp" else BitConfig(16, 16)
    return method, scope, bits


def _quantize(spec: RunSpec, model, bank: TrajectoryBank, rdir: Path):
    """Calibrate once; later attempts rebuild the quantized denoiser from its saved state (no pickle).

    A saved state that does not load is moved aside (``*.corrupt``) and the run calibrates again."""
    saved, facts_path = rdir / "quantized.safetensors", rdir / "calibration.json"
    method, scope, bits = method_for(spec)
    if saved.exists() and facts_path.exists():
        try:
            denoiser = load_quantized(method, copy.deepcopy(model.denoiser), bits, scope, saved, bank.device)
            return denoiser, json.loads(facts_path.read_text())
        except Exception as e:  # truncated or foreign file: recalibrate rather than fail every rerun
            saved.replace(saved.with_name(saved.name + ".corrupt"))
            print(f"warning: {saved} did not load ({type(e).__name__}: {e}); moved aside, calibrating again")
    # The method quantizes a copy: the bank keeps the untouched FP denoiser for calibration and probes.
    result = method.quantize(copy.deepcopy(model.denoiser), bank, bits, scope, rdir / "artifacts")
    facts = dict(result.facts)
    if method.quantizes:
        save_quantized(result, saved)
    if "coverage" in facts:  # the per-layer bit report, logged with the run as an artifact
        write_json_atomic(rdir / "artifacts" / "coverage.json", facts["coverage"])
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
    from harness.metrics.fidelity import data_intervals
    from harness.results import save_features, save_replicates

    if features is None:
        features = sample_features(images, spec.extractor, opts.device, opts.inception_weights)
    rdir = run_dir(spec, opts.out)
    save_features(rdir, features)  # kept: the FP comparison (fid_fp) and later fill-ins need no re-extraction
    metrics = metrics_from_features(features, reference=spec.reference, device=opts.device,
                                    inception_weights=opts.inception_weights)
    intervals, replicates = data_intervals(features, metrics, reference=spec.reference,
                                           inception_weights=opts.inception_weights)
    metrics.update(intervals)
    cond_fn = model.extra.get("cond_fn")
    if opts.clip_model and hasattr(cond_fn, "caption"):  # text-to-image: each image with its own caption
        from harness.metrics.clip import clip_score_metrics

        captions = [cond_fn.caption(s) for s in eval_seeds(spec.seed, 0, len(images))]
        metrics.update(clip_score_metrics(images, captions, opts.clip_model, opts.device, replicates))
    save_replicates(rdir, replicates)
    metrics.update(paired_to_reference(spec, images, opts.out, features, opts))  # {} while FP is still sampling
    probe_seed_base = spec.seed * EVAL_SEED_STRIDE
    probe_bank = _bank(model, schedule, spec, opts, seed_base=probe_seed_base)
    probe = probe_bank.trajectories(min(PROBE_IMAGES, spec.num_samples))
    assert eval_seeds(spec.seed, 0, 1)[0] == probe_seed_base  # the probe images are the first eval images
    metrics["paired/eps_mse"] = eps_mse(denoiser, probe, opts.device)
    return metrics


def reference_record(spec: RunSpec, opts: RunOptions) -> dict:
    """Name, sha256 and provenance of the reference statistics each of the run's networks scores against."""
    from harness.metrics import resolve_reference
    from harness.preflight import scoring_networks

    return {net: resolve_reference(spec.reference or "cifar10-test", net, opts.inception_weights).describe()
            for net in scoring_networks(spec, opts.inception_weights)}


def record_failure(results: dict, error: BaseException) -> None:
    """Mark an attempt failed, with the error and its traceback (the sweep goes on)."""
    results["status"] = "failed"
    results["error"] = f"{type(error).__name__}: {error}"
    results["traceback"] = "".join(traceback.format_exception(error))


def load_stage(spec: RunSpec, opts: RunOptions):
    """The spec's FP model, its sampling schedule and its calibration trajectory bank."""
    torch.manual_seed(spec.seed)
    model = load_model(_model_spec(spec), spec.model_path, opts.device, captions=spec.captions)
    schedule = make_schedule(model, spec.steps, spec.spacing, clip_sample=spec.clip_sample)
    return model, schedule, _bank(model, schedule, spec, opts)


@dataclass
class Prepared:
    """What a run samples and scores with, once its model is loaded and quantized."""

    model: object
    schedule: object
    bank: TrajectoryBank
    denoiser: object
    facts: dict
    seconds: float


def _prepare(spec: RunSpec, opts: RunOptions, rdir: Path) -> Prepared:
    """Check that the run can be scored, load the model and its schedule, quantize it (or reload the
    quantized state), and check its first denoiser call on the run's own first images is finite."""
    from harness.preflight import caption_problems, metric_problems

    # the driver checked too; this is the scorer
    problems = metric_problems([spec], opts.inception_weights) + caption_problems([spec])
    if problems:
        raise MetricSetupError(problems[0])
    t = time.perf_counter()
    model, schedule, bank = load_stage(spec, opts)
    denoiser, facts = _quantize(spec, model, bank, rdir)
    check_first_call(spec, model, schedule, denoiser, opts.device)
    return Prepared(model, schedule, bank, denoiser, facts, time.perf_counter() - t)


@torch.no_grad()
def check_first_call(spec: RunSpec, model, schedule, denoiser, device) -> None:
    """The first sampler step on the run's first images, under hooks: a NaN/Inf output fails the run,
    naming the first layer that produced it, before any sample is drawn."""
    from harness.calibration import first_images
    from harness.finite import check_finite_output
    from methods.envelope import module_of
    from methods.quant.timestep import timestep_context

    x, cond = first_images(model, spec.seed, min(PROBE_IMAGES, spec.num_samples), device)
    t0 = int(schedule.timesteps[0])
    t = torch.full((x.shape[0],), t0, dtype=torch.long, device=device)

    def call():
        with timestep_context(0, t0, schedule.num_steps):
            return denoiser(x, t, cond)

    check_finite_output(call, module_of(denoiser), f"{spec.model} {spec.method} {spec.bits}")


def run_one(spec: RunSpec, opts: RunOptions, rank: int = 0, world: int = 1) -> dict | None:
    """Run (or resume) one spec on ``world`` ranks; failures are recorded, not raised.

    One pipeline for one process and for a torchrun job: rank 0 prepares first (calibration
    happens once, the others reload its saved state), every rank samples its own shards, and
    rank 0 scores and writes ``results.json``. With ``world > 1`` the ranks extract the metric
    features of their own shards and rank 0 scores the gathered features
    (:mod:`harness.distributed`). Returns the results on rank 0, ``None`` on the others.
    """
    from harness import distributed as D

    t0 = time.perf_counter()
    rdir = run_dir(spec, opts.out)
    existing = read_results(rdir)
    if existing and existing.get("status") == "complete":
        D.barrier()
        return existing if rank == 0 else None
    rdir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        record_weights(spec, rdir)  # before any sample: a rerun on other weights is refused (harness.weights_record)
    error: BaseException | None = None
    prepared: Prepared | None = None
    for turn in (0, 1):  # rank 0 calibrates and saves, then the other ranks reload what it saved
        if (rank == 0) == (turn == 0):
            try:
                prepared = _prepare(spec, opts, rdir)
            except Exception as e:  # recorded by rank 0 below
                error = e
        D.barrier()

    t = time.perf_counter()
    made = 0
    store = ShardStore(rdir / "samples", spec.num_samples)
    engine: dict = {}
    if prepared is not None:
        p = prepared
        try:
            p.denoiser, engine = sampling_form(p.denoiser, p.model, p.schedule, spec.seed, opts.device)
            desc = f"{spec.method} {spec.bits}" + (f" r{rank}/{world}" if world > 1 else "")
            made = generate_samples(p.model, p.denoiser, p.schedule, spec.sampler, spec.eta, spec.seed, store,
                                    opts.device, opts.batch_size, rank, world, desc=desc)
        except Exception as e:
            error = e
    sample_seconds = time.perf_counter() - t
    D.barrier()  # every rank's shards are on disk
    total_made = D.gather_count(made)
    t = time.perf_counter()
    gathered = None
    if world > 1:
        try:  # collective on every rank; raises on rank 0 only
            gathered = D.gather_features(store, rank, world, spec.extractor, opts.device, opts.inception_weights,
                                         failed=error)
        except Exception as e:
            error = error or e  # rank 0's own earlier error keeps its traceback
        if rank != 0:
            D.barrier()
            return None

    results = new_results(spec, rdir)
    results["timings"]["sample_seconds"] = sample_seconds
    try:
        if prepared is not None:
            results["facts"] = dict(prepared.facts) | engine
            results["reference"] = reference_record(spec, opts)
            results["model_fingerprint"] = prepared.bank.fingerprint  # sha256 of the FP weights this run quantized
            results["timings"]["calib_seconds"] = float(prepared.facts.get("calib_seconds", prepared.seconds))
        if error is not None:
            raise error
        images = store.load_all()
        save_grid(images, rdir / "samples_grid.png")
        features = None
        if gathered is not None:
            features, by_rank = gathered
            results["facts"]["metrics_gathered"] = "features"
            results["facts"]["feature_shards_by_rank"] = {str(r): shards for r, shards in by_rank.items()}
            results["facts"]["world_size"] = world
        t = time.perf_counter() if gathered is None else t  # with ranks: features (all ranks) + scoring
        p = prepared
        results["metrics"] = score(spec, opts, p.model, p.schedule, p.denoiser, images, features)
        results["timings"]["metric_seconds"] = time.perf_counter() - t
        results["status"] = "complete"
    except Exception as e:  # recorded; the sweep goes on
        record_failure(results, e)
    results["facts"]["images_generated_this_attempt"] = total_made
    results["timings"]["total_seconds"] = time.perf_counter() - t0
    write_json_atomic(rdir / "results.json", results)
    D.barrier()
    return results


def paired_to_reference(spec: RunSpec, images: np.ndarray, out: Path, features: dict | None = None,
                        opts: RunOptions | None = None) -> dict[str, float]:
    """The fidelity metrics against the FP run of the same seeds (``paired/mse``, ``paired/psnr``,
    ``paired/ssim``, ``paired/lpips/<backbone>`` with ``opts.lpips_weights``, ``fid_fp/<net>``,
    ``kid_fp/<net>``, each with its interval; replicates saved to ``bootstrap.npz``), or ``{}`` while
    the FP samples are incomplete (one array job runs both at once; the driver fills them in later
    with :func:`add_paired_metrics`). ``features``: this run's, else read from ``features.npz`` (or
    extracted again when that file is missing or damaged)."""
    from harness.metrics.fidelity import fidelity_metrics
    from harness.results import save_replicates

    rdir = run_dir(spec, out)
    if spec.method == "fp":
        ref_images, ref_dir = images, rdir
    else:
        ref_dir = run_dir(spec.fp_reference(), out)
        ref = ShardStore(ref_dir / "samples", spec.num_samples)
        if not ref.complete:
            return {}
        ref_images = ref.load_all()
    features = features if features is not None else _run_features(spec, rdir, images, opts)
    ref_features = features if spec.method == "fp" else _run_features(spec, ref_dir, ref_images, opts)
    lpips_model = _lpips(opts.lpips_weights) if opts is not None and opts.lpips_weights else None
    metrics, replicates = fidelity_metrics(images, ref_images, features, ref_features, lpips_model)
    save_replicates(rdir, replicates)
    return metrics


def _run_features(spec: RunSpec, rdir: Path, images: np.ndarray, opts: RunOptions | None) -> dict:
    """The features a run saved when scored; extracted again (and saved) when missing or damaged."""
    from harness.metrics import sample_features
    from harness.results import load_features, save_features

    found = load_features(rdir, len(images))
    if found is not None:
        return found
    device = opts.device if opts is not None else "cpu"
    weights = opts.inception_weights if opts is not None else None
    features = sample_features(images, spec.extractor, device, weights)
    save_features(rdir, features)
    return features


_LPIPS_CACHE: dict[str, object] = {}


def _lpips(path: str):
    if path not in _LPIPS_CACHE:
        from harness.metrics.fidelity import load_lpips

        _LPIPS_CACHE[path] = load_lpips(path)
    return _LPIPS_CACHE[path]


def needs_paired(spec: RunSpec, out: Path) -> bool:
    """A complete run still without its paired metrics."""
    return _lacks_paired(read_results(run_dir(spec, out)))


def _lacks_paired(res: dict | None) -> bool:
    metrics = res.get("metrics", {}) if res is not None else {}
    # paired/ssim arrived with the fidelity metrics: a run scored before them gets them on the next sweep
    return res is not None and res.get("status") == "complete" and not {"paired/mse", "paired/ssim"} <= set(metrics)


def add_paired_metrics(spec: RunSpec, out: Path, opts: RunOptions | None = None) -> bool:
    """Driver side: add the paired metrics to a complete run whose FP reference finished after it.
    Returns whether ``results.json`` was updated (atomically)."""
    rdir = run_dir(spec, out)
    res = read_results(rdir)
    if not _lacks_paired(res):
        return False
    images = ShardStore(rdir / "samples", spec.num_samples).load_all()
    paired = paired_to_reference(spec, images, out, opts=opts)
    if not paired:
        return False
    res["metrics"].update(paired)
    write_json_atomic(rdir / "results.json", res)
    return True
