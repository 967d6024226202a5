"""``bench regress``: compare a sweep's latest results with a committed baseline."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command(name="regress")
@click.option("--out", default="runs", show_default=True, type=click.Path(), help="the sweep's output directory")
@click.option("--baseline", default=None, type=click.Path(),
              help="baseline JSON (default: results/baselines/<protocol>.json)")
@click.option("--protocol", default=None,
              help="protocol (default: the baseline's; with --update, the runs' own; else smoke)")
@click.option("--update", is_flag=True, help="write the baseline from the current results instead of checking")
def command(out: str, baseline: str | None, protocol: str | None, update: bool) -> None:
    """Check results against baseline tolerance windows; exit 1 on a regression, 2 on bad input.

    Runs are matched by (model, protocol, method, bits, seed, preset, scope), so a changed
    method configuration is compared against the run it replaces. The Markdown table also
    goes to $GITHUB_STEP_SUMMARY when that is set.
    """
    from harness import regress as R

    try:
        if update:  # the protocol comes from the runs' specs (or --protocol), never from a file name
            proto = R.update_protocol(Path(out), protocol)
            path = Path(baseline) if baseline else Path("results") / "baselines" / f"{proto}.json"
            data = R.update(Path(out), path, proto)
            click.echo(f"wrote {path}: {len(data['runs'])} runs, protocol {data['protocol']!r}")
            sys.exit(0)
        path = Path(baseline) if baseline else Path("results") / "baselines" / f"{protocol or 'smoke'}.json"
        report = R.check(Path(out), path)
    except R.RegressError as e:
        click.echo(f"bench regress: {e}", err=True)
        sys.exit(2)
    md = R.to_markdown(report)
    click.echo(md)
    summary = R.write_step_summary(md)
    if summary:
        click.echo(f"(also appended to {summary})")
    if not report.ok:
        for r in report.failures:
            click.echo(f"REGRESSION: {r.run} {r.metric}: {r.verdict} "
                       f"(baseline {R._fmt(r.baseline)}, current {R._fmt(r.current)}) {r.note}".rstrip(), err=True)
        sys.exit(1)
