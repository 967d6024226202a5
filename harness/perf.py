"""``bench perf``: where the time and memory go, measured on one device in one process.

Sampling mode (:func:`run_perf`) measures, for one model:

* FP sampling throughput (images/s at ``steps`` sampler steps, decode included);
* fake-quant sampling throughput of every method at every bit-width, in two modes:
  ``eager`` (the method's QuantLayers as calibrated) and
  ``fast`` (:func:`methods.quant.fast.fast_denoiser`: FastQuantLayers, optionally bf16
  autocast and ``torch.compile``; in fp32 the form runs sample with, :mod:`harness.sampling_form`),
  each with its time ratio to FP in the same mode;
* peak GPU memory of each (weights of that denoiser + the sampling peak above what was
  resident before; ``nan`` on CPU) and its ratio to FP;
* calibration wall time per method, preset and bit-width (the trajectory bank is filled
  first and timed as its own row, so no method pays for it);
* feature-extraction throughput of the metric network (CifarNet).

Default mode (:func:`run_default_perf`) runs the default sweep (``bench run`` smoke
protocol) into a scratch directory and tabulates the ``timings`` of every ``results.json``
(calibration / sampling / metrics / total) next to the wall time of each run.

Both return a pandas DataFrame; :func:`log_table` mirrors it into MLflow (one run in the
``dmqbench-perf`` experiment: a metric per cell, the table as CSV and Markdown artifacts).
"""

from __future__ import annotations

import copy
import math
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

PERF_EXPERIMENT = "dmqbench-perf"
COLUMNS = ["kind", "method", "bits", "preset", "mode", "images_per_s", "time_ratio_vs_fp", "peak_mem_mib",
           "mem_ratio_vs_fp", "seconds", "rel_err_vs_eager"]


@dataclass
class PerfConfig:
    model: str = "tiny-cifar10"
    model_path: str | None = None
    device: str = "auto"
    batch_size: int = 64
    steps: int = 20
    methods: Sequence[str] = ("all",)
    bits: Sequence[str] = ("w8a8", "w4a8")
    presets: Sequence[str] = ("fast",)
    dtype: str = "auto"  # fast mode: auto = bf16 on CUDA, fp32 on CPU
    compile: str = "auto"  # fast mode: auto = torch.compile on CUDA only
    repeats: int = 1
    metric_images: int = 512
    cache_dir: str | None = None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct tensors (parameters and buffers) a module holds."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def time_sampling(model, denoiser, schedule, sampler: str, eta: float, batch_size: int, device: str,
                  repeats: int = 1) -> dict[str, float]:
    """images/s and peak memory of sampling ``batch_size`` images (one warm-up batch first)."""
    from harness.generate import sample_images

    seeds = list(range(batch_size))
    sample_images(model, denoiser, schedule, sampler, eta, seeds, device)  # warm-up (and compilation)
    cuda = device.startswith("cuda")
    if cuda:
        _sync(device)
        base = torch.cuda.memory_allocated(torch.device(device))
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    _sync(device)
    t0 = time.perf_counter()
    for r in range(repeats):
        sample_images(model, denoiser, schedule, sampler, eta, [s + r * batch_size for s in seeds], device)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = math.nan
    if cuda:
        extra = torch.cuda.max_memory_allocated(torch.device(device)) - base
        peak = (extra + module_bytes(denoiser.unet)) / 2**20
    return {"images_per_s": batch_size * repeats / seconds, "seconds": seconds, "peak_mem_mib": peak}


def _method_names(names: Sequence[str]) -> list[str]:
    import methods

    if list(names) in (["all"], []):
        return [n for n in methods.names() if methods.get(n).quantizes]
    return [n for n in names if methods.get(n).quantizes]


def _fast_options(cfg: PerfConfig, device: str) -> tuple[str, bool]:
    cuda = device.startswith("cuda")
    dtype = ("bf16" if cuda else "fp32") if cfg.dtype == "auto" else cfg.dtype
    compile_ = cuda if cfg.compile == "auto" else cfg.compile in ("on", "true", "1", "yes")
    return dtype, compile_


def metric_throughput(device: str, n: int, batch_size: int) -> dict[str, float]:
    """CifarNet feature extraction (the metrics' network) on ``n`` random 32x32 uint8 images."""
    from harness.metrics import LAYERS, extract_features

    images = np.random.default_rng(0).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    layers = sorted(set(LAYERS["cifarnet"].values()))
    extract_features(images[: min(n, batch_size)], "cifarnet", layers, device, batch_size)  # warm-up / load
    _sync(device)
    t0 = time.perf_counter()
    extract_features(images, "cifarnet", layers, device, batch_size)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"images_per_s": n / seconds, "seconds": seconds}


