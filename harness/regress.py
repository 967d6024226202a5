"""Regression check of a sweep's results against a committed baseline.

A baseline (``results/baselines/<protocol>.json``) holds, per run, a stable key (model,
protocol, method, bits, seed, preset, scope: *not* the config hash, so a changed method
configuration is compared against the run it replaces) and its metrics, plus tolerance
windows per metric pattern::

    {"format": 1, "protocol": "smoke",
     "tolerances": {"fid/*": {"abs": 0.5, "rel": 0.05}, "kid_std/*": {"ignore": true}, ...},
     "runs": [{"key": {"model": ..., "method": ..., ...}, "config_hash": "...", "metrics": {...}}]}

A metric's direction comes from the metric registry (:mod:`harness.metrics.registry`). When the
baseline run carries the metric's 95% bootstrap interval ``[lo, hi]`` (``<metric>_ci_low`` and
``<metric>_ci_high``, written by ``--update`` like any metric), the window *is* that interval: the
current value regresses when it lies strictly outside it on the worse side (lower-is-better:
``current > hi``; higher-is-better: ``current < lo``; no direction: either side), improves when
strictly outside on the better side, and is ok inside or on a bound. Without an interval, a
metric regresses when it is worse than the baseline by more than ``abs + rel * |baseline|``
(lower is better for FID, sFID, KID, MSEs; higher for IS and PSNR) and improves when better by
more than that. Interval keys are never judged on their own. A baseline run with no
complete result, or a failed run, is a regression; a result with no baseline entry is "new".
A non-finite current value (NaN, ±Inf) is a regression, except the same infinity as the
baseline's (FP's PSNR against its own samples is +Inf). ``--update`` takes the protocol from
the runs' specs (or ``--protocol``), never from the baseline's file name.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.metrics.registry import direction, interval, interval_of
from harness.results import KEY_DEFAULTS, KEY_FIELDS, discover, key_label, run_key

FORMAT = 1

DEFAULT_TOLERANCES: dict[str, dict[str, Any]] = {
    "fid/*": {"abs": 0.5, "rel": 0.05},
    "sfid/*": {"abs": 0.5, "rel": 0.05},
    "clean_fid/*": {"abs": 0.5, "rel": 0.05},
    "kid/*": {"abs": 0.001, "rel": 0.1},
    "kid_std/*": {"ignore": True},
    "is/*": {"rel": 0.05},
    "paired/*": {"rel": 0.1},
    "paired/psnr": {"rel": 0.03},
    "paired/ssim": {"abs": 0.005},
    "fid_fp/*": {"abs": 0.05, "rel": 0.1},
    "kid_fp/*": {"abs": 0.001, "rel": 0.1},
    "*": {"rel": 0.1},
}

OK, IMPROVED, REGRESSED, MISSING = "ok", "improved", "REGRESSED", "MISSING"
FAILED, NEW, IGNORED = "FAILED", "new", "ignored"
FAILING = (REGRESSED, MISSING, FAILED)


class RegressError(ValueError):
    """Bad input (missing or malformed baseline, no results): exit status 2."""


def tolerance_for(metric: str, tolerances: dict[str, dict]) -> dict:
    """The window of the first matching pattern: exact name, then the longest glob pattern."""
    if metric in tolerances:
        return tolerances[metric]
    matches = [p for p in tolerances if fnmatch.fnmatchcase(metric, p)]
    if not matches:
        return {"rel": 0.1}
    return tolerances[max(matches, key=lambda p: len(p.replace("*", "")))]




def latest_results(out: Path, protocol: str | None = None) -> dict[tuple, dict]:
    """The newest results.json of each stable key under OUT/runs (by file time)."""
    runs = Path(out) / "runs"
    if not runs.is_dir():
        raise RegressError(f"no runs under {runs}: run `bench run --out {out}` first")
    return {run.key: run.results for run in discover(Path(out), protocol)}


def load_baseline(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RegressError(f"baseline {path} does not exist: create it with "
                           f"`bench regress --out DIR --baseline {path} --update`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RegressError(f"baseline {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise RegressError(f"baseline {path} has no 'runs' list: regenerate it with --update")
    for i, r in enumerate(data["runs"]):
        if not isinstance(r, dict) or not isinstance(r.get("key"), dict) or not isinstance(r.get("metrics"), dict):
            raise RegressError(f"baseline {path}: runs[{i}] needs 'key' and 'metrics' objects")
        missing = [k for k in KEY_FIELDS if k not in r["key"] and k not in KEY_DEFAULTS]
        if missing:
            raise RegressError(f"baseline {path}: runs[{i}].key lacks {', '.join(missing)}")
    tol = data.get("tolerances", {})
    if not isinstance(tol, dict) or not all(isinstance(v, dict) for v in tol.values()):
        raise RegressError(f"baseline {path}: 'tolerances' must map metric patterns to {{abs, rel}} objects")
    return data


@dataclass
class Row:
    run: str
    metric: str
    baseline: float | None
    current: float | None
    verdict: str
    window: str = ""
    note: str = ""

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return 0.0 if self.current == self.baseline else self.current - self.baseline

    @property
    def delta_rel(self) -> float | None:
        d = self.delta
        if d is None or self.baseline == 0 or not math.isfinite(self.baseline):
            return None
        return d / abs(self.baseline)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    baseline_path: str = ""
    protocol: str = ""

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.verdict in FAILING]

    @property
    def ok(self) -> bool:
        return not self.failures


def judge(metric: str, base: float, cur: float, tol: dict,
          ci: tuple[float, float] | None = None) -> tuple[str, str]:
    """(verdict, window text) of one metric; ``ci``: the baseline's 95% interval, which replaces ``tol``."""
    a, r = float(tol.get("abs", 0.0)), float(tol.get("rel", 0.0))
    allowed = a + r * abs(base)
    window = " + ".join(x for x in ([f"{a:g}"] if a else []) + ([f"{r:.0%}"] if r else [])) or "exact"
    if tol.get("ignore"):
        return IGNORED, "ignored"
    cur, base = _inf(cur), _inf(base)
    if ci is not None and all(math.isfinite(_inf(x)) for x in ci) and ci[0] <= base <= ci[1]:
        return _judge_interval(metric, cur, ci)
    if cur == base:
        return OK, window  # also the same infinity (FP's PSNR to itself)
    if not math.isfinite(cur):
        return REGRESSED, window + " (non-finite)"
    d = cur - base
    sign = direction(metric)
    if sign == 0:
        return (OK if abs(d) <= allowed else REGRESSED), window + " (two-sided)"
    worse = -d * sign  # > 0 when the current value is worse
    if worse > allowed:
        return REGRESSED, window
    if -worse > allowed:
        return IMPROVED, window
    return OK, window


