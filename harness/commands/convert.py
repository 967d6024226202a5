"""``bench convert``: turn original checkpoints into pipeline directories that ``--model-path`` loads.

    bench convert compvis --ckpt model.ckpt --config cin256-v2.yaml --out ldm-imagenet [--model ldm-imagenet]

Bad input (missing file, wrong checkpoint layout, unsupported config, a non-empty --out) exits 2
with one line on stderr naming the problem; nothing is written.
"""

from __future__ import annotations

import sys

import click


@click.group(name="convert")
def command() -> None:
    """Convert original checkpoints to diffusers pipeline directories (for --model-path)."""


@command.command(name="compvis")
@click.option("--ckpt", required=True, type=click.Path(), help="CompVis latent-diffusion model.ckpt")
@click.option("--config", "config", required=True, type=click.Path(),
              help="its YAML (CompVis/latent-diffusion configs/latent-diffusion/*.yaml)")
@click.option("--out", required=True, type=click.Path(), help="the pipeline directory to write (new or empty)")
@click.option("--model", default=None,
              help="zoo entry the checkpoint is for (ldm-lsun-church, ldm-lsun-bedroom, ldm-imagenet, ldm-celebahq): "
                   "checks that the config has that architecture")
@click.option("--ema/--no-ema", default=True, show_default=True,
              help="use the checkpoint's EMA weights when it has them (as CompVis' sampling scripts do)")
def compvis(ckpt: str, config: str, out: str, model: str | None, ema: bool) -> None:
    """CompVis latent-diffusion .ckpt + YAML -> diffusers pipeline directory (docs/zoo.md)."""
    from models.convert_compvis import ConvertError, convert

    try:
        path = convert(ckpt, config, out, model=model, ema=ema)
    except ConvertError as e:
        click.echo(f"bench convert compvis: {e}", err=True)
        sys.exit(2)
    use = f"--models {model} " if model else ""
    click.echo(f"wrote {path}; use it with: bench run {use}--model-path {path}")
