"""Sweeps through a real single-node Slurm (``--executor slurm``, real sbatch via submitit): a
two-job sweep is one array job whose results land in MLflow exactly once each, also after a
rerun; a preempted (USR2-signalled) task is requeued by submitit and resumes from its shards.

Uses a running Slurm when ``sinfo`` answers; else starts one with ci/slurm/setup.sh when
``DMQ_START_SLURM=1`` (root, Debian); else skips with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
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
    assert len(job_ids) == 1, log  # one array job for the whole sweep, FP reference included

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


def _squeue_state(job: str) -> str:
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def test_preempted_job_requeues_and_resumes(slurm, tmp_path: Path) -> None:
    """Preemption as Slurm delivers it to submitit: USR2 to the running task (what ``--signal``
    sends before a timeout or a preemption). submitit checkpoints and requeues the task; Slurm
    holds a requeued job ~2 min (BeginTime), which the test releases; the run resumes from its
    complete shards, and the sweep's results land in MLflow once each."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "harness.cli", "run", "--methods", "rtn", "--models", "tiny-random",
           "--bits", "w8a8", "--num-samples", "320", "--steps", "20", "--out", str(out), "--device", "cpu",
           "--executor", "slurm", "--slurm-gpus", "0", "--slurm-time", "10", "--slurm-parallelism", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DMQ_SLURM_MAX_WAIT_S="300")
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        head = []
        for line in driver.stdout:  # the driver prints the array id once it has submitted
            head.append(line)
            if line.startswith("slurm: submitted"):
                break
        array_id = head[-1].split("(")[1].split(")")[0]
        task = f"{array_id}_1"  # the list is FP first, so task 1 is the rtn run
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # signal once the task has written part of its shards
            samples = next(iter(out.glob("runs/tiny-random/rtn-*/samples")), None)
            done = len(list(samples.glob("shard-*.npz"))) if samples else 0
            if 1 <= done < 5:
                break
            time.sleep(0.1)
        assert samples is not None and 1 <= done < 5, f"rtn never reached a partial state ({done} shards)"
        shards_before = done
        subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=30)

        while time.monotonic() < deadline:  # requeued jobs wait for BeginTime: release it now
            if _squeue_state(task) == "PENDING":
                subprocess.run(["scontrol", "update", f"jobid={task}", "StartTime=now"], timeout=30)
                break
            time.sleep(0.5)
        rest, _ = driver.communicate(timeout=360)
    finally:
        if driver.poll() is None:
            driver.kill()
    log = "".join(head) + rest
    assert driver.returncode == 0, log[-4000:]

    results = {json.loads(p.read_text())["spec"]["method"]: json.loads(p.read_text())
               for p in out.glob("runs/*/*/results.json")}
    assert set(results) == {"fp", "rtn"} and all(x["status"] == "complete" for x in results.values()), log
    rtn = results["rtn"]
    assert rtn["worker"]["SLURM_RESTART_COUNT"] == "1", rtn["worker"]  # the second attempt wrote it
    # the second attempt generated only what the first had not finished
    assert rtn["facts"]["images_generated_this_attempt"] <= 320 - 64 * shards_before, (shards_before, rtn["facts"])
    assert "paired/mse" in rtn["metrics"]

    sacct = subprocess.run(["sacct", "-n", "-D", "-X", "-P", "-o", "JobID,State", "-j", task],
                           capture_output=True, text=True, timeout=30)
    states = [line.split("|")[1] for line in sacct.stdout.split()]
    assert "REQUEUED" in states and states[-1] == "COMPLETED", sacct.stdout + sacct.stderr

    runs = _children(out)
    assert sorted(x.data.tags["config_hash"] for x in runs) == sorted(x["config_hash"] for x in results.values())
    print(f"requeue: USR2 after {shards_before}/5 shards; second attempt generated "
          f"{rtn['facts']['images_generated_this_attempt']} of 320 images; sacct states {states}")
