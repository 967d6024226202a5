"""PTQ4DM: NDTC draws and their timestep labels (correct and released), quantizer settings, end to end."""

import copy

import pytest
import torch

from harness.calibration import TrajectoryBank
from harness.generate import make_schedule
from methods.base import BitConfig, Trajectories
from methods.ptq4dm import PTQ4DM, PTQ4DMConfig, ndtc_draws, ndtc_samples
from methods.quant.layers import OutputQuantLayer
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


def test_released_labels_reproduce_the_released_pairing():
    traj = _fake_traj()
    b = ndtc_samples(traj, 50, released_labels=True, seed=0, train_steps=4000)
    tau = ndtc_draws(10, 50, seed=0)
    step = b["x"].flatten().long() % 100
    # the sampler's output of loop step tau = the input of step tau + 1 (the final image is not cached)
    assert torch.equal(step, (tau + 1).clamp(max=9))
    # the raw index tau as model time (t * 1000 / T in IDDPM), i.e. training timestep tau * T / 1000
    assert b["t"].tolist() == [4 * k for k in tau.tolist()]


def _two_layer(cfg):
    """conv_in -> SiLU -> conv_out, built by PTQ4DM.layer as in a UNet."""
    g = torch.Generator().manual_seed(0)
    c1, c2 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 3, 3, padding=1)
    for c in (c1, c2):
        c.weight.data = torch.randn(c.weight.shape, generator=g) * 0.3
    method = PTQ4DM(cfg)
    return method.layer("conv_in", c1, 8, 8, {}), method.layer("conv_out", c2, 8, 8, {}), g


def _on_grid(y, q):
    k = y / q.scale + q.zero_point
    return torch.allclose(k, k.round(), atol=1e-3)


@pytest.mark.parametrize("position", ["output", "input"])
def test_which_tensors_carry_quantizers(position):
    silu = torch.nn.functional.silu
    conv = torch.nn.functional.conv2d
    l1, l2, g = _two_layer(PTQ4DMConfig(act_position=position))
    x = torch.randn(2, 3, 6, 6, generator=g)
    for ly in (l1, l2):
        ly.init_weight_range("qdrop")
    with torch.no_grad():
        h = silu(l1.module(x))
        for ly, inp in ((l1, x), (l2, h)):
            ly.act_quantizer.init_range(ly.module(inp) if position == "output" else inp, "qdrop")
        y1 = l1(x)
        y2 = l2(silu(y1))
        w1, w2 = l1.quantized_weight(), l2.quantized_weight()
        plain1 = conv(x, w1, l1.module.bias, padding=1)
        if position == "output":
            # the image enters unquantized; conv_in's output is on its grid; the network output is FP
            assert l1.act_quantizer.active and not l2.quant_act
            assert torch.equal(y1, l1.act_quantizer(plain1)) and not torch.equal(y1, plain1)
            assert _on_grid(y1, l1.act_quantizer)
            assert torch.equal(y2, conv(silu(y1), w2, l2.module.bias, padding=1))
        else:
            # inputs quantized: the image itself goes through conv_in's input quantizer
            qx = l1.act_quantizer(x)
            assert not torch.equal(qx, x) and _on_grid(qx, l1.act_quantizer)
            assert torch.allclose(y1, conv(qx, w1, l1.module.bias, padding=1))
            assert l2.quant_act and not _on_grid(y2, l2.act_quantizer)


def test_qdrop_grid_and_search():
    """QDrop's "symmetric": 2^b levels over [-thr, thr] (or [0, thr] for one-signed data), thr = max|x| i/100."""
    from methods.quant.quantizer import UniformQuantizer

    g = torch.Generator().manual_seed(1)
    signed = torch.randn(4000, generator=g)
    q = UniformQuantizer(8, False, None)
    lo, hi = q.fit_range(signed, "qdrop")
    i = float(hi / signed.abs().max() * 100)
    assert torch.isclose(-lo, hi) and i == pytest.approx(round(i), abs=1e-3) and round(i) < 100
    q.set_range(lo, hi)
    assert int(q.zero_point) == 128 and torch.isclose(q.scale, 2 * hi / 255)  # 256 levels on [-thr, thr]
    lo, hi = q.fit_range(signed.clamp_min(0), "qdrop")
    q.set_range(lo, hi)
    assert float(lo) == 0 and int(q.zero_point) == 0 and torch.isclose(q.scale, hi / 255)  # all levels on [0, thr]
    w = torch.randn(3, 5, generator=g) * torch.tensor([[0.1], [1.0], [10.0]])
    lo, hi = UniformQuantizer(4, False, 0).fit_range(w, "qdrop")  # one threshold per output channel
    assert lo.shape == (3,) and torch.allclose(-lo, hi) and hi[2] > hi[1] > hi[0]


