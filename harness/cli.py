"""``bench``: the command line (click).

    bench run [--methods all] [--models tiny-cifar10] [--bits w8a8,w4a8] ...
    bench ls methods|models
    bench leaderboard --out DIR [--dest DIR]
    bench train model tiny-cifar10 --data PATH | bench train extractor cifarnet --data PATH

Bad input exits 2 with one line naming the problem and the fix, before anything is
written (harness/preflight.py); a sweep in which some run failed exits 1 after finishing
the others (a full disk stops it, with one line); Ctrl-C exits 130 (rerun to resume).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

DEFAULT_OUT = "runs"
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130


class BadInput(click.UsageError):
    """Exit 2 with exactly one line on stderr: ``bench <command>: <problem>: <fix>``."""

    def show(self, file=None) -> None:
        name = self.ctx.command_path if self.ctx is not None else "bench"
        click.echo(f"{name}: {' '.join(self.format_message().split())}", err=True, file=file)


class OneLineErrors(click.Command):
    """A command whose option-parsing errors (``--num-samples abc``) are one line too, not click's usage block."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            if isinstance(e, BadInput):
                raise
            raise BadInput(f"{e.format_message()} (see bench {info_name} -h)", ctx=e.ctx) from None


def _fail(message: str, code: int) -> None:
    click.echo(f"bench run: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


class HeldWarnings:
    """Warnings raised while a sweep is checked (e.g. "these Inception weights are not the published ones")
    are held: shown once the checks pass (:meth:`release`), dropped when bad input exits 2 with its one line."""

    def __enter__(self) -> HeldWarnings:
        self._cm = warnings.catch_warnings(record=True)
        self.caught = self._cm.__enter__()
        return self

    def release(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None
            for w in self.caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def __exit__(self, *exc) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)
            self._cm = None


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """dmqbench: post-training quantization of diffusion models, benchmarked under one protocol."""


@main.command(cls=OneLineErrors)
@click.option("--methods", "methods_", default="all", show_default=True, help="'all' or a comma list (bench ls)")
@click.option("--models", default=None, help="comma list of zoo models (bench ls models) [default: tiny-cifar10]")
@click.option("--bits", default="w8a8,w4a8", show_default=True, help="comma list of wXaY")
@click.option("--seeds", default="0", show_default=True, help="comma list of run seeds")
@click.option("--protocol", default="smoke", show_default=True, help="smoke | paper")
@click.option("--preset", default=None, help="paper | fast (default: the protocol's)")
@click.option("--scope", default="uniform", show_default=True, help="uniform | paper: which layers are quantized")
@click.option("--method-args", "method_args", multiple=True, metavar="METHOD:KEY=VALUE,...",
              help="override config fields of one method (repeatable), e.g. adpdm:lr=0; the row shows adpdm[lr=0.0]")
@click.option("--num-samples", type=int, default=None, help="override the protocol's sample count")
@click.option("--steps", type=int, default=None, help="override the protocol's sampler steps")
@click.option("--model-path", type=click.Path(), default=None, help="a local diffusers pipeline directory")
@click.option("--out", default=DEFAULT_OUT, show_default=True, type=click.Path(), help="output directory")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--batch-size", type=int, default=64, show_default=True, help="does not change the samples")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///OUT/mlflow.db)")
@click.option("--inception-weights", type=click.Path(), default=None, help="torch-fidelity Inception weights file")
@click.option("--reference", default=None,
              help="reference statistics to score against: a name (bench ref ls) or a .npz [default: the model's]")
@click.option("--lpips-weights", type=click.Path(), default=None,
              help="local LPIPS state dict (backbone + linear layers): adds paired/lpips/<backbone>")
@click.option("--captions", type=click.Path(), default=None,
              help="text-to-image models: caption file, one per line; image i uses line i mod N (docs/zoo.md)")
@click.option("--clip-model", type=click.Path(), default=None,
              help="local CLIP directory (save_pretrained layout): adds clip_score/<DIR name> to text-to-image runs")
@click.option("--executor", type=click.Choice(["local", "gpus", "slurm"]), default="local", show_default=True,
              help="local: in sequence; gpus: one job per visible GPU; slurm: an array job through submitit")
@click.option("--slurm-partition", default=None, help="slurm: partition")
@click.option("--slurm-time", type=int, default=240, show_default=True, help="slurm: minutes per job")
@click.option("--slurm-gpus", type=int, default=1, show_default=True, help="slurm: GPUs per job (0 for CPU jobs)")
@click.option("--slurm-parallelism", type=int, default=16, show_default=True, help="slurm: array jobs at once")
def run(methods_, models, bits, seeds, protocol, preset, scope, num_samples, steps, model_path, out, device,
        batch_size, tracking_uri, inception_weights, executor, slurm_partition, slurm_time, slurm_gpus,
        slurm_parallelism, lpips_weights=None, reference=None, captions=None, clip_model=None, method_args=()) -> None:
    """Run every method x model x bit-width under one protocol; resume what is done."""
    try:
        with HeldWarnings() as held:
            _run(methods_, models, bits, seeds, protocol, preset, scope, num_samples, steps, model_path, out, device,
                 batch_size, tracking_uri, inception_weights, executor, slurm_partition, slurm_time, slurm_gpus,
                 slurm_parallelism, lpips_weights, reference, captions, clip_model, held, method_args)
    except KeyboardInterrupt:
        _fail("interrupted: complete runs and sample shards are kept; rerun the same command to resume",
              EXIT_INTERRUPTED)