def run_perf(cfg: PerfConfig, echo: Callable[[str], None] = print) -> pd.DataFrame:
    """The sampling-mode table (see the module docstring).

    Models, schedules, calibration banks and method configs come from the run pipeline's own stages
    (:func:`harness.spec.expand`, :func:`harness.runner.load_stage`, :func:`harness.runner.method_for`),
    so what is timed here is what a ``bench run`` of the same sweep quantizes and samples.
    """
    from harness.runner import RunOptions, load_stage, method_for
    from harness.spec import expand
    from methods.quant.fast import fast_denoiser

    device = resolve_device(cfg.device)
    rows: list[dict] = []
    tmp = tempfile.TemporaryDirectory(prefix="dmqbench-perf-")
    cache = cfg.cache_dir or tmp.name
    names = _method_names(cfg.methods)
    model_text = None if cfg.model == "local" else cfg.model
    sweeps = {preset: expand(",".join(names) or "fp", model_text, ",".join(cfg.bits), [0], "smoke", preset, "uniform",
                             None, cfg.steps, cfg.model_path) for preset in cfg.presets}
    fp_spec = sweeps[cfg.presets[0]][0]
    model, schedule, bank = load_stage(fp_spec, RunOptions(out=Path(cache), device=device,
                                                           batch_size=cfg.batch_size))
    spec_name, sampler, eta = fp_spec.model, fp_spec.sampler, fp_spec.eta
    dtype, compile_ = _fast_options(cfg, device)
    rows: list[dict] = []
    tmp = tempfile.TemporaryDirectory(prefix="dmqbench-perf-")
    cache = cfg.cache_dir or tmp.name

    def add(**row) -> None:
        rows.append(row)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items() if v not in (None, "")}
        echo("  " + ", ".join(f"{k}={v}" for k, v in shown.items()))

    def rel_err(denoiser, fast) -> float:
        """Relative L2 deviation of the fast denoiser's output from the eager fp32 one (first step)."""
        from harness.calibration import initial_noise_and_cond
        from methods.quant.timestep import timestep_context

        x, cond, _ = initial_noise_and_cond(model, list(range(min(cfg.batch_size, 8))))
        t0 = int(schedule.timesteps[0])
        t = torch.full((x.shape[0],), t0, device=device)
        with torch.no_grad(), timestep_context(0, t0, schedule.num_steps):
            c = cond.to(device) if cond is not None else None
            a, b = denoiser(x.to(device), t, c).float(), fast(x.to(device), t, c).float()
        return float((a - b).norm() / a.norm().clamp_min(1e-12))

    def sample_rows(method: str, bits: str, preset: str, denoiser) -> None:
        add(kind="sampling", method=method, bits=bits, preset=preset, mode="eager",
            **time_sampling(model, denoiser, schedule, sampler, eta, cfg.batch_size, device, cfg.repeats))
        fast, report = fast_denoiser(denoiser, dtype=dtype, compile=False, timesteps=schedule.timesteps)
        err = rel_err(denoiser, fast)
        del fast
        fast, report = fast_denoiser(denoiser, dtype=dtype, compile=compile_, inplace=method != "fp",
                                     timesteps=schedule.timesteps)
        if report["skipped"]:
            echo(f"  {method} {bits}: {report['skipped']} layers not convertible, left eager")
        add(kind="sampling", method=method, bits=bits, preset=preset, mode=f"fast-{dtype}" + ("-compiled" * compile_),
            **time_sampling(model, fast, schedule, sampler, eta, cfg.batch_size, device, cfg.repeats),
            rel_err_vs_eager=err)
        del fast
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    echo(f"bench perf: {spec_name} on {device} ({device_name(device)}), batch {cfg.batch_size}, "
         f"{cfg.steps} {sampler} steps, fast mode {dtype}{' + torch.compile' if compile_ else ''}")
    try:
        sample_rows("fp", "fp", "", model.denoiser)
        for preset, specs in sweeps.items():
            quantized = [sp for sp in specs if sp.method != "fp"]
            need = max([sp.method_config.get("calib_images", 0) for sp in quantized] or [0])
            if need:
                t0 = time.perf_counter()
                bank.trajectories(need)
                add(kind="trajectory-bank", method="fp", bits="fp", preset=preset, mode=f"{need} images",
                    seconds=time.perf_counter() - t0)
            for sp in quantized:
                method, scope, bits = method_for(sp)
                art = Path(cache) / "artifacts" / f"{sp.method}-{sp.bits}-{preset}"
                _sync(device)
                t0 = time.perf_counter()
                result = method.quantize(copy.deepcopy(model.denoiser), bank, bits, scope, art)
                _sync(device)
                add(kind="calibration", method=sp.method, bits=sp.bits, preset=preset, mode="wall",
                    seconds=time.perf_counter() - t0)
                if preset == cfg.presets[0]:  # sampling speed depends on the quantizers, not the preset
                    sample_rows(sp.method, sp.bits, preset, result.denoiser)
                del result
        if cfg.metric_images > 0:
            try:
                add(kind="metric-features", method="cifarnet", bits="", preset="", mode="extract",
                    **metric_throughput(device, cfg.metric_images, max(cfg.batch_size, 64)))
            except Exception as e:  # the extractor's weights may be absent in a bare checkout
                echo(f"  metric-features skipped: {type(e).__name__}: {e}")
                add(kind="metric-features", method="cifarnet", bits="", preset="", mode=f"skipped ({type(e).__name__})")
    finally:
        tmp.cleanup()
    return _with_ratios(pd.DataFrame(rows))


