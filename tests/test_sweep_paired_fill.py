"""One executor call per sweep: a quantized run that ends *before* its FP reference (as in one
Slurm array, where both run at once) gets its paired metrics from the driver once the
reference is done, and is mirrored to MLflow with them, once."""

import json
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from harness.metrics import paired_metrics
from harness.runner import RunOptions, run_dir, run_one
from harness.shards import ShardStore
from harness.spec import expand
from harness.sweep import run_sweep
from harness.tracking import default_tracking_uri


def test_paired_metrics_filled_in_when_fp_finishes_last(tmp_path: Path) -> None:
    specs = expand("rtn", "tiny-random", "w8a8", num_samples=8, steps=3)
    opts = RunOptions(out=tmp_path)
    calls: list[list[str]] = []
    missing_when_done: dict[str, bool] = {}

    def fp_last_executor(todo, opts, on_done):
        """A real executor that runs the FP reference last (the order a busy array may produce)."""
        calls.append([s.method for s in todo])
        for spec in sorted(todo, key=lambda s: s.method == "fp"):
            res = run_one(spec, opts)
            missing_when_done[spec.method] = "paired/mse" not in res["metrics"]
            on_done(spec)

    outcome = run_sweep(specs, opts, default_tracking_uri(tmp_path), {}, fp_last_executor)
    assert outcome.ok and sorted(outcome.completed) == sorted(s.run_name for s in specs)
    assert calls == [["fp", "rtn"]]  # one executor call for the whole sweep, FP listed first
    assert missing_when_done == {"rtn": True, "fp": False}  # rtn really ended without its paired metrics

    rtn, fp = (next(s for s in specs if s.method == m) for m in ("rtn", "fp"))
    res = json.loads((run_dir(rtn, tmp_path) / "results.json").read_text())
    q = ShardStore(run_dir(rtn, tmp_path) / "samples", 8).load_all()
    ref = ShardStore(run_dir(fp, tmp_path) / "samples", 8).load_all()
    expected = paired_metrics(q, ref)
    assert expected["paired/mse"] > 0
    assert res["metrics"]["paired/mse"] == expected["paired/mse"]
    assert res["metrics"]["paired/psnr"] == expected["paired/psnr"]
    assert np.isfinite(res["metrics"]["paired/psnr"])

    client = MlflowClient(default_tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("dmqbench-smoke")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'run'")
    assert sorted(r.data.tags["method"] for r in runs) == ["fp", "rtn"]  # once each
    mirrored = next(r for r in runs if r.data.tags["method"] == "rtn")
    assert mirrored.data.metrics["paired/mse"] == expected["paired/mse"]


def test_rerun_fills_in_paired_metrics_left_missing(tmp_path: Path) -> None:
    """A driver that died between the runs and the fill-in: the rerun completes the results and MLflow."""
    specs = expand("rtn", "tiny-random", "w8a8", num_samples=8, steps=3)
    opts = RunOptions(out=tmp_path)
    for spec in sorted(specs, key=lambda s: s.method == "fp"):  # workers only, no driver
        run_one(spec, opts)
    rtn = next(s for s in specs if s.method == "rtn")
    assert "paired/mse" not in json.loads((run_dir(rtn, tmp_path) / "results.json").read_text())["metrics"]

    outcome = run_sweep(specs, opts, default_tracking_uri(tmp_path), {})
    assert sorted(outcome.skipped) == sorted(s.run_name for s in specs)
    res = json.loads((run_dir(rtn, tmp_path) / "results.json").read_text())
    assert res["metrics"]["paired/mse"] > 0
    client = MlflowClient(default_tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("dmqbench-smoke")
    runs = client.search_runs([exp.experiment_id], "tags.method = 'rtn'")
    assert len(runs) == 1 and runs[0].data.metrics["paired/mse"] == res["metrics"]["paired/mse"]
