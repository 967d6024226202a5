"""``--executor gpus``: one worker process per visible GPU, each pinned by ``CUDA_VISIBLE_DEVICES``.

No GPU here: ``CUDA_VISIBLE_DEVICES=0,1`` names two GPU ids, and the executor starts real worker
processes (``python -m harness.worker``) that run on the CPU (``--device cpu``) with
``CUDA_VISIBLE_DEVICES`` set to their id. What is tested is the executor's scheduling and the driver's bookkeeping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from harness.tracking import default_tracking_uri

ARGS = ["--methods", "fp,rtn", "--models", "tiny-random", "--bits", "w8a8,w4a8", "--num-samples", "8",
        "--steps", "3", "--device", "cpu", "--executor", "gpus"]


def _bench(out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "run", *ARGS, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)


def test_one_worker_per_gpu(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1", OMP_NUM_THREADS="1")
    r = _bench(out, env)
    log = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, log
    assert "[gpu 0]" in r.stdout and "[gpu 1]" in r.stdout, log

    results = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/*/results.json"))]
    assert len(results) == 3 and all(x["status"] == "complete" for x in results), log
    pinned = [x["worker"]["CUDA_VISIBLE_DEVICES"] for x in results]
    assert set(pinned) == {"0", "1"}, pinned  # both GPUs got work, each worker saw only its own id
    assert len({x["worker"]["pid"] for x in results}) == 3  # a fresh worker process per run
    assert str(os.getpid()) not in {x["worker"]["pid"] for x in results}
    for x in results:  # paired metrics everywhere, whichever run finished first
        assert "paired/mse" in x["metrics"], x["spec"]["method"]

    client = MlflowClient(default_tracking_uri(out))
    exp = client.get_experiment_by_name("dmqbench-smoke")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'run'")
    assert sorted(r.data.tags["config_hash"] for r in runs) == sorted(x["config_hash"] for x in results)
    assert all("paired/mse" in r.data.metrics for r in runs)

    again = _bench(out, env)  # nothing to do, nothing duplicated
    assert again.returncode == 0 and "[gpu" not in again.stdout and "3 already complete" in again.stdout
    assert len(client.search_runs([exp.experiment_id], "tags.kind = 'run'")) == 3


def test_no_visible_gpu_is_a_clear_error(tmp_path: Path) -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = _bench(tmp_path / "sweep", env)
    assert r.returncode == 2
    assert "no visible GPU" in r.stderr and "--executor local" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "sweep" / "runs").exists()
