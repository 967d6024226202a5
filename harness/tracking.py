"""Results files (the source of truth) and their MLflow mirror.

Every run writes ``results.json`` (atomically) with the top-level keys ``spec``,
``config_hash``, ``seeds``, ``versions``, ``git_revision``, ``timings``, ``metrics``,
``status`` (plus ``facts`` and ``error``). Workers only write files; the single driver
process mirrors them into MLflow (SQLite takes one writer), idempotently: a spec's
child run is found again by its ``config_hash`` tag, so a rerun never duplicates it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

RESULTS = "results.json"
PACKAGES = ("torch", "diffusers", "torch-fidelity", "clean-fid", "mlflow", "numpy", "dmqbench")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_results(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / RESULTS
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None  # a torn write cannot happen (atomic rename), but a hand-edited file can


def default_tracking_uri(out: Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'mlflow.db'}"


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:500]


class Tracker:
    """MLflow mirror for one sweep: an experiment per protocol, a parent run per sweep."""

    def __init__(self, tracking_uri: str, protocol: str, sweep_hash: str, sweep_args: dict) -> None:
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        name = f"dmqbench-{protocol}"
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(name)
        found = self.client.search_runs(
            [self.experiment_id], f"tags.sweep_hash = '{sweep_hash}' and tags.kind = 'sweep'", max_results=1
        )
        if found:
            self.parent_id = found[0].info.run_id
        else:
            parent = self.client.create_run(self.experiment_id, run_name=f"sweep-{sweep_hash[:8]}",
                                            tags={"kind": "sweep", "sweep_hash": sweep_hash})
            self.parent_id = parent.info.run_id
            for k, v in sweep_args.items():
                self.client.log_param(self.parent_id, k, str(v)[:500])

    def child_for(self, config_hash: str) -> str | None:
        found = self.client.search_runs(
            [self.experiment_id], f"tags.config_hash = '{config_hash}' and tags.kind = 'run'", max_results=5
        )
        return found[0].info.run_id if found else None

    def mirror(self, run_dir: Path, results: dict) -> str:
        """Create or complete the child run of this spec; safe to call again after a crash."""
        config_hash = results["config_hash"]
        run_id = self.child_for(config_hash)
        state = f"{results['status']}:{_digest(results.get('metrics', {}))}"
        if run_id is not None:
            run = self.client.get_run(run_id)
            if run.data.tags.get("mirrored_state") == state:
                return run_id  # already mirrored in this state (metrics filled in later are mirrored again)
        spec = results["spec"]
        if run_id is None:
            tags = {"kind": "run", "config_hash": config_hash, "mlflow.parentRunId": self.parent_id}
            tags.update({k: str(spec[k]) for k in ("method", "model", "bits", "seed", "protocol", "preset", "scope")})
            run_id = self.client.create_run(self.experiment_id, run_name=spec_label(spec), tags=tags).info.run_id
            params: dict[str, str] = {}
            _flatten("", {k: v for k, v in spec.items() if k != "method_config"}, params)
            _flatten("method_config", spec.get("method_config", {}), params)
            for k, v in params.items():
                self.client.log_param(run_id, k, v)
        for k, v in results.get("metrics", {}).items():
            if isinstance(v, int | float):
                self.client.log_metric(run_id, k, float(v))
        for k, v in results.get("timings", {}).items():
            self.client.log_metric(run_id, f"time/{k}", float(v))
        for k, v in results.get("facts", {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                self.client.log_metric(run_id, f"fact/{k}", float(v))
        for f in sorted(Path(run_dir).glob("*.png")) + [Path(run_dir) / RESULTS]:
            if f.exists():
                self.client.log_artifact(run_id, str(f))
        art = Path(run_dir) / "artifacts"
        if art.is_dir():
            self.client.log_artifacts(run_id, str(art), "artifacts")
        if results["status"] == "failed":
            self.client.set_tag(run_id, "error", str(results.get("error", ""))[:4000])
        self.client.set_tag(run_id, "mirrored_status", results["status"])
        self.client.set_tag(run_id, "mirrored_state", state)
        self.client.set_terminated(run_id, "FINISHED" if results["status"] == "complete" else "FAILED")
        return run_id

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")


def _digest(metrics: dict) -> str:
    return hashlib.sha256(json.dumps(metrics, sort_keys=True, default=str).encode()).hexdigest()[:12]


def spec_label(spec: dict) -> str:
    return f"{spec['method']}-{spec['bits']}-{spec['model']}-s{spec['seed']}"
