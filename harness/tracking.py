"""Results files (the source of truth) and their MLflow mirror.

Every run writes ``results.json`` (atomically) with the top-level keys ``spec``,
``config_hash``, ``seeds``, ``versions``, ``git_revision``, ``timings``, ``metrics``,
``status`` (plus ``facts`` and ``error``). Workers only write files; the single driver
process mirrors them into MLflow (SQLite takes one writer), idempotently: a spec's
child run is found again by its ``config_hash`` tag, so a rerun never duplicates it.

The store is created and migrated by :func:`prepare_store`, which the sweep driver calls while it
holds the ``--out`` lock (harness/sweep.py): two sweeps never migrate one SQLite file at once, and a
file left half-migrated by a killed process (an ``_alembic_tmp_*`` table, a schema version that is
not MLflow's head) is repaired, or moved aside and rebuilt from the ``results.json`` files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import platform
import shutil
import sqlite3
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from harness.results import method_label
from methods.registry import row_label
from models.atomic import DiskFullError, write_text_atomic

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
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


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


class StoreError(RuntimeError):
    """The MLflow store cannot be opened or repaired; ``str(e)`` is one line with the fix."""


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain, or SQLite's "database or disk is full"."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "database or disk is full" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (None for other stores and in-memory SQLite)."""
    if not tracking_uri.startswith("sqlite://"):
        return None
    rest = tracking_uri[len("sqlite://"):]
    path = rest[1:] if rest.startswith("/") else rest
    return None if path in ("", ":memory:") else Path(path)


def _head_revision() -> str | None:
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        return _get_latest_schema_revision()
    except Exception:  # private API moved: skip the version check, keep the other checks
        return None


def store_problem(path: Path) -> str | None:
    """Why the SQLite store at ``path`` is not a fully migrated MLflow store, or None (also for an empty file)."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
            version = (con.execute("select version_num from alembic_version").fetchall()
                       if "alembic_version" in tables else [])
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return f"not a readable SQLite database ({e})"
    if not tables:
        return None  # empty: MLflow creates the tables
    tmp = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if tmp:
        return f"an interrupted schema migration left {', '.join(tmp)}"
    if not version:
        return "it has MLflow tables but no alembic_version row"
    head = _head_revision()
    if head is not None and version[0][0] != head:
        return f"schema version {version[0][0]}, MLflow {mlflow.__version__} expects {head}"
    return None


def _count_runs(path: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(con.execute("select count(*) from runs").fetchone()[0])
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return 0


def _fix_in_place(path: Path) -> None:
    """Finish or undo the batch table copies alembic left, then run MLflow's migrations to the head."""
    import sqlalchemy
    from mlflow.store.db.utils import _upgrade_db

    con = sqlite3.connect(path)
    try:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        for tmp in sorted(t for t in tables if t.startswith("_alembic_tmp_")):
            orig = tmp.removeprefix("_alembic_tmp_")
            if orig in tables:  # the copy never replaced the original: drop the copy
                con.execute(f'drop table "{tmp}"')
            else:  # the original was dropped before the rename: the copy is the table
                con.execute(f'alter table "{tmp}" rename to "{orig}"')
        con.commit()
    finally:
        con.close()
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        _upgrade_db(engine)
    finally:
        engine.dispose()
    problem = store_problem(path)
    if problem:
        raise StoreError(problem)


def _repair(path: Path, problem: str) -> str:
    """Repair a broken store; returns the one-line note for the user."""
    if _count_runs(path) == 0:  # a store that never held a run: start it afresh
        path.unlink()
        return f"MLflow store {path} was broken ({problem}) and held no runs: created afresh"
    backup = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copy2(path, backup)
    try:
        _fix_in_place(path)
        return f"MLflow store {path} was broken ({problem}): repaired (a copy of the old file is in {backup})"
    except Exception as e:
        if is_disk_full(e):
            raise
        path.unlink()
        return (f"MLflow store {path} was broken ({problem}) and could not be migrated: moved to {backup} and "
                "created afresh; this sweep's runs are mirrored again from their results.json (rerun other sweeps "
                "on this --out to mirror theirs)")


def prepare_store(tracking_uri: str) -> str | None:
    """Create and migrate the store once, repairing a broken SQLite file first. Call it while holding the
    ``--out`` lock. Returns a one-line note when something was repaired; raises :class:`StoreError`
    (one line) when the store cannot be opened, :class:`DiskFullError` when the disk is full."""
    path = sqlite_path(tracking_uri)
    note = None
    if path is not None and path.is_file() and path.stat().st_size > 0:
        problem = store_problem(path)
        if problem:
            note = _repair(path, problem)
    try:
        MlflowClient(tracking_uri).search_experiments(max_results=1)  # creates and migrates the tables
    except Exception as e:
        if path is not None and is_disk_full(e):
            raise DiskFullError(path, 64 * 2**20) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        fix = f"move {path} aside and rerun (the runs are mirrored again from results.json)" if path else \
            "check that the tracking server or database is up and at a supported MLflow version"
        raise StoreError(f"MLflow store {path or tracking_uri} does not open ({first}): {fix}") from None
    return note


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:500]


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a sqlite store live beside it (``OUT/mlartifacts``), not in MLflow's default ``./mlruns``
    of whatever directory the sweep was started from; other stores keep their server's default."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


class Tracker:
    """MLflow mirror for one sweep: an experiment per protocol, a parent run per sweep."""

    def __init__(self, tracking_uri: str, protocol: str, sweep_hash: str, sweep_args: dict) -> None:
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        name = f"dmqbench-{protocol}"
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            name, artifact_location=artifact_root(tracking_uri))
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
            if spec.get("variant"):
                tags["variant"] = spec["variant"]
            if row_label(spec["method"]) != spec["method"]:  # e.g. "TDQ-style PTQ (our recipe)"
                tags["method_label"] = row_label(spec["method"])
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
        for net, ref in (results.get("reference") or {}).items():  # which statistics the metrics compare with
            self.client.set_tag(run_id, f"reference/{net}", f"{ref.get('name')}@{str(ref.get('sha256'))[:16]}")
        if results["status"] == "failed":
            self.client.set_tag(run_id, "error", str(results.get("error", ""))[:4000])
        self.client.set_tag(run_id, "mirrored_status", results["status"])
        self.client.set_tag(run_id, "mirrored_state", state)
        self.client.set_terminated(run_id, "FINISHED" if results["status"] == "complete" else "FAILED")
        return run_id

    def finish(self, ok: bool, status: str | None = None) -> None:
        """End the sweep's parent run: FINISHED or FAILED by ``ok``, or ``status`` (e.g. KILLED) when given."""
        self.client.set_terminated(self.parent_id, status or ("FINISHED" if ok else "FAILED"))


def _digest(metrics: dict) -> str:
    return hashlib.sha256(json.dumps(metrics, sort_keys=True, default=str).encode()).hexdigest()[:12]


def spec_label(spec: dict) -> str:
    return f"{method_label(spec)}-{spec['bits']}-{spec['model']}-s{spec['seed']}"