def _judge_interval(metric: str, cur: float, ci: tuple[float, float]) -> tuple[str, str]:
    """Outside the baseline's 95% interval on the worse side regresses, on the better side improves."""
    lo, hi = ci
    window = f"95% CI [{lo:.4g}, {hi:.4g}]"
    if not math.isfinite(cur):
        return REGRESSED, window + " (non-finite)"
    sign = direction(metric)
    above, below = cur > hi, cur < lo
    if sign == 0:
        return (REGRESSED if above or below else OK), window + " (two-sided)"
    worse, better = (above, below) if sign < 0 else (below, above)
    return (REGRESSED if worse else IMPROVED if better else OK), window


def compare(baseline: dict, results: dict[tuple, dict], baseline_path: str = "") -> Report:
    tolerances = {**DEFAULT_TOLERANCES, **baseline.get("tolerances", {})}
    report = Report(baseline_path=baseline_path, protocol=str(baseline.get("protocol", "")))
    seen = set()
    for entry in baseline["runs"]:
        key = run_key(entry["key"])
        seen.add(key)
        label = key_label(key)
        res = results.get(key)
        if res is None:
            report.rows.append(Row(label, "(run)", None, None, MISSING, note="no result for this baseline run"))
            continue
        if res.get("status") != "complete":
            report.rows.append(Row(label, "(run)", None, None, FAILED,
                                   note=str(res.get("error", res.get("status")))[:200]))
            continue
        cur_metrics = res.get("metrics", {})
        note = "" if res.get("config_hash") == entry.get("config_hash") else "config changed"
        for metric in sorted(entry["metrics"]):
            base = entry["metrics"][metric]
            if not isinstance(base, int | float) or interval_of(metric) is not None:
                continue  # an interval bound is part of its metric's window
            cur = cur_metrics.get(metric)
            tol = tolerance_for(metric, tolerances)
            if not isinstance(cur, int | float):
                verdict = IGNORED if tol.get("ignore") else MISSING
                report.rows.append(Row(label, metric, float(base), None, verdict, note="metric not in results"))
                continue
            verdict, window = judge(metric, float(base), float(cur), tol, interval(entry["metrics"], metric))
            why = "non-finite value" if not math.isfinite(_inf(float(cur))) and verdict == REGRESSED else ""
            report.rows.append(Row(label, metric, float(base), float(cur), verdict, window,
                                   "; ".join(x for x in (note, why) if x)))
        for metric in sorted(set(cur_metrics) - set(entry["metrics"])):
            if isinstance(cur_metrics[metric], int | float) and interval_of(metric) is None:
                report.rows.append(Row(label, metric, None, float(cur_metrics[metric]), NEW, note="not in baseline"))
    for key in sorted(results):
        if key not in seen:
            report.rows.append(Row(key_label(key), "(run)", None, None, NEW, note="not in baseline"))
    return report


INF_AT = 1e308  # MLflow stores ±Inf as ±1.7976931348623157e308


def _inf(x: float) -> float:
    """±Inf for MLflow's stand-in ±1.798e+308; other values unchanged."""
    return math.copysign(math.inf, x) if math.isfinite(x) and abs(x) >= INF_AT else x


def _fmt(x: float | None) -> str:
    """A value for the table: never a huge number or "nan" that could be read as a score."""
    if x is None:
        return "—"
    x = _inf(x)
    if math.isnan(x):
        return "NaN (failure)"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.6g}"


