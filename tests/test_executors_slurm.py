"""A two-job sweep through a real single-node Slurm (``--executor slurm``, real sbatch via submitit):
results land in MLflow exactly once each, also after a rerun.

Uses a running Slurm when ``sinfo`` answers; else starts one with ci/slurm/setup.sh when
``DMQ_START_SLURM=1`` (root, Debian); else skips with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.tracking import default_tracking_uri

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]


def _sinfo_ok() -> tuple[bool, str]:
    if shutil.which("sinfo") is None:
        return False, "sinfo not installed"
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"sinfo failed: {e}"
    states = r.stdout.split()
    if r.returncode != 0:
        return False, f"sinfo failed: {r.stderr.strip()[:200]}"
    if not any(s.rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in states):
        return False, f"no usable Slurm node (states: {states})"
    return True, "ok"


@pytest.fixture(scope="module")
def slurm() -> None:
    ok, why = _sinfo_ok()
    if ok:
        return
    if os.environ.get("DMQ_START_SLURM") != "1":
        pytest.skip(f"Slurm is not running ({why}); set DMQ_START_SLURM=1 to start one with ci/slurm/setup.sh")
    r = subprocess.run(["bash", str(ROOT / "ci" / "slurm" / "setup.sh")], capture_output=True, text=True, timeout=300)
    ok, why2 = _sinfo_ok()
    if not ok:
        pytest.skip(f"could not start Slurm ({why2}): {r.stdout[-800:]} {r.stderr[-800:]}")


def _children(out: Path) -> list:
    client = MlflowClient(default_tracking_uri(out))
    exp = client.get_experiment_by_name("dmqbench-smoke")
    return client.search_runs([exp.experiment_id], "tags.kind = 'run'")


def test_two_job_sweep_through_sbatch(slurm, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "harness.cli", "run", "--methods", "fp,rtn", "--models", "tiny-random",
           "--bits", "w8a8", "--num-samples", "8", "--steps", "3", "--out", str(out), "--device", "cpu",
           "--executor", "slurm", "--slurm-gpus", "0", "--slurm-time", "10", "--slurm-parallelism", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DMQ_SLURM_MAX_WAIT_S="240")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=360)
    log = r.stdout[-3000:] + r.stderr[-3000:]
    assert "slurm: submitted" in r.stdout, log
    job_ids = sorted({line.split("(")[1].split(")")[0] for line in r.stdout.splitlines()
                      if line.startswith("slurm: submitted")})
    assert job_ids, log

    results = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/*/results.json"))]
    assert len(results) == 2, log
    assert r.returncode == 0, log
    assert all(x["status"] == "complete" for x in results), log
    runs = _children(out)
    hashes = sorted(x.data.tags["config_hash"] for x in runs)
    assert hashes == sorted(x["config_hash"] for x in results), (hashes, log)  # once each

    # the jobs really went through Slurm's accounting
    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                           capture_output=True, text=True, timeout=30)
    states = dict(line.split("|", 1) for line in sacct.stdout.split())
    assert states and all(s == "COMPLETED" for s in states.values()), sacct.stdout + sacct.stderr

    # rerun: nothing is submitted, nothing is duplicated
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=360)
    assert "slurm: submitted" not in r2.stdout
    assert "2 already complete" in r2.stdout, r2.stdout[-2000:]
    assert sorted(x.data.tags["config_hash"] for x in _children(out)) == hashes