def _run(methods_, models, bits, seeds, protocol, preset, scope, num_samples, steps, model_path, out, device,
         batch_size, tracking_uri, inception_weights, executor, slurm_partition, slurm_time, slurm_gpus,
         slurm_parallelism, lpips_weights=None, reference=None, captions=None, clip_model=None,
         held: HeldWarnings | None = None, method_args=()) -> None:
    from harness.preflight import PreflightError, PreflightOptions, parse_device, preflight
    from harness.runner import RunOptions
    from harness.spec import SpecError, expand
    from harness.sweep import SweepLocked, run_sweep
    from harness.tracking import StoreError, default_tracking_uri, is_disk_full

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise BadInput(f"--seeds must be a comma list of integers, got {seeds!r}") from None
    for flag, value, least in (("--num-samples", num_samples, 1), ("--steps", steps, 1),
                               ("--batch-size", batch_size, 1), ("--slurm-time", slurm_time, 1),
                               ("--slurm-gpus", slurm_gpus, 0), ("--slurm-parallelism", slurm_parallelism, 1)):
        if value is not None and value < least:
            raise BadInput(f"{flag} must be at least {least} (got {value})"
                           + (f": leave {flag} out for the protocol's value" if flag in ("--num-samples", "--steps")
                              else ""))
    try:
        parse_device(device)
    except PreflightError as e:
        raise BadInput(str(e)) from None
    if model_path:
        unet = Path(model_path) / "unet"
        missing = ("unet/config.json" if not (unet / "config.json").is_file()
                   else "unet/*.safetensors" if not any(unet.glob("*.safetensors")) else None)
        if missing:
            raise BadInput(f"--model-path {model_path} is not a diffusers pipeline directory (no {missing}): "
                           "save one with pipeline.save_pretrained(DIR)")
    try:
        specs = expand(methods_, models, bits, seed_list, protocol, preset, scope, num_samples, steps, model_path,
                       reference, captions, method_args)
    except SpecError as e:
        raise BadInput(str(e)) from None
    if inception_weights:
        from harness.metrics import validate_inception_weights

        try:
            validate_inception_weights(inception_weights)
        except ValueError as e:
            raise BadInput(str(e)) from None
    if lpips_weights:
        from harness.metrics.fidelity import load_lpips

        try:
            load_lpips(lpips_weights)
        except ValueError as e:
            raise BadInput(str(e)) from None
    out_dir = Path(out)
    try:
        preflight(specs, PreflightOptions(out=out_dir, device=device, tracking_uri=tracking_uri, executor=executor,
                                          batch_size=batch_size, inception_weights=inception_weights,
                                          clip_model=clip_model))
    except PreflightError as e:
        raise BadInput(str(e)) from None
    from harness.executors import make_executor

    try:
        runner = make_executor(executor, out_dir=out_dir, partition=slurm_partition, time_minutes=slurm_time,
                               gpus=slurm_gpus, parallelism=slurm_parallelism)
    except click.UsageError as e:
        raise BadInput(e.format_message()) from None
    # Everything is checked: from here on files are written.
    if held is not None:
        held.release()
    out_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or default_tracking_uri(out_dir)
    opts = RunOptions(out=out_dir, device=_device(device), batch_size=batch_size, inception_weights=inception_weights,
                      lpips_weights=lpips_weights, clip_model=clip_model)
    click.echo(f"dmqbench: {len(specs)} runs ({protocol} protocol) -> {out_dir}")
    try:
        outcome = run_sweep(specs, opts, uri, {"methods": methods_, "models": models, "bits": bits, "seeds": seeds,
                                                "protocol": protocol, "preset": preset, "scope": scope}, runner)
    except SweepLocked as e:
        _fail(str(e), EXIT_BAD_INPUT)
    except StoreError as e:
        _fail(str(e), EXIT_FAILED)
    except Exception as e:
        if not is_disk_full(e):
            raise
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        if "database or disk is full" in str(e):
            msg = (f"disk full writing the MLflow store {uri}: free space there (complete runs are kept in "
                   f"{out_dir / 'runs'}), then rerun the same command to resume")
        _fail(msg, EXIT_FAILED)
    click.echo(f"done: {len(outcome.completed)} ran, {len(outcome.skipped)} already complete, "
               f"{len(outcome.failed)} failed")
    for name, err in outcome.failed:
        click.echo(f"  FAILED {name}: {' '.join(str(err).split())[:500]}", err=True)
    click.echo(f"results: {out_dir / 'runs'}  |  table: bench leaderboard --out {out_dir}")
    click.echo(f"MLflow UI: mlflow ui --backend-store-uri {uri}")
    sys.exit(0 if outcome.ok else EXIT_FAILED)


