"""``bench regress``: compare a sweep's latest results with a committed baseline."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command(name="regress")
@click.option("--out", default="runs", show_default=True, type=click.Path(), help="the sweep's output directory")
@click.option("--baseline", default=None, type=click.Path(),
              help="baseline JSON (default: results/baselines/<protocol>.json)")
@click.option("--protocol", default="smoke", show_default=True, help="protocol, when --baseline is not given")
@click.option("--update", is_flag=True, help="write the baseline from the current results instead of checking")
def command(out: str, baseline: str | None, protocol: str, update: bool) -> None:
    """Check results against baseline tolerance windows; exit 1 on a regression, 2 on bad input.

    Runs are matched by (model, protocol, method, bits, seed, preset, scope), so a changed
    method configuration is compared against the run it replaces. The Markdown table also
    goes to $GITHUB_STEP_SUMMARY when that is set.
    """
    from harness import regress as R

    path = Path(baseline) if baseline else Path("results") / "baselines" / f"{protocol}.json"
    try:
        if update:
            data = R.update(Path(out), path, protocol if baseline is None else None)
            click.echo(f"wrote {path}: {len(data['runs'])} runs, protocol {data['protocol']!r}")
            sys.exit(0)
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