def test_attention_projections_stay_fp_by_default(tmp_path):
    from diffusers.models.attention_processor import Attention

    m = load_model(get_model("tiny-random"))
    bank = TrajectoryBank(m, make_schedule(m, 10, "uniform"), "ddim", 0.0, tmp_path)
    for proj in (False, True):
        cfg = PTQ4DMConfig.from_preset("fast")
        cfg.num_samples, cfg.calib_images, cfg.progress, cfg.attention_projections = 8, 4, False, proj
        d = m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet))
        PTQ4DM(cfg).quantize(d, bank, BitConfig.parse("w8a8"), UNIFORM, tmp_path / str(proj))
        attn = next(a for a in d.unet.modules() if isinstance(a, Attention))
        fp = [type(lin) is torch.nn.Linear for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])]
        assert fp == [not proj] * 4
        assert PTQ4DM(cfg).paper_scope().selects("mid_block.attentions.0.to_q") == proj


def test_end_to_end_tiny_random(tmp_path):
    m = load_model(get_model("tiny-random"))
    bank = TrajectoryBank(m, make_schedule(m, 10, "uniform"), "ddim", 0.0, tmp_path)
    cfg = PTQ4DMConfig.from_preset("fast")
    cfg.num_samples, cfg.calib_images, cfg.progress = 8, 4, False
    d = m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet))
    res = PTQ4DM(cfg).quantize(d, bank, BitConfig.parse("w8a8"), UNIFORM, tmp_path)
    assert res.facts["calib_samples"] == 8 and res.facts["draws_per_trajectory"] == 2
    assert res.facts["attention_matmuls_quantized"] == 0
    layers = quant_layers(d.unet)
    assert all(type(ly) is OutputQuantLayer for ly in layers.values())
    for name, layer in layers.items():
        assert layer.act_quantizer.active == (name != "conv_out") and layer.frozen_weight is not None
    assert layers["conv_in"].w_bits == 8
    with torch.no_grad():
        assert torch.isfinite(d(torch.randn(1, 3, 32, 32), torch.tensor([50]))).all()


def test_reconstruction_learns_and_bakes_adaround_layer_wise(tmp_path):
    from methods.quant.adaround import AdaRoundQuantizer
    from methods.quant.base import fake_quant

    m = load_model(get_model("tiny-random"))
    bank = TrajectoryBank(m, make_schedule(m, 10, "uniform"), "ddim", 0.0, tmp_path)
    cfg = PTQ4DMConfig.from_preset("fast")
    cfg.num_samples, cfg.calib_images, cfg.progress = 8, 4, False
    cfg.reconstruction, cfg.recon_iters, cfg.batch_size, cfg.w_lr = True, 30, 4, 1e-1
    d = m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet))
    res = PTQ4DM(cfg).quantize(d, bank, BitConfig.parse("w4a8"), UNIFORM, tmp_path)
    layers = quant_layers(d.unet)
    assert res.facts["recon_units"] == len(layers)  # one unit per layer (QDrop has no IDDPM block)
    moved = 0
    for name, ly in layers.items():
        q = ly.weight_quantizer
        assert not isinstance(q, AdaRoundQuantizer)  # baked into plain on-grid weights
        w_fp = m.denoiser.unet.get_submodule(name).weight
        nearest = fake_quant(w_fp, q.scale, q.zero_point, *q.qmin_qmax)
        assert _on_grid(ly.module.weight, q)  # the baked weight is on the quantizer's grid ...
        moved += int((ly.module.weight != nearest).sum())
    assert moved > 0  # ... and AdaRound rounded some weights away from nearest
