"""`bench perf` on CPU at tiny sizes: the table prints and lands in MLflow."""

from __future__ import annotations

import math

import mlflow
from click.testing import CliRunner

from harness.cli import main
from harness.perf import PERF_EXPERIMENT, PerfConfig, run_perf


def test_run_perf_table_on_cpu(tmp_path):
    cfg = PerfConfig(model="tiny-random", device="cpu", batch_size=2, steps=2, methods=["rtn"], bits=["w8a8"],
                     metric_images=16, cache_dir=str(tmp_path))
    df = run_perf(cfg, echo=lambda s: None)
    sampling = df[df["kind"] == "sampling"]
    assert set(sampling["method"]) == {"fp", "rtn"}
    assert set(sampling["mode"]) == {"eager", "fast-fp32"}
    assert (sampling["images_per_s"] > 0).all()
    assert math.isnan(sampling["peak_mem_mib"].iloc[0])  # CPU: no GPU memory figure
    calib = df[df["kind"] == "calibration"]
    assert len(calib) == 1 and calib["seconds"].iloc[0] > 0
    assert "metric-features" in set(df["kind"])


def test_bench_perf_cli_prints_and_logs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'perf.db'}"
    res = CliRunner().invoke(main, ["perf", "--model", "tiny-random", "--device", "cpu", "--batch-size", "2",
                                    "--steps", "2", "--methods", "rtn", "--bits", "w4a8", "--metric-images", "0",
                                    "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert "time_ratio_vs_fp" in res.output and "rtn" in res.output
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[PERF_EXPERIMENT])
    assert len(runs) == 1
    assert any(c.startswith("metrics.sampling/rtn/w4a8") for c in runs.columns)


def test_bench_perf_rejects_bad_bits():
    res = CliRunner().invoke(main, ["perf", "--bits", "w9a8"])
    assert res.exit_code == 2 and "w9a8" in res.output
