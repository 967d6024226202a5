"""Concurrent sweeps and broken MLflow stores: two ``bench run`` started at once on a fresh ``--out`` both end
cleanly (one sweeps, the other exits 2 naming the holder's pid, or finds everything complete), a third run
reports everything complete, and MLflow has one child per spec; a half-migrated store is repaired."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.spec import expand
from harness.sweep import sweep_lock
from harness.tracking import default_tracking_uri, store_problem

ARGS = ["--models", "tiny-random", "--methods", "fp,rtn", "--bits", "w8a8", "--num-samples", "8", "--steps", "2",
        "--device", "cpu"]


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "run", *ARGS, "--out", str(out)]


ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    """This checkout's code in the subprocess whatever the cwd (an editable install may point elsewhere)."""
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)


def _children(out: Path) -> list:
    client = MlflowClient(default_tracking_uri(out))
    exp = client.get_experiment_by_name("dmqbench-smoke")
    return client.search_runs([exp.experiment_id], "tags.kind = 'run'")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("bench")]


@pytest.mark.slow
def test_two_sweeps_started_together_on_a_fresh_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cmd(out), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    for rc, stdout, stderr in results:
        assert "Traceback" not in stderr, stderr[-3000:]
        if rc == 2:  # the loser: one line naming the holder
            assert len(_error_lines(stderr)) == 1 and "in use by another bench run (pid " in stderr, stderr
        else:
            assert rc == 0, stdout + stderr[-3000:]
    assert codes in ([0, 0], [0, 2])
    third = subprocess.run(_cmd(out), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "done: 0 ran, 2 already complete, 0 failed" in third.stdout, third.stderr
    children = _children(out)
    assert len(children) == 2 and len({r.data.tags["config_hash"] for r in children}) == 2
    assert store_problem(out / "mlflow.db") is None


@pytest.mark.slow
def test_locked_out_exits_2_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with sweep_lock(out):  # this test process is "the other sweep"
        r = subprocess.run(_cmd(out), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout + r.stderr
    assert _error_lines(r.stderr) == [line for line in r.stderr.strip().splitlines()]
    assert f"pid {os.getpid()}" in r.stderr and "--out" in r.stderr
    assert not (out / "mlflow.db").exists() and not (out / "runs").exists()  # it did no work


def _break_store(db: Path) -> None:
    """What a migration killed half-way leaves: an _alembic_tmp_* copy and an older alembic version."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    revs = [s.revision for s in ScriptDirectory.from_config(_get_alembic_config("")).walk_revisions()]
    con = sqlite3.connect(db)
    con.execute("update alembic_version set version_num = ?", (revs[3],))
    con.execute("create table _alembic_tmp_tags as select * from tags")
    con.commit()
    con.close()


@pytest.mark.slow
def test_half_migrated_store_is_repaired_and_the_runs_mirrored_again(tmp_path: Path) -> None:
    from harness.runner import RunOptions
    from harness.sweep import run_sweep

    out = tmp_path / "out"
    specs = expand("fp,rtn", "tiny-random", "w8a8", [0], "smoke", None, "uniform", 8, 2)
    assert run_sweep(specs, RunOptions(out=out), default_tracking_uri(out), {}).ok
    _break_store(out / "mlflow.db")
    assert store_problem(out / "mlflow.db") is not None
    r = subprocess.run(_cmd(out), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "done: 0 ran, 2 already complete" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("bench: MLflow store")]
    assert len(notes) == 1 and "_alembic_tmp_tags" in notes[0]
    assert store_problem(out / "mlflow.db") is None
    assert list(out.glob("mlflow.db.broken-*"))  # the old file is kept
    children = _children(out)
    assert len(children) == 2 and all(c.data.metrics.get("fid/cifarnet") is not None for c in children)