@main.command(name="ls")
@click.argument("what", type=click.Choice(["methods", "models"]))
def ls(what: str) -> None:
    """List registered methods or zoo models."""
    if what == "methods":
        import methods

        for name in methods.names():
            cls = methods.get(name)
            doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
            click.echo(f"{name:12s} {doc[0] if doc else ''}")
    else:
        from models.registry import MODELS

        for _, spec in MODELS.items():
            click.echo(f"{spec.name:18s} {spec.source:9s} {spec.description}")


@main.command()
@click.option("--out", default=DEFAULT_OUT, show_default=True, type=click.Path(), help="the sweep's output directory")
@click.option("--dest", default=None, type=click.Path(), help="where to write the tables (default: OUT)")
@click.option("--tracking-uri", default=None, hidden=True,
              help="unused: the tables are read from OUT/runs/*/*/results.json (kept for old scripts)")
@click.option("--html", "html_", is_flag=True, help="also write leaderboard.html (tables, plots, samples; offline)")
def leaderboard(out: str, dest: str | None, tracking_uri: str | None, html_: bool = False) -> None:
    """Tabulate a sweep: a headline table and methods x bit-widths per metric, per model and protocol
    (Markdown + CSV), read from OUT/runs."""
    from harness.leaderboard import build

    out_dir = Path(out)
    if not (out_dir / "runs").is_dir():
        raise click.UsageError(f"no runs under {out_dir / 'runs'}: run `bench run --out {out}` first")
    try:
        md, md_path, csv_path = build(out_dir, Path(dest or out_dir))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(md)
    click.echo(f"\nwrote {md_path} and {csv_path}")
    if html_:
        from harness.html_report import write_html

        click.echo(f"wrote {write_html(out_dir, Path(dest or out_dir))}")


@main.group()
def train() -> None:
    """Train the embedded assets (tiny-cifar10 DDPM, cifarnet extractor)."""


def _mlflow_logger(experiment: str, run_name: str, params: dict):
    import mlflow

    mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_name=run_name)
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    return run, lambda metrics, step: mlflow.log_metrics(metrics, step=step)


@train.command(name="model")
@click.argument("name", type=click.Choice(["tiny-cifar10"]))
@click.option("--data", required=True, type=click.Path(exists=True), help="CIFAR-10 folder, .tar.gz or pickles")
@click.option("--out", default=None, type=click.Path(), help="default: models/assets/NAME")
@click.option("--minutes", type=float, default=20.0, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--ema-decay", type=float, default=0.995, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="continue from the weights already in OUT (steps and time add up)")
@click.option("--tracking-uri", default="sqlite:///training-mlflow.db", show_default=True)
def train_model(name, data, out, minutes, batch_size, lr, ema_decay, seed, resume, tracking_uri) -> None:
    """Train the embedded DDPM."""
    import mlflow

    from models.registry import ASSETS
    from models.train_unet import UNetTrainConfig, train_tiny_unet

    cfg = UNetTrainConfig(data=data, out=out or str(ASSETS / name), seed=seed, batch_size=batch_size, lr=lr,
                          ema_decay=ema_decay, max_minutes=minutes, cache_dir=str(Path.home() / ".cache" / "dmqbench"),
                          resume=resume)
    mlflow.set_tracking_uri(tracking_uri)
    run, log = _mlflow_logger("dmqbench-training", name, vars(cfg))
    with run:
        card = train_tiny_unet(cfg, log=log)
    click.echo(f"saved {cfg.out} after {card['steps']} steps ({card['wall_seconds']} s on {card['hardware']})")


@train.command(name="extractor")
@click.argument("name", type=click.Choice(["cifarnet"]))
@click.option("--data", required=True, type=click.Path(exists=True), help="CIFAR-10 folder, .tar.gz or pickles")
@click.option("--out", default=None, type=click.Path(), help="default: models/assets/NAME")
@click.option("--minutes", type=float, default=25.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tracking-uri", default="sqlite:///training-mlflow.db", show_default=True)
def train_extractor(name, data, out, minutes, seed, tracking_uri) -> None:
    """Train the CIFAR-10 feature network used by the metrics."""
    import mlflow

    from models.registry import ASSETS
    from models.train_cifarnet import train_cifarnet

    mlflow.set_tracking_uri(tracking_uri)
    run, log = _mlflow_logger("dmqbench-training", name, {"data": data, "minutes": minutes, "seed": seed})
    with run:
        card = train_cifarnet(data, out or str(ASSETS / name), seed=seed, max_minutes=minutes,
                              cache_dir=str(Path.home() / ".cache" / "dmqbench"), log=log)
    click.echo(f"saved {out or ASSETS / name}: {card}")


def _add_command_modules() -> None:
    """Every module in harness/commands/ that defines ``command`` (a click command) becomes a subcommand."""
    import importlib
    import pkgutil

    from harness import commands

    for info in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"harness.commands.{info.name}")
        if hasattr(module, "command"):
            main.add_command(module.command)


_add_command_modules()

if __name__ == "__main__":
    main()
