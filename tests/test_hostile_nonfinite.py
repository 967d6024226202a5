"""Non-finite numbers are failures, never scores: the first NaN/Inf layer is found by forward hooks and named
in one line; the leaderboard never shows Inf/NaN as a number; regress fails a non-finite current value;
``regress --update`` takes the protocol from the runs' specs, not the baseline's file name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from harness import regress as R
from harness.finite import NonFiniteError, assert_finite_images, check_finite_output, first_nonfinite_module
from harness.leaderboard import _cell, fmt_value


def _net() -> nn.Module:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 3, 1))
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), inner)


def test_first_nonfinite_module_in_execution_order() -> None:
    net, x = _net(), torch.randn(2, 3, 8, 8)
    assert first_nonfinite_module(lambda: net(x), net) is None
    with torch.no_grad():
        net[2][0].weight[0, 0, 0, 0] = float("inf")  # the inner conv makes Inf, later layers NaN/Inf too
    assert first_nonfinite_module(lambda: net(x), net) == "2.0"
    assert not any(m._forward_hooks for m in net.modules())  # hooks removed
    with pytest.raises(NonFiniteError) as e:
        check_finite_output(lambda: net(x), net, "rtn w4a8 probe batch")
    msg = str(e.value)
    assert "\n" not in msg and "2.0 (Conv2d)" in msg and ("NaN" in msg or "Inf" in msg) and e.value.layer == "2.0"


def test_check_finite_output_returns_a_finite_output() -> None:
    net, x = _net(), torch.randn(1, 3, 8, 8)
    assert torch.equal(check_finite_output(lambda: net(x), net, "probe"), net(x))


def test_assert_finite_images() -> None:
    assert_finite_images(np.zeros((2, 3, 4, 4), np.float32), "shard 0")
    bad = torch.zeros(2, 3, 4, 4)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"shard 3: NaN in 1 of 96 values, first at layer up.1"):
        assert_finite_images(bad, "shard 3", layer="up.1")


def test_leaderboard_never_shows_inf_or_nan_as_a_number() -> None:
    assert fmt_value(1.7976931348623157e308) == "∞" and fmt_value(math.inf) == "∞" and fmt_value(-math.inf) == "-∞"
    assert fmt_value(float("nan")) == "—" and fmt_value(12.3456) == "12.35"
    assert _cell(pd.Series({"mean": 1.7976931348623157e308, "std": float("nan"), "n": 1})) == "∞"
    assert _cell(pd.Series({"mean": 1.7976931348623157e308, "std": 0.0, "n": 2})) == "∞"
    assert _cell(pd.Series({"mean": float("nan"), "std": float("nan"), "n": 1})) == "—"
    assert _cell(pd.Series({"mean": 2.0, "std": 0.5, "n": 2})) == "2 ± 0.5"


def test_regress_fails_non_finite_current_values() -> None:
    tol = {"rel": 0.1}
    assert R.judge("paired/psnr", 30.0, math.inf, tol)[0] == R.REGRESSED  # was "improved"
    assert R.judge("fid/cifarnet", 10.0, -math.inf, tol)[0] == R.REGRESSED
    assert R.judge("paired/psnr", math.inf, math.inf, tol)[0] == R.OK  # FP against itself
    assert R.judge("paired/psnr", math.inf, 1.7976931348623157e308, tol)[0] == R.OK  # MLflow's stand-in
    assert R._fmt(1.7976931348623157e308) == "∞" and "NaN" in R._fmt(float("nan"))


def _results(out: Path, protocol: str, psnr: float) -> None:
    spec = {"model": "tiny-random", "protocol": protocol, "method": "rtn", "bits": "w8a8", "seed": 0,
            "preset": "fast", "scope": "uniform", "num_samples": 8, "steps": 2}
    d = out / "runs" / "tiny-random" / f"rtn-{protocol}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"spec": spec, "config_hash": "h", "status": "complete",
                                                "metrics": {"paired/psnr": psnr}}))


def test_regress_update_takes_the_protocol_from_the_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _results(out, "smoke", 30.0)
    path = tmp_path / "my-ci-baseline.json"  # the file name is not a protocol
    data = R.update(out, path)
    assert data["protocol"] == "smoke" and len(data["runs"]) == 1
    report = R.check(out, path)
    assert report.ok
    _results(out, "paper", 31.0)
    with pytest.raises(R.RegressError, match="--protocol"):
        R.update(out, tmp_path / "other.json")
    assert R.update(out, tmp_path / "other.json", "paper")["protocol"] == "paper"


def test_regress_check_nan_current_is_a_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _results(out, "smoke", 30.0)
    path = tmp_path / "smoke.json"
    R.update(out, path)
    res = out / "runs" / "tiny-random" / "rtn-smoke" / "results.json"
    d = json.loads(res.read_text())
    d["metrics"]["paired/psnr"] = float("nan")
    res.write_text(json.dumps(d))
    report = R.check(out, path)
    assert not report.ok and report.failures[0].metric == "paired/psnr"
    assert R._fmt(report.failures[0].current) == "NaN (failure)"
    row = next(line for line in R.to_markdown(report).splitlines() if line.startswith("| ") and "psnr" in line)
    assert "NaN (failure)" in row and "| nan |" not in row
