"""``bench leaderboard --html``: one self-contained HTML page (readable offline).

Per (model, protocol): a table per metric (methods x bit-widths, the FP reference row,
mean ± std over seeds, delta to FP), plots of each metric against bit-width per method
(matplotlib, embedded PNG), and the sample grid of every run (``samples_grid.png``,
embedded). Nothing is fetched: styles, images and the small render check are inline.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import pandas as pd

from harness.leaderboard import (
    LEGEND,
    PRIMARY,
    TABLE,
    _bits_order,
    _cell,
    _method_order,
    _metric_order,
    bits_key,
    build_summary,
    headlines,
)
from harness.metrics.registry import direction, direction_label
from harness.results import discover, method_label

PLOT_METRICS = 6  # per (model, protocol): the first N metrics in leaderboard order

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1f24;background:#fff}
h1{font-size:26px}h2{border-bottom:2px solid #d0d7de;padding-bottom:4px;margin-top:36px}
h3{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 16px;font-size:14px}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:right}
th{background:#f6f8fa}td.method,th.method{text-align:left;font-weight:600}
tr.fp td{background:#eef6ff}tr.floor td{background:#f6f8fa;font-style:italic}
table.headline td{white-space:nowrap}
.delta{color:#57606a;font-size:12px;margin-left:4px}.worse{color:#cf222e}.better{color:#1a7f37}
.grid{display:flex;flex-wrap:wrap;gap:14px}.grid figure{margin:0;text-align:center;font-size:13px}
.grid img{image-rendering:pixelated;border:1px solid #d0d7de;width:264px}
img.plot{max-width:100%;border:1px solid #eee}
.note{color:#57606a;font-size:13px}
"""



def _b64_png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _lower_is_better(metric: str) -> bool:
    return direction(metric) == -1


INF = 1e300  # MLflow stores inf (e.g. PSNR of FP against itself) as the largest float


def metric_table(part: pd.DataFrame, metric: str) -> str:
    """One metric of one (model, protocol): rows methods (FP first), columns bit-widths."""
    m = part[part["metric"] == metric]
    bits = _bits_order(sorted(m["bits"].unique().tolist()))
    methods = _method_order(m["method"].unique().tolist())
    fp = m[(m["method"] == "fp")]
    fp_mean = float(fp["mean"].iloc[0]) if len(fp) else None
    lower = _lower_is_better(metric)
    head = "".join(f"<th>{html.escape(b)}</th>" for b in bits)
    rows = [f"<table class='lb' data-metric='{html.escape(metric)}'><thead><tr><th class='method'>method</th>"
            f"{head}</tr></thead><tbody>"]
    for method in methods:
        cells = []
        for b in bits:
            c = m[(m["method"] == method) & (m["bits"] == b)]
            if c.empty:
                cells.append("<td></td>")
                continue
            r = c.iloc[0]
            text = html.escape(_cell(r))
            if fp_mean is not None and method != "fp" and abs(fp_mean) < INF and abs(float(r["mean"])) < INF:
                d = float(r["mean"]) - fp_mean
                worse = (d > 0) if lower else (d < 0)
                cls = "worse" if (worse and d != 0) else ("better" if d != 0 else "")
                text += f"<span class='delta {cls}'>(Δ FP {d:+.3g})</span>"
            cells.append(f"<td>{text}</td>")
        cls = " class='fp'" if method == "fp" else ""
        rows.append(f"<tr{cls}><td class='method'>{html.escape(method)}</td>{''.join(cells)}</tr>")
    rows.append("</tbody></table>")
    return "".join(rows)


