"""SIGKILL a sweep during sampling, rerun the same command: complete runs are skipped, the killed run
resumes from its last complete shard, samples are bit-identical to an uninterrupted run, and MLflow has
exactly one child run per spec."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_kill import kill_mid_sampling
from mlflow.tracking import MlflowClient

from harness.shards import SHARD_SIZE, ShardStore
from harness.tracking import default_tracking_uri

NUM = 3 * SHARD_SIZE



def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "run", "--methods", "fp,rtn", "--models", "tiny-random",
            "--bits", "w8a8", "--num-samples", str(NUM), "--steps", "3", "--device", "cpu", "--out", str(out)]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = subprocess.Popen(_cmd(out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed = kill_mid_sampling(proc, out / "runs" / "tiny-random", "rtn-w8a8-*", NUM, timeout=240)
    rtn_dir, done_at_kill = killed if killed else (None, None)
    assert rtn_dir is not None, "the sweep ended before it could be killed mid-sampling: " + \
        (proc.stdout.read().decode()[-2000:] if proc.stdout else "")
    assert proc.returncode == -signal.SIGKILL
    assert not (rtn_dir / "results.json").exists()

    again = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1 ran, 1 already complete, 0 failed" in again.stdout
    res = json.loads((rtn_dir / "results.json").read_text())
    assert res["status"] == "complete"
    assert res["facts"]["images_generated_this_attempt"] == NUM - SHARD_SIZE * len(done_at_kill)

    # uninterrupted reference of the same spec, in a fresh directory
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "harness.worker", "--spec", str(rtn_dir / "spec.json"),
                        "--out", str(ref)], env=_env(), capture_output=True, text=True, timeout=300)
    ref_dir = ref / "runs" / "tiny-random" / rtn_dir.name
    assert (ref_dir / "samples").is_dir(), r.stdout[-2000:] + r.stderr[-2000:]
    a = ShardStore(rtn_dir / "samples", NUM).load_all()
    b = ShardStore(ref_dir / "samples", NUM).load_all()
    assert np.array_equal(a, b), "resumed samples differ from an uninterrupted run"

    client = MlflowClient(default_tracking_uri(out))
    exp = client.get_experiment_by_name("dmqbench-smoke")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'run'")
    hashes = [x.data.tags["config_hash"] for x in runs]
    assert sorted(hashes) == sorted({h for h in hashes}) and len(hashes) == 2, hashes
    assert all(x.data.tags.get("mirrored_status") == "complete" for x in runs)
