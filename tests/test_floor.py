"""The shipped sampling floor (models/assets/cifar10-test-cifarnet-floor.json, made by `bench floor`)."""

from __future__ import annotations

import numpy as np

from harness.leaderboard import FLOOR_FILE, headline, load_floor
from harness.metrics.floor import SIZES, floor_entry


def test_shipped_floor_is_complete_and_shrinks_with_n() -> None:
    floor = load_floor(FLOOR_FILE)
    assert [int(n) for n in floor["sizes"]] == list(SIZES)
    assert floor["bootstrap"]["resamples"] == 200 and floor["reference"] == "cifar10-test"
    fids = []
    for entry in floor["sizes"].values():
        for v in entry.values():
            assert v["ci_low"] <= v["value"] <= v["ci_high"] and np.isfinite(list(v.values())).all()
        fids.append(entry["fid/cifarnet"]["value"])
    assert all(a > b for a, b in zip(fids, fids[1:])), fids  # the finite-N bias of FID falls with N


def test_noise_scores_far_above_the_floor_of_real_images() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(32, 3, 32, 32)).astype(np.uint8)
    entry = floor_entry(noise)
    real = load_floor()["sizes"]["32"]["fid/cifarnet"]
    assert entry["fid/cifarnet"]["ci_low"] > real["ci_high"]


def test_headline_shows_the_floor_row_for_the_runs_n() -> None:
    import pandas as pd

    part = pd.DataFrame([{"method": "fp", "bits": "fp", "metric": "fid/cifarnet", "mean": 20.0, "std": np.nan,
                          "n": 1, "ci_low": 18.0, "ci_high": 23.0, "vs_rtn": ""}])
    t = headline(part, load_floor(), 256)
    assert t.iloc[0]["method"] == "floor: 256 real test images" and t.iloc[1]["method"] == "fp"
    assert t.iloc[1]["fid/cifarnet ↓"] == "20 [18, 23]"
    assert t.iloc[0]["fid/cifarnet ↓"].startswith(f"{load_floor()['sizes']['256']['fid/cifarnet']['value']:.4g} [")
    assert len(headline(part, load_floor(), 100)) == 1  # no floor for an N that was not computed


def test_rows_carry_the_methods_declared_label() -> None:
    """TDQ has no public code by its authors: wherever its row appears it says it is our recipe."""
    import pandas as pd

    from harness.leaderboard import tables
    from methods.registry import row_label

    rows = [{"model": "m", "protocol": "smoke", "reference": "r", "method": meth, "bits": "w4a8",
             "metric": "fid/cifarnet", "mean": 1.0, "std": np.nan, "n": 1, "ci_low": 0.5, "ci_high": 1.5,
             "vs_rtn": ""} for meth in ("rtn", "tdq", "tdq[hidden=4]")]
    part = pd.DataFrame(rows)
    names = list(headline(part)["method"])
    assert names == ["rtn", "tdq: TDQ-style PTQ (our recipe)", "tdq[hidden=4]: TDQ-style PTQ (our recipe)"]
    (table,) = tables(part).values()
    assert list(table.index) == names
    assert row_label("adpdm") == "adpdm" and row_label("not-a-method") == "not-a-method"
