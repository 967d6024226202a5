"""Leaderboards from a sweep's MLflow store: one table per (model, protocol) and metric.

Rows are methods, columns bit-widths; a cell is the mean over seeds, with ``± std``
when a spec ran with several seeds. The FP reference is its own row (column ``fp``).
Written as Markdown (for humans and READMEs) and as a long CSV (for scripts).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

# Shown first, in this order; every other logged metric follows alphabetically.
PRIMARY = ("fid/cifarnet", "sfid/cifarnet", "is/cifarnet", "kid/cifarnet", "clean_fid/cifarnet",
           "fid/inception", "sfid/inception", "is/inception",
           "paired/mse", "paired/psnr", "paired/eps_mse", "time/calib_seconds")
# The one place a metric's direction is decided (tables, HTML page and `bench regress` all ask here).
LOWER_IS_BETTER = ("fid/", "sfid/", "clean_fid/", "kid/", "paired/mse", "paired/eps_mse", "paired/lpips", "time/")
HIGHER_IS_BETTER = ("is/", "paired/psnr", "paired/ssim")


def direction(metric: str) -> int:
    """-1: lower is better; +1: higher is better; 0: no direction (e.g. ``kid_std``, a spread)."""
    if metric.startswith(LOWER_IS_BETTER):
        return -1
    if metric.startswith(HIGHER_IS_BETTER):
        return 1
    return 0


def direction_label(metric: str) -> str:
    return {-1: "lower is better", 1: "higher is better", 0: "no direction"}[direction(metric)]


def load_runs(tracking_uri: str) -> pd.DataFrame:
    """Long table: one row per (run, metric) of every completed child run in the store."""
    mlflow.set_tracking_uri(tracking_uri)
    exps = [e.name for e in mlflow.search_experiments() if e.name.startswith("dmqbench-")]
    if not exps:
        cols = ["model", "protocol", "method", "bits", "seed", "preset", "scope", "metric", "value"]
        return pd.DataFrame(columns=cols)
    df = mlflow.search_runs(experiment_names=exps, filter_string="tags.kind = 'run'", output_format="pandas")
    df = df[df["tags.mirrored_status"] == "complete"]
    metric_cols = [c for c in df.columns if c.startswith("metrics.") and not c.startswith("metrics.fact/")]
    id_cols = {f"tags.{k}": k for k in ("model", "protocol", "method", "bits", "seed", "preset", "scope")}
    long = df[list(id_cols) + metric_cols].rename(columns=id_cols).melt(
        id_vars=list(id_cols.values()), var_name="metric", value_name="value")
    long["metric"] = long["metric"].str.removeprefix("metrics.")
    return long.dropna(subset=["value"])


def summarise(long: pd.DataFrame) -> pd.DataFrame:
    keys = ["model", "protocol", "method", "bits", "preset", "scope", "metric"]
    g = long.groupby(keys)["value"]
    return g.agg(mean="mean", std="std", n="count").reset_index()


INF_AT = 1e308  # MLflow stores ±Inf as ±1.7976931348623157e308


def fmt_value(x: float, spec: str = ".4g") -> str:
    """A metric value for a table: ±Inf (or MLflow's ±1.798e+308 stand-in) as "∞", NaN as "—"; never a number."""
    if x is None or pd.isna(x):
        return "—"
    x = float(x)
    if abs(x) >= INF_AT:
        return "∞" if x > 0 else "-∞"
    return format(x, spec)


def _cell(row: pd.Series) -> str:
    mean = float(row["mean"]) if pd.notna(row["mean"]) else float("nan")
    if pd.isna(mean) or abs(mean) >= INF_AT:
        return fmt_value(mean)
    if row["n"] > 1 and pd.notna(row["std"]) and abs(float(row["std"])) < INF_AT:
        return f"{fmt_value(mean)} ± {fmt_value(row['std'], '.2g')}"
    return fmt_value(mean)


def _metric_order(metrics: list[str]) -> list[str]:
    return [m for m in PRIMARY if m in metrics] + sorted(m for m in metrics if m not in PRIMARY)


def _bits_order(bits: list[str]) -> list[str]:
    return (["fp"] if "fp" in bits else []) + sorted((b for b in bits if b != "fp"), reverse=True)


def tables(summary: pd.DataFrame) -> dict[tuple[str, str, str], pd.DataFrame]:
    """{(model, protocol, metric): methods x bit-widths table of formatted cells}."""
    out = {}
    for (model, protocol), part in summary.groupby(["model", "protocol"]):
        for metric in _metric_order(part["metric"].unique().tolist()):
            m = part[part["metric"] == metric].copy()
            m["cell"] = m.apply(_cell, axis=1)
            t = m.pivot_table(index="method", columns="bits", values="cell", aggfunc="first").fillna("")
            t = t[_bits_order(list(t.columns))]
            order = (["fp"] if "fp" in t.index else []) + sorted(i for i in t.index if i != "fp")
            out[(model, protocol, metric)] = t.loc[order]
    return out


def to_markdown(tabs: dict[tuple[str, str, str], pd.DataFrame], note: str = "") -> str:
    lines = ["# dmqbench leaderboard", ""]
    if note:
        lines += [note, ""]
    current = None
    for (model, protocol, metric), t in tabs.items():
        if (model, protocol) != current:
            current = (model, protocol)
            lines += [f"## {model} — protocol `{protocol}`", ""]
        lines += [f"### `{metric}` ({direction_label(metric)})", "", t.to_markdown(), ""]
    return "\n".join(lines)


def build(tracking_uri: str, dest: Path, note: str = "") -> tuple[str, Path, Path]:
    summary = summarise(load_runs(tracking_uri))
    if summary.empty:
        raise ValueError(f"no completed runs in {tracking_uri}: run `bench run --out DIR` first")
    md = to_markdown(tables(summary), note)
    dest.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = dest / "leaderboard.md", dest / "leaderboard.csv"
    md_path.write_text(md)
    summary.to_csv(csv_path, index=False)
    return md, md_path, csv_path
