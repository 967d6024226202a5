"""Leaderboards of a sweep, read from ``OUT/runs/*/*/results.json`` (:mod:`harness.results`).

Per (model, protocol, reference statistics):

* a **headline table** in the shape of a paper's: one row per (method, bit-width), FP first and the
  sampling floor (N real CIFAR-10 test images against the reference, N = the runs' sample count)
  above it; columns the fidelity to FP (``fid_fp``, ``paired/psnr``, ``paired/ssim``) and the data-side
  ``fid``/``kid``, each ``value [95% interval]``; a mark when a quantized row differs from ``rtn`` at the
  same bit-width by more than the paired bootstrap's 95% interval (``*`` better, ``†`` worse);
* one table per metric: rows methods, columns bit-widths, a cell ``value [low, high]`` for one seed or
  ``mean ± std`` over several.

Directions and interval keys come from the metric registry (:mod:`harness.metrics.registry`).
Written as Markdown (humans, READMEs) and as a long CSV (scripts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness.metrics.registry import direction, direction_label, interval_of
from harness.results import KEY_FIELDS, Run, discover, load_replicates, long_table
from methods.registry import row_label

# Shown first, in this order; every other metric follows alphabetically.
PRIMARY = ("fid_fp/cifarnet", "kid_fp/cifarnet", "paired/psnr", "paired/ssim", "paired/mse", "paired/eps_mse",
           "fid/cifarnet", "kid/cifarnet", "sfid/cifarnet", "is/cifarnet", "clean_fid/cifarnet",
           "fid_fp/inception", "kid_fp/inception", "fid/inception", "sfid/inception", "is/inception",
           "time/calib_seconds")
HEADLINE = ("fid_fp/{net}", "paired/psnr", "paired/ssim", "fid/{net}", "kid/{net}")
BASELINE_METHOD = "rtn"  # quantized rows are marked against it
BETTER, WORSE = "*", "†"
FLOOR_FILE = Path(__file__).resolve().parents[1] / "models" / "assets" / "cifar10-test-cifarnet-floor.json"
TABLE = ["model", "protocol", "reference"]  # one set of tables each: numbers against different references never mix
GROUP = [*TABLE, "method", "bits", "preset", "scope"]

INF_AT = 1e308  # MLflow stores ±Inf as ±1.7976931348623157e308


def fmt_value(x: float, spec: str = ".4g") -> str:
    """A metric value for a table: ±Inf (or MLflow's ±1.798e+308 stand-in) as "∞", NaN as "—"; never a number."""
    if x is None or pd.isna(x):
        return "—"
    x = float(x)
    if abs(x) >= INF_AT or math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return format(x, spec)


def fmt_interval(lo: float, hi: float) -> str:
    return f"[{fmt_value(lo)}, {fmt_value(hi)}]"


# --------------------------------------------------------------------------- reading
def load_runs(out: Path) -> pd.DataFrame:
    """Long table: one row per (complete run, metric) under OUT/runs (the newest run of each key)."""
    return long_table(discover(Path(out), complete_only=True))


def summarise(long: pd.DataFrame, runs: list[Run] | None = None) -> pd.DataFrame:
    """One row per (model, protocol, method, bits, preset, scope, metric): ``mean``, ``std``, ``n`` over
    seeds, the interval (``ci_low``, ``ci_high``: seed means of the bounds) and, with ``runs``,
    ``vs_rtn``: ``better``/``worse``/``same`` than rtn at the same bit-width on every seed."""
    cols = [*GROUP, "metric", "mean", "std", "n", "ci_low", "ci_high", "vs_rtn"]
    if long.empty:
        return pd.DataFrame(columns=cols)
    split = long["metric"].map(interval_of)
    is_ci = split.notna()
    values = long[~is_ci]
    g = values.groupby([*GROUP, "metric"])["value"]
    summary = g.agg(mean="mean", std="std", n="count").reset_index()
    if is_ci.any():
        ci = long[is_ci].copy()
        ci["side"] = [s[1] for s in split[is_ci]]
        ci["metric"] = [s[0] for s in split[is_ci]]
        bounds = ci.pivot_table(index=[*GROUP, "metric"], columns="side", values="value", aggfunc="mean")
        bounds = bounds.rename(columns={"low": "ci_low", "high": "ci_high"}).reset_index()
        summary = summary.merge(bounds, on=[*GROUP, "metric"], how="left")
    for c in ("ci_low", "ci_high"):
        if c not in summary:
            summary[c] = np.nan
    summary["vs_rtn"] = ""
    if runs:
        marks = significance_marks(runs)
        summary["vs_rtn"] = [marks.get((*r[GROUP].tolist(), r["metric"]), "") for _, r in summary.iterrows()]
    return summary[cols]


def significance_marks(runs: list[Run]) -> dict[tuple, str]:
    """``{(model, protocol, method, bits, preset, scope, metric): better|worse|same}`` of each quantized run
    against ``rtn`` with the same key but the method, by the paired bootstrap of the difference (the
    replicates in each run's ``bootstrap.npz`` are on the same image resamples). Several seeds: a mark
    only when every seed agrees."""
    from harness.metrics.bootstrap import significance

    by_key = {r.key: r for r in runs if r.complete}
    found: dict[tuple, list[str]] = {}
    for key, run in by_key.items():
        k = dict(zip(KEY_FIELDS, key))
        if k["method"] in ("fp", BASELINE_METHOD):
            continue
        base = by_key.get(tuple({**k, "method": BASELINE_METHOD}[f] for f in KEY_FIELDS))
        if base is None:
            continue
        reps_a, reps_b = load_replicates(run.dir), load_replicates(base.dir)
        for metric in sorted(set(reps_a) & set(reps_b)):
            a, b = run.metrics.get(metric), base.metrics.get(metric)
            sign = direction(metric)
            if a is None or b is None or sign == 0 or reps_a[metric].shape != reps_b[metric].shape:
                continue
            try:
                d, _, _, sig = significance(a, reps_a[metric], b, reps_b[metric])
            except ValueError:  # a non-finite value has no interval: no mark
                continue
            verdict = "same" if not sig else ("better" if d * sign > 0 else "worse")
            group = tuple(k[f] for f in GROUP) + (metric,)
            found.setdefault(group, []).append(verdict)
    return {g: (v[0] if len(set(v)) == 1 else "same") for g, v in found.items()}


# --------------------------------------------------------------------------- cells
def _cell(row: pd.Series, with_interval: bool = True) -> str:
    mean = float(row["mean"]) if pd.notna(row["mean"]) else float("nan")
    if pd.isna(mean) or abs(mean) >= INF_AT:
        return fmt_value(mean)
    mark = {"better": BETTER, "worse": WORSE}.get(row.get("vs_rtn", ""), "")
    if row["n"] > 1 and pd.notna(row["std"]) and abs(float(row["std"])) < INF_AT:
        return f"{fmt_value(mean)} ± {fmt_value(row['std'], '.2g')}{mark}"
    if with_interval and pd.notna(row.get("ci_low")) and pd.notna(row.get("ci_high")):
        return f"{fmt_value(mean)} {fmt_interval(row['ci_low'], row['ci_high'])}{mark}"
    return fmt_value(mean) + mark


def _metric_order(metrics: list[str]) -> list[str]:
    return [m for m in PRIMARY if m in metrics] + sorted(m for m in metrics if m not in PRIMARY)


def bits_key(bits: str) -> tuple[int, int]:
    """(weight bits, activation bits); FP counts as 16/16. The one ordering of bit-widths in every report."""
    if bits == "fp":
        return (16, 16)
    try:
        w, a = bits[1:].split("a")
        return (int(w), int(a))
    except ValueError:
        return (0, 0)


def _bits_order(bits: list[str]) -> list[str]:
    """Most precise first: fp, w8a8, w6a6, w4a8, ..."""
    return sorted(bits, key=bits_key, reverse=True)


def _method_order(methods: list[str]) -> list[str]:
    head = [m for m in ("fp", BASELINE_METHOD) if m in methods]
    return head + sorted(m for m in methods if m not in head)


def tables(summary: pd.DataFrame) -> dict[tuple[str, str, str], pd.DataFrame]:
    """{(model, protocol, reference, metric): methods x bit-widths table of formatted cells}."""
    out = {}
    for table, part in summary.groupby(TABLE):
        for metric in _metric_order(part["metric"].unique().tolist()):
            m = part[part["metric"] == metric].copy()
            m["cell"] = m.apply(_cell, axis=1)
            t = m.pivot_table(index="method", columns="bits", values="cell", aggfunc="first").fillna("")
            t = t[_bits_order(list(t.columns))]
            t = t.loc[_method_order(list(t.index))]
            t.index = pd.Index([row_label(m) for m in t.index], name="method")
            out[(*table, metric)] = t
    return out


# --------------------------------------------------------------------------- the sampling floor
def load_floor(path: Path = FLOOR_FILE) -> dict:
    """The shipped floor: ``{"sizes": {"<N>": {metric: {"value", "ci_low", "ci_high"}}}, ...}`` or ``{}``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("sizes"), dict) else {}


def _num_samples(runs: list[Run], model: str, protocol: str, reference: str) -> int | None:
    """The runs' one sample count, or ``None`` (no floor row) when they differ or score against a reference
    other than the floor's ``cifar10-test``."""
    if reference != "cifar10-test":
        return None
    mine = [r for r in runs if r.key[:3] == (model, protocol, reference)]
    ns = {int(r.spec.get("num_samples", 0)) for r in mine}
    return ns.pop() if len(ns) == 1 else None


def headline(part: pd.DataFrame, floor: dict | None = None, num_samples: int | None = None) -> pd.DataFrame:
    """The paper-style table of one (model, protocol): rows (method, bits), columns :data:`HEADLINE`."""
    metrics = set(part["metric"])
    nets = [n for n in ("cifarnet", "inception") if f"fid/{n}" in metrics or f"fid_fp/{n}" in metrics]
    cols = list(dict.fromkeys(c.format(net=n) for n in nets for c in HEADLINE))
    cols = [c for c in cols if c in metrics]
    rows, index = [], []
    sizes = (floor or {}).get("sizes", {})
    if num_samples is not None and str(num_samples) in sizes:
        entry = sizes[str(num_samples)]
        cells = []
        for c in cols:
            v = entry.get(c)
            cells.append(f"{fmt_value(v['value'])} {fmt_interval(v['ci_low'], v['ci_high'])}" if v else "—")
        rows.append(cells)
        index.append((f"floor: {num_samples} real test images", "—"))
    keys = part[["method", "bits"]].drop_duplicates()
    methods, bits_order = _method_order(list(keys["method"].unique())), _bits_order(list(keys["bits"].unique()))
    order = sorted(keys.itertuples(index=False), key=lambda mb: (bits_order.index(mb[1]), methods.index(mb[0])))
    for method, bits in order:
        sel = part[(part["method"] == method) & (part["bits"] == bits)]
        cells = []
        for c in cols:
            r = sel[sel["metric"] == c]
            cells.append(_cell(r.iloc[0]) if len(r) else "")
        rows.append(cells)
        index.append((row_label(method), bits))
    arrows = {-1: " ↓", 1: " ↑", 0: ""}
    t = pd.DataFrame(rows, columns=[f"{c}{arrows[direction(c)]}" for c in cols])
    t.insert(0, "bits", [b for _, b in index])
    t.insert(0, "method", [m for m, _ in index])
    return t


LEGEND = (f"Cells: value [95% bootstrap interval over images]; `{BETTER}` / `{WORSE}`: significantly better / "
          f"worse than `{BASELINE_METHOD}` at the same bit-width (paired bootstrap over the same images, 95%). "
          "The floor row: N real CIFAR-10 test images against the reference (what FP could reach at best). "
          "↓ lower is better, ↑ higher is better; FP's PSNR against itself is ∞.")


def to_markdown(tabs: dict[tuple[str, str, str, str], pd.DataFrame], note: str = "",
                heads: dict[tuple[str, str, str], pd.DataFrame] | None = None) -> str:
    lines = ["# dmqbench leaderboard", ""]
    if note:
        lines += [note, ""]
    current = None
    for (model, protocol, reference, metric), t in tabs.items():
        if (model, protocol, reference) != current:
            current = (model, protocol, reference)
            lines += [f"## {model} — protocol `{protocol}` — reference `{reference}`", ""]
            head = (heads or {}).get(current)
            if head is not None and len(head.columns) > 2:
                lines += ["### Headline", "", LEGEND, "", head.to_markdown(index=False), ""]
        lines += [f"### `{metric}` ({direction_label(metric)})", "", t.to_markdown(), ""]
    return "\n".join(lines)


def build_summary(out: Path) -> tuple[pd.DataFrame, list[Run]]:
    runs = discover(Path(out), complete_only=True)
    return summarise(long_table(runs), runs), runs


def headlines(summary: pd.DataFrame, runs: list[Run]) -> dict[tuple[str, str, str], pd.DataFrame]:
    floor = load_floor()
    return {table: headline(part, floor, _num_samples(runs, *table)) for table, part in summary.groupby(TABLE)}


def build(out: Path, dest: Path, note: str = "") -> tuple[str, Path, Path]:
    summary, runs = build_summary(out)
    if summary.empty:
        raise ValueError(f"no complete runs under {Path(out) / 'runs'}: run `bench run --out {out}` first")
    md = to_markdown(tables(summary), note, headlines(summary, runs))
    dest.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = dest / "leaderboard.md", dest / "leaderboard.csv"
    md_path.write_text(md)
    summary.to_csv(csv_path, index=False)
    return md, md_path, csv_path
