"""``bench regress``: the committed-style baseline passes, a degraded method configuration fails (exit 1,
metric named), bad input exits 2; the table goes to $GITHUB_STEP_SUMMARY."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import regress as R

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("GITHUB_STEP_SUMMARY", None) if not env_extra or "GITHUB_STEP_SUMMARY" not in env_extra else None
    return subprocess.run([sys.executable, "-m", "harness.cli", "regress", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_judge_is_direction_aware() -> None:
    tol = {"abs": 0.5, "rel": 0.05}
    assert R.judge("fid/cifarnet", 10.0, 11.6, tol)[0] == R.REGRESSED  # window 0.5 + 0.5
    assert R.judge("fid/cifarnet", 10.0, 10.9, tol)[0] == R.OK
    assert R.judge("fid/cifarnet", 10.0, 8.0, tol)[0] == R.IMPROVED
    assert R.judge("is/cifarnet", 5.0, 4.0, {"rel": 0.05})[0] == R.REGRESSED
    assert R.judge("is/cifarnet", 5.0, 6.0, {"rel": 0.05})[0] == R.IMPROVED
    assert R.judge("paired/psnr", float("inf"), float("inf"), {"rel": 0.1})[0] == R.OK
    assert R.judge("fid/cifarnet", 1.0, float("nan"), tol)[0] == R.REGRESSED
    assert R.judge("kid_std/cifarnet", 1.0, 9.0, {"ignore": True})[0] == R.IGNORED
    assert R.tolerance_for("fid/cifarnet", R.DEFAULT_TOLERANCES) == {"abs": 0.5, "rel": 0.05}
    assert R.tolerance_for("paired/psnr", R.DEFAULT_TOLERANCES) == {"rel": 0.03}


def test_bad_input_exits_2(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    r = _bench("--out", str(tmp_path), "--baseline", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "--update" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = _bench("--out", str(tmp_path), "--baseline", str(bad))
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    bad.write_text(json.dumps({"runs": [{"key": {"model": "x"}, "metrics": {}}]}))
    r = _bench("--out", str(tmp_path), "--baseline", str(bad))
    assert r.returncode == 2 and "lacks" in r.stderr



@pytest.mark.slow
def test_baseline_passes_and_degraded_config_fails(tmp_path: Path) -> None:
    from harness.runner import RunOptions
    from harness.spec import expand
    from harness.sweep import run_sweep
    from harness.tracking import default_tracking_uri

    out = tmp_path / "sweep"
    specs = expand("fp,rtn", "tiny-random", "w8a8", [0], "smoke", None, "uniform", 8, 4)
    assert run_sweep(specs, RunOptions(out=out), default_tracking_uri(out), {}).ok
    baseline = tmp_path / "baselines" / "smoke.json"
    r = _bench("--out", str(out), "--baseline", str(baseline), "--update")
    assert r.returncode == 0, r.stderr
    data = json.loads(baseline.read_text())
    assert {x["key"]["method"] for x in data["runs"]} == {"fp", "rtn"} and "fid/*" in data["tolerances"]

    summary = tmp_path / "summary.md"
    r = _bench("--out", str(out), "--baseline", str(baseline), env_extra={"GITHUB_STEP_SUMMARY": str(summary)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout and "| `fid/cifarnet` ↓ |" in r.stdout
    assert "PASS" in summary.read_text()

    # A deliberately degraded rtn: activation ranges from one image at one step (new config hash,
    # same stable key), run into the same sweep directory: the newest result of the key is compared.
    degraded = [dataclasses.replace(s, method_config={**s.method_config, "calib_images": 1, "calib_steps": 1})
                for s in specs if s.method == "rtn"]
    assert run_sweep(degraded, RunOptions(out=out), default_tracking_uri(out), {}).ok
    r = _bench("--out", str(out), "--baseline", str(baseline), env_extra={"GITHUB_STEP_SUMMARY": str(summary)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout and "config changed" in r.stdout
    assert "REGRESSION: tiny-random rtn w8a8 s0 (fast, uniform) paired/mse" in r.stderr
    assert summary.read_text().count("dmqbench regression check") == 2