def metric_plots(part: pd.DataFrame, metrics: list[str], title: str) -> bytes:
    """Each metric against bit-width, one line per method (FP dashed); a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(metrics)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        m = part[part["metric"] == metric]
        qbits = sorted((b for b in m["bits"].unique() if b != "fp"), key=bits_key)
        x = {b: i for i, b in enumerate(qbits)}
        for method in sorted(m["method"].unique()):
            if method == "fp":
                continue
            mm = m[m["method"] == method].copy()
            mm = mm[mm["bits"].isin(x)].sort_values("bits", key=lambda s: s.map(x))
            if mm.empty:
                continue
            ax.errorbar([x[b] for b in mm["bits"]], mm["mean"], yerr=mm["std"].fillna(0), marker="o", capsize=3,
                        label=method)
        fp = m[m["method"] == "fp"]
        if len(fp) and abs(float(fp["mean"].iloc[0])) < INF:
            ax.axhline(float(fp["mean"].iloc[0]), color="k", ls="--", lw=1, label="fp")
        ax.set_xticks(range(len(qbits)), qbits)
        ax.set_xlabel("bit-width")
        ax.set_title(f"{metric} ({'↓' if _lower_is_better(metric) else '↑'})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def sample_grids(out: Path) -> dict[tuple[str, str], list[tuple[str, Path]]]:
    """{(model, protocol): [(label, samples_grid.png)]} of complete runs under OUT/runs (newest per label)."""
    found: dict[tuple[str, str], dict[str, tuple[float, Path]]] = {}
    for run in discover(Path(out), complete_only=True):
        grid = run.dir / "samples_grid.png"
        if not grid.is_file():
            continue
        s = run.spec
        label = f"{method_label(s)} {s['bits']} seed {s['seed']}"
        label += f" ({s['scope']})" if s["scope"] != "uniform" else ""
        slot = found.setdefault((s["model"], s["protocol"]), {})
        if label not in slot or run.mtime > slot[label][0]:
            slot[label] = (run.mtime, grid)

    def order(item):
        label = item[0]
        method, bits = label.split()[:2]
        return (method != "fp", method, -bits_key(bits)[0], -bits_key(bits)[1], label)

    return {k: [(lab, p) for lab, (_, p) in sorted(v.items(), key=order)] for k, v in found.items()}


def headline_table(t: pd.DataFrame) -> str:
    """The headline table (:func:`harness.leaderboard.headline`) as HTML."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    rows = [f"<table class='headline'><thead><tr>{head}</tr></thead><tbody>"]
    for _, r in t.iterrows():
        cls = " class='fp'" if r["method"] == "fp" else (" class='floor'" if r["method"].startswith("floor") else "")
        cells = "".join(f"<td{' class=method' if i == 0 else ''}>{html.escape(str(v))}</td>" for i, v in enumerate(r))
        rows.append(f"<tr{cls}>{cells}</tr>")
    rows.append("</tbody></table>")
    return "".join(rows)


def render(summary: pd.DataFrame, grids: dict[tuple[str, str], list[tuple[str, Path]]], note: str = "",
           heads: dict[tuple[str, str, str], pd.DataFrame] | None = None) -> str:
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<title>dmqbench leaderboard</title>", f"<style>{CSS}</style></head><body>",
             "<h1>dmqbench leaderboard</h1>",
             "<p class='note'>Cells: value [95% bootstrap interval over images] for one seed, mean ± std over "
             "several seeds; * / †: significantly better / worse than rtn at the same bit-width (paired bootstrap); "
             "Δ FP: difference to the full-precision reference of the same model and protocol "
             "(red: worse, green: better). Metrics keyed <code>metric/network</code>: "
             "<code>fid/cifarnet</code> is not comparable with a published Inception FID.</p>"]
    if note:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    toc = []
    for (model, protocol, reference), part in summary.groupby(TABLE):
        anchor = html.escape(f"{model}-{protocol}-{reference}")
        toc.append(f"<li><a href='#{anchor}'>{html.escape(model)} — {html.escape(protocol)} — "
                   f"{html.escape(reference)}</a></li>")
        parts.append(f"<h2 id='{anchor}'>{html.escape(model)} — protocol <code>{html.escape(protocol)}</code> — "
                     f"reference <code>{html.escape(reference)}</code></h2>")
        head = (heads or {}).get((model, protocol, reference))
        if head is not None and len(head.columns) > 2:
            parts.append(f"<h3>Headline</h3><p class='note'>{html.escape(LEGEND)}</p>{headline_table(head)}")
        metrics = _metric_order(part["metric"].unique().tolist())
        plot_metrics = [m for m in metrics if m in PRIMARY or not m.startswith("time/")][:PLOT_METRICS]
        if plot_metrics and (part["bits"] != "fp").any():
            png = metric_plots(part, plot_metrics, f"{model} / {protocol}")
            parts.append(f"<h3>Metrics against bit-width</h3><img class='plot' alt='plots {anchor}' "
                         f"src='{_b64_png(png)}'>")
        for metric in metrics:
            arrow = direction_label(metric)
            parts.append(f"<h3><code>{html.escape(metric)}</code> <span class='note'>({arrow})</span></h3>")
            parts.append(metric_table(part, metric))
        runs = grids.get((model, protocol), [])
        if runs:
            parts.append("<h3>Samples (first 64 images of each run)</h3><div class='grid'>")
            for label, path in runs:
                parts.append(f"<figure><img alt='samples {html.escape(label)}' "
                             f"src='{_b64_png(path.read_bytes())}'><figcaption>{html.escape(label)}</figcaption>"
                             "</figure>")
            parts.append("</div>")
    parts.insert(5, "<ul>" + "".join(toc) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(out: Path, dest: Path, note: str = "") -> Path:
    """Write ``dest/leaderboard.html`` from OUT/runs (tables, plots and sample grids)."""
    summary, runs = build_summary(Path(out))
    if summary.empty:
        raise ValueError(f"no complete runs under {Path(out) / 'runs'}: run `bench run --out {out}` first")
    page = render(summary, sample_grids(Path(out)), note, headlines(summary, runs))
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "leaderboard.html"
    path.write_text(page, encoding="utf-8")
    return path