def _with_ratios(df: pd.DataFrame) -> pd.DataFrame:
    for col in COLUMNS:
        if col not in df:
            df[col] = np.nan if col in ("images_per_s", "time_ratio_vs_fp", "peak_mem_mib", "mem_ratio_vs_fp",
                                        "seconds", "rel_err_vs_eager") else ""
    sampling = df["kind"] == "sampling"
    for mode in df.loc[sampling, "mode"].unique():
        in_mode = sampling & (df["mode"] == mode)
        fp = df[in_mode & (df["method"] == "fp")]
        if fp.empty:
            continue
        df.loc[in_mode, "time_ratio_vs_fp"] = fp["images_per_s"].iloc[0] / df.loc[in_mode, "images_per_s"]
        df.loc[in_mode, "mem_ratio_vs_fp"] = df.loc[in_mode, "peak_mem_mib"] / fp["peak_mem_mib"].iloc[0]
    return df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]


def run_default_perf(out: str | Path | None = None, models: str = "tiny-cifar10", methods_: str = "all",
                     bits: str = "w8a8,w4a8", device: str = "auto", batch_size: int = 64,
                     num_samples: int | None = None, steps: int | None = None,
                     echo: Callable[[str], None] = print) -> pd.DataFrame:
    """Run the default sweep (smoke protocol) into ``out`` (default: a scratch dir) and tabulate its timings."""
    from harness.runner import RunOptions, run_one
    from harness.spec import expand

    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="dmqbench-perf-default-")
        out = tmp.name
    device = resolve_device(device)
    specs = expand(methods_, models, bits, [0], "smoke", None, "uniform", num_samples, steps)
    opts = RunOptions(out=Path(out), device=device, batch_size=batch_size)
    rows = []
    try:
        for spec in specs:
            t0 = time.perf_counter()
            res = run_one(spec, opts)
            wall = time.perf_counter() - t0
            tm = res.get("timings", {})
            rows.append({"model": spec.model, "method": spec.method, "bits": spec.bits, "status": res.get("status"),
                         "num_samples": spec.num_samples, "steps": spec.steps,
                         **{k: float(tm.get(k, math.nan)) for k in
                            ("calib_seconds", "sample_seconds", "metric_seconds", "total_seconds")},
                         "wall_seconds": wall, "error": res.get("error", "")})
            echo(f"  {spec.run_name}: {res.get('status')} in {wall:.1f}s")
    finally:
        if tmp is not None:
            tmp.cleanup()
    df = pd.DataFrame(rows)
    if not df.empty:
        total = {c: df[c].sum() for c in ("calib_seconds", "sample_seconds", "metric_seconds", "total_seconds",
                                           "wall_seconds")}
        df = pd.concat([df, pd.DataFrame([{"model": "ALL", "method": "sum", "bits": "", "status": "", **total}])],
                       ignore_index=True)
    return df


def format_table(df: pd.DataFrame) -> str:
    return df.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")


def _metric_key(*parts: str) -> str:
    key = "/".join(str(p) for p in parts if str(p))
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def log_table(df: pd.DataFrame, tracking_uri: str, run_name: str, params: dict, key_cols: Sequence[str],
              value_cols: Sequence[str]) -> str:
    """One MLflow run in ``dmqbench-perf``: a metric per (row key, value column), the table as artifacts."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(PERF_EXPERIMENT)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        metrics = {}
        for _, row in df.iterrows():
            for col in value_cols:
                v = row.get(col)
                if isinstance(v, int | float | np.floating) and np.isfinite(v):
                    metrics[_metric_key(*(row[k] for k in key_cols), col)] = float(v)
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_text(df.to_csv(index=False), "perf.csv")
        mlflow.log_text(df.to_markdown(index=False), "perf.md")
        return run.info.run_id


def perf_params(cfg: PerfConfig, device: str) -> dict:
    return {**asdict(cfg), "resolved_device": device,
            "device_name": device_name(device), "torch": torch.__version__, "cpu": cpu_name(),
            "cuda": torch.version.cuda or "none"}
