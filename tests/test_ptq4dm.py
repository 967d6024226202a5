"""PTQ4DM: NDTC draws and their timestep labels (correct and released), quantizer settings, end to end."""

import copy
import math

import pytest
import torch

from harness.calibration import TrajectoryBank
from harness.generate import make_schedule
from methods.base import BitConfig, Trajectories
from methods.ptq4dm import PTQ4DM, PTQ4DMConfig, ndtc_draws, ndtc_samples
from methods.quant.surgery import UNIFORM, quant_layers
from models.loading import load_model
from models.registry import get_model

torch.set_num_threads(1)


def test_ndtc_draws_follow_the_clamped_floored_normal():
    S, n = 100, 20000
    tau = ndtc_draws(S, n, 0.4, 0.4, seed=1).double()
    assert tau.min() >= 0 and tau.max() <= S - 1
    # Clamping puts P(N(40, 40) < 0) = Phi(-1) = 0.1587 of the mass at 0 and P(> 99) = 1 - Phi(1.475) = 0.0701 at 99.
    assert (tau == 0).double().mean().item() == pytest.approx(0.1587, abs=0.01)
    assert (tau == S - 1).double().mean().item() == pytest.approx(0.0701, abs=0.008)
    # Inside: floor(N(40, 40)); P(30 <= tau < 50) = P(30 <= z < 50) = 2 * Phi(0.25) - 1 = 0.1974.
    assert ((tau >= 30) & (tau < 50)).double().mean().item() == pytest.approx(0.1974, abs=0.01)
    assert ndtc_draws(S, 10, seed=3).tolist() == ndtc_draws(S, 10, seed=3).tolist()


def _fake_traj(S=10, N=3):
    # x[n, s] = 100 * n + s: the values say which (image, step) a sample came from.
    x = (100 * torch.arange(N).view(N, 1) + torch.arange(S).view(1, S)).float().view(N, S, 1, 1, 1)
    return Trajectories(x=x, timesteps=list(range(900, -1, -100))[:S])


def test_ndtc_labels_are_the_timestep_the_sample_was_taken_at():
    traj = _fake_traj()
    b = ndtc_samples(traj, 50, seed=0)
    tau = ndtc_draws(10, 50, seed=0)
    step = b["x"].flatten().long() % 100  # the step each x was really taken at
    assert torch.equal(step, 9 - tau)  # respaced index tau (0 = cleanest) is step S-1-tau
    assert torch.equal(b["step"], step)
    assert b["t"].tolist() == [traj.timesteps[s] for s in step.tolist()]


def test_released_labels_reproduce_the_mislabel():
    traj = _fake_traj()
    b = ndtc_samples(traj, 50, released_labels=True, seed=0)
    tau = ndtc_draws(10, 50, seed=0)
    step = b["x"].flatten().long() % 100
    assert torch.equal(step, tau)  # the x at loop counter tau ...
    assert b["t"].tolist() == [traj.timesteps[9 - k] for k in tau.tolist()]  # ... labelled as respaced index tau
    assert (b["t"] != torch.tensor([traj.timesteps[s] for s in step.tolist()])).any()


def test_presets():
    paper, fast = PTQ4DMConfig.from_preset("paper"), PTQ4DMConfig.from_preset("fast")
    assert (paper.num_samples, paper.ndtc_mean, paper.ndtc_std, paper.p, paper.reconstruction) == (
        1024, 0.4, 0.4, 2.4, False)
    assert not paper.released_labels and not paper.attention_matmuls
    assert fast.num_samples < paper.num_samples and math.ceil(fast.num_samples / fast.calib_images) == 4


@pytest.mark.parametrize("recon", [False, True])
def test_end_to_end_tiny_random(tmp_path, recon):
    m = load_model(get_model("tiny-random"))
    bank = TrajectoryBank(m, make_schedule(m, 10, "uniform"), "ddim", 0.0, tmp_path)
    cfg = PTQ4DMConfig.from_preset("fast")
    cfg.num_samples, cfg.calib_images, cfg.progress = 8, 4, False
    cfg.reconstruction, cfg.recon_iters, cfg.batch_size = recon, 2, 4
    d = m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet))
    res = PTQ4DM(cfg).quantize(d, bank, BitConfig.parse("w8a8"), UNIFORM, tmp_path)
    assert res.facts["calib_samples"] == 8 and res.facts["draws_per_trajectory"] == 2
    assert res.facts["attention_matmuls_quantized"] == 0
    layers = quant_layers(d.unet)
    assert res.facts["layers_quantized"] == len(layers)
    for layer in layers.values():
        assert layer.act_quantizer.symmetric and layer.act_quantizer.active
        assert layer.frozen_weight is not None
    assert layers["conv_in"].w_bits == 8
    with torch.no_grad():
        assert torch.isfinite(d(torch.randn(1, 3, 32, 32), torch.tensor([50]))).all()
