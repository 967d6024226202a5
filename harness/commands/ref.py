"""``bench ref``: build, import and list reference statistics (the sets metrics are scored against).

    bench ref build lsun-church-train --images DIR --inception-weights W [--resolution 256]
    bench ref build cifar10-train --images data/cifar-10-batches-py --extractor cifarnet
    bench ref import imagenet-256 --npz VIRTUAL_imagenet256_labeled.npz
    bench ref ls

Bad input exits 2 with one line naming the problem and the fix. See docs/metrics.md.
"""

from __future__ import annotations

import sys

import click

_STORE_HELP = "statistics store (default: $DMQBENCH_REFSTATS or ~/.cache/dmqbench/refstats)"


def _fail(e: Exception) -> None:
    click.echo(f"bench ref: {' '.join(str(e).split())}", err=True)
    sys.exit(2)


@click.group(name="ref")
def command() -> None:
    """Reference sets: build statistics from images, import precomputed ones, list the store."""


@command.command(name="build")
@click.argument("name")
@click.option("--images", required=True, type=click.Path(),
              help="folder of PNG/JPEG (recursive), ADM .npz batch (arr_0), .tar/.tar.gz, or cifar-10-batches-py")
@click.option("--extractor", type=click.Choice(["inception", "cifarnet"]), default="inception", show_default=True)
@click.option("--inception-weights", type=click.Path(), default=None,
              help="torch-fidelity Inception weights file (default: torch-fidelity's hub cache file)")
@click.option("--resolution", type=int, default=None,
              help="center-crop every image to NxN (default: the first image's size)")
@click.option("--split", type=click.Choice(["train", "test"]), default=None,
              help="CIFAR-10 pickles: which batches (default: test if NAME ends in 'test', else train)")
@click.option("--kid-features", type=int, default=10000, show_default=True,
              help="images whose KID features are stored (seeded random subset)")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--store", type=click.Path(), default=None, help=_STORE_HELP)
def build(name, images, extractor, inception_weights, resolution, split, kid_features, device, batch_size,
          store) -> None:
    """Compute and store the statistics of reference set NAME from --images."""
    from harness.metrics import MetricSetupError, build_reference

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if batch_size < 1 or kid_features < 1:
        _fail(ValueError("--batch-size and --kid-features must be at least 1"))
    try:
        out = build_reference(name, images, extractor, inception_weights, resolution=resolution, split=split,
                              device=device, batch_size=batch_size, kid_features=kid_features, cache_dir=store,
                              echo=lambda s: click.echo(s, err=True))
    except MetricSetupError as e:
        _fail(e)
    for path, m in out:
        published = m.get("extractor_weights_published")
        note = "" if published is None else (
            "; weights = the published file" if published else
            "; weights differ from the published file (values not comparable with published ones)")
        click.echo(f"{m['name']} / {m['extractor']}: {m['num_images']} images at {m['resolution']}px "
                   f"({m['source']['kind']}) -> {path}{note}")


@command.command(name="import")
@click.argument("name")
@click.option("--npz", "npz", required=True, type=click.Path(),
              help="ADM reference batch (mu, sigma, mu_s, sigma_s) or clean-fid statistics (mu, sigma)")
@click.option("--format", "fmt", type=click.Choice(["auto", "adm", "clean-fid"]), default="auto", show_default=True)
@click.option("--store", type=click.Path(), default=None, help=_STORE_HELP)
def import_(name, npz, fmt, store) -> None:
    """Store precomputed statistics from an .npz as reference set NAME (recording where they came from)."""
    from harness.metrics import MetricSetupError, import_stats

    try:
        path, m = import_stats(name, npz, fmt, cache_dir=store)
    except MetricSetupError as e:
        _fail(e)
    click.echo(f"{name} / {m['extractor']}: {m['provenance']} from {m['source']['path']} "
               f"(sha256 {m['source']['sha256'][:12]}) -> {path}; {m['notes']}")


@command.command(name="ls")
@click.option("--store", type=click.Path(), default=None, help=_STORE_HELP)
def ls(store) -> None:
    """List the reference statistics available (shipped and stored)."""
    from pathlib import Path

    from harness.metrics import default_cache_dir, list_entries

    root = Path(store) if store else default_cache_dir()
    click.echo(f"store: {root}")
    rows = list_entries(store)
    click.echo(f"{'name':28s} {'extractor':20s} {'images':>7s} {'res':>4s} {'provenance':16s} {'weights':12s} created")
    for m in rows:
        w = (m.get("extractor_weights_sha256") or "")[:12] or "-"
        res = m.get("resolution") or "-"
        click.echo(f"{m.get('name', '?'):28s} {m.get('extractor', '?'):20s} {m.get('num_images') or '-':>7} "
                   f"{res:>4} {m.get('provenance', '?'):16s} {w:12s} {m.get('created', '-')}")
