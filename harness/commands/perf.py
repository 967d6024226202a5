"""``bench perf [sampling|default]``: throughput, memory and calibration time on one device (harness/perf.py)."""

from __future__ import annotations

from pathlib import Path

import click


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


@click.command(name="perf")
@click.argument("mode", type=click.Choice(["sampling", "default"]), default="sampling", required=False)
@click.option("--model", default="tiny-cifar10", show_default=True, help="zoo model (bench ls models)")
@click.option("--model-path", type=click.Path(), default=None, help="a local diffusers pipeline directory")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=None,
              help="sampler steps [default: 20 for sampling; the smoke protocol's for default]")
@click.option("--methods", "methods_", default="all", show_default=True, help="'all' or a comma list")
@click.option("--bits", default="w8a8,w4a8", show_default=True, help="comma list of wXaY")
@click.option("--presets", default="fast", show_default=True, help="calibration presets to time (fast,paper)")
@click.option("--dtype", default="auto", show_default=True, help="fast mode: auto (bf16 on CUDA) | fp32 | bf16 | fp16")
@click.option("--compile", "compile_", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="fast mode: torch.compile the UNet (auto: on CUDA only)")
@click.option("--repeats", type=int, default=1, show_default=True, help="timed batches per configuration")
@click.option("--metric-images", type=int, default=512, show_default=True, help="images for the extractor timing")
@click.option("--num-samples", type=int, default=None, help="default mode: override the smoke sample count")
@click.option("--out", type=click.Path(), default=None, help="default mode: sweep output dir (default: scratch)")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///perf-mlflow.db)")
def command(mode, model, model_path, device, batch_size, steps, methods_, bits, presets, dtype, compile_, repeats,
            metric_images, num_samples, out, tracking_uri) -> None:
    """Measure FP vs fake-quant sampling speed and memory, calibration time and metric throughput.

    `bench perf` times sampling (images/s, ratio to FP, peak GPU memory) of every method at
    every bit-width, eager and fast (fused fake quant, bf16, torch.compile on CUDA), plus
    calibration per method and preset and the metric network. `bench perf default` runs the
    default sweep and tabulates its calibration / sampling / metric timings. Both print a
    table and log it to MLflow (experiment dmqbench-perf).
    """
    from harness import perf
    from harness.spec import SpecError, resolve_bits, resolve_methods

    if batch_size < 1 or (steps is not None and steps < 1) or repeats < 1:
        raise click.UsageError("--batch-size, --steps and --repeats must be at least 1")
    try:
        bit_list = resolve_bits(bits)
        method_list = resolve_methods(methods_)
    except SpecError as e:
        raise click.UsageError(str(e)) from None
    uri = tracking_uri or f"sqlite:///{Path('perf-mlflow.db').resolve()}"
    resolved = perf.resolve_device(device)
    if mode == "default":
        df = perf.run_default_perf(out, model, ",".join(method_list), ",".join(bit_list), resolved, batch_size,
                                   num_samples, steps, echo=click.echo)
        params = {"mode": "default", "model": model, "methods": methods_, "bits": bits, "device": resolved,
                  "device_name": perf.device_name(resolved), "batch_size": batch_size, "steps": steps,
                  "num_samples": num_samples}
        keys, values = ("model", "method", "bits"), ("calib_seconds", "sample_seconds", "metric_seconds",
                                                     "total_seconds", "wall_seconds")
    else:
        for p in _split(presets):
            if p not in ("fast", "paper"):
                raise click.UsageError(f"unknown preset {p!r}: use fast and/or paper")
        if dtype.lower() not in ("auto", "fp32", "float32", "none", "bf16", "bfloat16", "fp16", "float16"):
            raise click.UsageError(f"unknown --dtype {dtype!r}: use auto, fp32, bf16 or fp16")
        cfg = perf.PerfConfig(model=model, model_path=model_path, device=resolved, batch_size=batch_size,
                              steps=steps or 20,
                              methods=method_list, bits=bit_list, presets=_split(presets), dtype=dtype.lower(),
                              compile=compile_, repeats=repeats, metric_images=metric_images)
        try:
            df = perf.run_perf(cfg, echo=click.echo)
        except KeyError as e:
            raise click.UsageError(str(e.args[0])) from None
        params = {"mode": "sampling", **perf.perf_params(cfg, resolved)}
        keys, values = ("kind", "method", "bits", "preset", "mode"), ("images_per_s", "time_ratio_vs_fp",
                                                                      "peak_mem_mib", "mem_ratio_vs_fp", "seconds",
                                                                      "rel_err_vs_eager")
    click.echo("")
    click.echo(perf.format_table(df))
    run_id = perf.log_table(df, uri, f"perf-{mode}-{model}-{resolved}", params, keys, values)
    click.echo(f"\nlogged to MLflow {uri} (experiment {perf.PERF_EXPERIMENT}, run {run_id})")
