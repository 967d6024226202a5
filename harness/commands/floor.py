"""``bench floor``: regenerate the sampling floor shipped beside the reference statistics.

    bench floor --data /path/to/cifar10-jpeg.tar.gz [--out models/assets/cifar10-test-cifarnet-floor.json]

``--data``: anything :func:`models.cifar10.load_cifar10` reads (the JPEG tar the shipped reference was
built from, a ``cifar-10-batches-py`` directory, or a folder with ``test/``). See docs/metrics.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "models" / "assets" / "cifar10-test-cifarnet-floor.json"


@click.command(name="floor")
@click.option("--data", required=True, type=click.Path(), help="CIFAR-10 source (tar, pickles directory, folder)")
@click.option("--out", "out", default=str(DEFAULT_OUT), show_default=True, type=click.Path(), help="JSON to write")
@click.option("--sizes", default=None, help="comma list of N (default: 32,64,128,256,512,1024,2048,5000)")
@click.option("--device", default="cpu", show_default=True)
def command(data: str, out: str, sizes: str | None, device: str) -> None:
    """The metrics of N real CIFAR-10 test images against the cifar10-test reference (CifarNet), with intervals."""
    from harness.metrics.floor import SIZES, sampling_floor
    from harness.tracking import git_revision
    from models.cifar10 import load_cifar10

    try:
        ns = tuple(int(x) for x in sizes.split(",")) if sizes else SIZES
        x, _, source = load_cifar10(data, "test")
    except (ValueError, OSError, FileNotFoundError) as e:
        click.echo(f"bench floor: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    images = x.numpy()
    result = sampling_floor(images, ns, device,
                            progress=lambda n, e: click.echo(f"N={n}: " + ", ".join(
                                f"{k} {v['value']:.4g} [{v['ci_low']:.4g}, {v['ci_high']:.4g}]" for k, v in e.items())))
    result["source"] = {"kind": source.kind, "sha256": source.sha256, "split": "test", "num_images": len(images)}
    result["git_revision"] = git_revision()
    result["command"] = "bench floor --data <CIFAR-10 source>" + (f" --sizes {sizes}" if sizes else "")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    click.echo(f"wrote {out}")
