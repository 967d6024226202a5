"""The trajectory bank: what it caches is what sampling those seeds gives, and rounds are their own seeds."""

import torch

from harness.calibration import CALIB_SEED_BASE, ROUND_SEED_STRIDE, TrajectoryBank, record_trajectories
from harness.generate import make_schedule
from models.loading import load_model
from models.registry import get_model


def test_rounds_are_recorded_once_and_equal_a_fresh_recording(tmp_path):
    m = load_model(get_model("tiny-random"))
    sch = make_schedule(m, 3, "uniform")
    bank = TrajectoryBank(m, sch, "ddim", 0.0, tmp_path)
    first = bank.generate(2, 1)
    seeds = [CALIB_SEED_BASE + 2 * ROUND_SEED_STRIDE + j for j in range(2)]
    fresh = record_trajectories(m, m.denoiser, sch, "ddim", 0.0, seeds, "cpu")
    assert torch.equal(first.x, fresh.x) and torch.equal(first.eps, fresh.eps)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].endswith("-round1.safetensors")
    stamp = (tmp_path / files[0]).stat().st_mtime_ns
    again = bank.generate(2, 1)  # from the file, not sampled again
    assert torch.equal(again.x, first.x) and (tmp_path / files[0]).stat().st_mtime_ns == stamp
    other = bank.generate(2, 0)
    assert not torch.equal(other.x[:, 0], first.x[:, 0])  # another round starts from other noise
    assert not torch.equal(bank.trajectories(2).x[:, 0], first.x[:, 0])  # and so does the bank itself
