"""The one reader of a sweep's results: ``OUT/runs/<model>/<run>/results.json`` and what a run keeps beside it.

The leaderboard (Markdown, CSV, HTML) and ``bench regress`` read runs only through this module:

* :data:`KEY_FIELDS` / :func:`run_key`: the stable key of a run (model, protocol, method (with its
  ``[variant]``), bits, seed, preset, scope; *not* the config hash, so a changed method configuration
  replaces the run it changes);
* :func:`discover`: every readable ``results.json`` under OUT, the newest (by file time) per key;
  a file that is not JSON, not an object, or lacks the key fields is skipped, never fatal;
* :func:`long_table`: the pandas view, one row per (run, metric), with ``time/<timing>`` rows;
* :func:`save_features` / :func:`load_features` (``features.npz``: the extractor features of the samples,
  so the FP comparison needs no re-extraction) and :func:`save_replicates` / :func:`load_replicates`
  (``bootstrap.npz``: the bootstrap replicates of each metric, for paired significance).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.atomic import atomic_path

KEY_FIELDS = ("model", "protocol", "reference", "method", "bits", "seed", "preset", "scope")
# Runs written before a key field existed: the value they were scored with.
KEY_DEFAULTS = {"reference": "cifar10-test"}
RESULTS, FEATURES, BOOTSTRAP = "results.json", "features.npz", "bootstrap.npz"
LONG_COLUMNS = [*KEY_FIELDS, "metric", "value"]


def method_label(spec: dict) -> str:
    """``method``, or ``method[variant]`` for a ``--method-args`` variant (harness/method_args.py)."""
    return f"{spec['method']}[{spec['variant']}]" if spec.get("variant") else spec["method"]


def run_key(spec: dict) -> tuple[str, ...]:
    """The key of a run; its ``method`` is the :func:`method_label`, so a variant is a row of its own."""
    spec = {**spec, "method": method_label(spec)}
    return tuple(str(spec.get(k) or KEY_DEFAULTS[k]) if k in KEY_DEFAULTS else str(spec[k]) for k in KEY_FIELDS)


def key_dict(key: tuple) -> dict[str, str]:
    return dict(zip(KEY_FIELDS, key))


def key_label(key: tuple | dict) -> str:
    d = key_dict(key) if isinstance(key, tuple) else key
    return f"{d['model']} {d['method']} {d['bits']} s{d['seed']} ({d['preset']}, {d['scope']})"


@dataclass
class Run:
    """One run directory and its parsed ``results.json``."""

    dir: Path
    results: dict
    mtime: float

    @property
    def spec(self) -> dict:
        return self.results["spec"]

    @property
    def key(self) -> tuple[str, ...]:
        return run_key(self.spec)

    @property
    def complete(self) -> bool:
        return self.results.get("status") == "complete"

    @property
    def metrics(self) -> dict[str, float]:
        m = self.results.get("metrics")
        return {k: float(v) for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)} \
            if isinstance(m, dict) else {}


def read_run(run_dir: Path) -> Run | None:
    """The run in ``run_dir``, or ``None`` when its ``results.json`` is missing or unusable."""
    p = Path(run_dir) / RESULTS
    try:
        res = json.loads(p.read_text())
        mtime = p.stat().st_mtime
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(res, dict) or not isinstance(res.get("spec"), dict):
        return None
    if any(k not in res["spec"] and k not in KEY_DEFAULTS for k in KEY_FIELDS):
        return None
    return Run(Path(run_dir), res, mtime)


def discover(out: Path, protocol: str | None = None, complete_only: bool = False) -> list[Run]:
    """The newest readable run of each key under ``OUT/runs`` (sorted by key)."""
    found: dict[tuple, Run] = {}
    for p in sorted(Path(out).glob(f"runs/*/*/{RESULTS}")):
        run = read_run(p.parent)
        if run is None or (protocol is not None and run.spec.get("protocol") != protocol):
            continue
        if complete_only and not run.complete:
            continue
        if run.key not in found or run.mtime > found[run.key].mtime:
            found[run.key] = run
    return [found[k] for k in sorted(found)]


def long_table(runs: Iterable[Run]) -> pd.DataFrame:
    """One row per (complete run, metric): the run's metrics and its timings as ``time/<name>``."""
    rows = []
    for run in runs:
        if not run.complete:
            continue
        key = key_dict(run.key)
        values = dict(run.metrics)
        timings = run.results.get("timings") or {}
        values.update({f"time/{k}": float(v) for k, v in timings.items() if isinstance(v, int | float)})
        rows += [{**key, "metric": m, "value": v} for m, v in values.items()]
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


# --------------------------------------------------------------------------- arrays kept beside results.json
def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **{k.replace("/", "|"): np.asarray(v) for k, v in arrays.items()})


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k.replace("|", "/"): z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):  # missing, truncated, not an npz
        return None


def save_features(run_dir: Path, features: dict[str, np.ndarray]) -> None:
    """``features.npz``: the run's extractor features (float32 ``[N, D]`` per ``<network>/<layer>``), atomically."""
    _write_npz_atomic(Path(run_dir) / FEATURES, {k: np.asarray(v, np.float32) for k, v in features.items()})


def load_features(run_dir: Path, num_images: int) -> dict[str, np.ndarray] | None:
    """The saved features, or ``None`` when absent, unreadable or not ``num_images`` rows each (re-extract then)."""
    f = _read_npz(Path(run_dir) / FEATURES)
    if not f or any(v.ndim != 2 or len(v) != num_images or not np.isfinite(v).all() for v in f.values()):
        return None
    return f


def save_replicates(run_dir: Path, replicates: dict[str, np.ndarray]) -> None:
    """Merge ``replicates`` (metric -> bootstrap replicates) into the run's ``bootstrap.npz``, atomically."""
    merged = load_replicates(run_dir) | {k: np.asarray(v, np.float64) for k, v in replicates.items()}
    _write_npz_atomic(Path(run_dir) / BOOTSTRAP, merged)


def load_replicates(run_dir: Path) -> dict[str, np.ndarray]:
    return _read_npz(Path(run_dir) / BOOTSTRAP) or {}