def _fmt_delta(d: float | None) -> str:
    if d is None or math.isnan(d):
        return "—"
    if math.isinf(d) or abs(d) >= INF_AT:
        return "+∞" if d > 0 else "-∞"
    return f"{d:+.4g}"


def to_markdown(report: Report) -> str:
    n_fail = len(report.failures)
    head = (f"## dmqbench regression check: {'PASS' if report.ok else 'FAIL'}\n\n"
            f"Baseline `{report.baseline_path}` (protocol `{report.protocol}`): "
            f"{len(report.rows)} rows, {n_fail} failing.\n")
    if not report.ok:
        names = sorted({f"{r.run} `{r.metric}`" for r in report.failures})
        head += "\nFailing: " + "; ".join(names[:20]) + ("; ..." if len(names) > 20 else "") + "\n"
    lines = ["| run | metric | baseline | current | delta | delta % | window | verdict | note |",
             "|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in report.rows:
        rel = r.delta_rel
        arrow = {-1: " ↓", 1: " ↑", 0: ""}[direction(r.metric)] if r.metric != "(run)" else ""
        verdict = f"**{r.verdict}**" if r.verdict in FAILING else r.verdict
        lines.append(f"| {r.run} | `{r.metric}`{arrow} | {_fmt(r.baseline)} | {_fmt(r.current)} | "
                     f"{_fmt_delta(r.delta)} | {'—' if rel is None or not math.isfinite(rel) else f'{rel:+.2%}'} | "
                     f"{r.window} | {verdict} | {r.note} |")
    legend = ("\n↓ lower is better, ↑ higher is better; window: the baseline's 95% bootstrap interval when it has one "
              "(a regression is a value outside it on the worse side), else abs + rel × |baseline| in the worse "
              "direction.\n")
    return head + "\n" + "\n".join(lines) + "\n" + legend


def write_step_summary(markdown: str) -> Path | None:
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return None
    with open(path, "a", encoding="utf-8") as f:
        f.write(markdown + "\n")
    return Path(path)


def make_baseline(results: dict[tuple, dict], protocol: str, previous: dict | None = None) -> dict:
    """A baseline from the complete results (keeps the previous file's tolerances)."""
    from harness.tracking import git_revision

    runs = []
    for _, res in sorted(results.items()):
        if res.get("status") != "complete":
            continue
        metrics = {k: v for k, v in sorted(res.get("metrics", {}).items()) if isinstance(v, int | float)}
        runs.append({"key": dict(zip(KEY_FIELDS, run_key(res["spec"]))),
                     "config_hash": res.get("config_hash"), "metrics": metrics,
                     "num_samples": res["spec"].get("num_samples"), "steps": res["spec"].get("steps")})
    if not runs:
        raise RegressError("no complete runs to make a baseline from")
    tolerances = (previous or {}).get("tolerances") or dict(DEFAULT_TOLERANCES)
    return {"format": FORMAT, "protocol": protocol, "git_revision": git_revision(), "tolerances": tolerances,
            "runs": runs}


def protocol_of(path: Path, baseline: dict | None = None) -> str:
    if baseline and baseline.get("protocol"):
        return str(baseline["protocol"])
    return Path(path).stem


def check(out: Path, baseline_path: Path) -> Report:
    baseline = load_baseline(baseline_path)
    results = latest_results(out, protocol_of(baseline_path, baseline))
    if not results:
        raise RegressError(f"no results.json for protocol {protocol_of(baseline_path, baseline)!r} under "
                           f"{Path(out) / 'runs'}: run the sweep first")
    return compare(baseline, results, str(baseline_path))


def run_protocols(out: Path) -> list[str]:
    """The protocols of the runs under OUT/runs (from their specs)."""
    return sorted({str(res["spec"].get("protocol")) for res in latest_results(out).values()})


def update_protocol(out: Path, protocol: str | None = None) -> str:
    """``protocol`` if given, else the one protocol of the runs under OUT (RegressError when there are several)."""
    if protocol:
        return protocol
    found = run_protocols(out)
    if not found:
        raise RegressError(f"no results.json under {Path(out) / 'runs'}: run `bench run --out {out}` first")
    if len(found) > 1:
        raise RegressError(f"runs of several protocols under {Path(out) / 'runs'} ({', '.join(found)}): "
                           "pass --protocol to choose the baseline's")
    return found[0]


def update(out: Path, baseline_path: Path, protocol: str | None = None) -> dict:
    """Write the baseline from the runs' results; the protocol is ``protocol`` or the runs' (never the file name)."""
    baseline_path = Path(baseline_path)
    previous = None
    if baseline_path.is_file():
        try:
            previous = json.loads(baseline_path.read_text())
        except json.JSONDecodeError:
            previous = None
    proto = update_protocol(out, protocol)
    results = latest_results(out, proto)
    if not results:
        raise RegressError(f"no results.json for protocol {proto!r} under {Path(out) / 'runs'}")
    data = make_baseline(results, proto, previous)
    baseline_path.parent.mkdir(parents=True, exist_ok=True)
    baseline_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return data
