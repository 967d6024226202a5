"""TDQ: the step-size MLP (init, encoding), its precomputed table, and an end-to-end run on tiny-random."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from harness.calibration import TrajectoryBank
from harness.generate import make_schedule
from harness.sampling import sample_ddim
from methods.base import BitConfig
from methods.envelope import load_quantized, save_quantized
from methods.quant.step_table import StepTableQuantizer
from methods.quant.surgery import UNIFORM, quant_layers
from methods.quant.timestep import timestep_context
from methods.tdq import TDQ, TDQActQuantizer, TDQConfig, TDQStepMLP, inverse_softplus, timestep_encoding
from models.loading import load_model
from models.registry import get_model

torch.set_num_threads(1)


def test_inverse_softplus():
    for y in (1e-4, 0.05, 1.0, 30.0):
        assert math.isclose(float(F.softplus(torch.tensor(inverse_softplus(y), dtype=torch.float64))), y, rel_tol=1e-9)


def test_encoding_hand_computed():
    e = timestep_encoding(torch.tensor([0, 1]), dim=4)  # frequencies 1 and 10000^(-1/2) = 0.01
    assert torch.allclose(e[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(e[1], torch.tensor([math.sin(1.0), math.sin(0.01), math.cos(1.0), math.cos(0.01)]))


def test_mlp_outputs_initial_step_at_init():
    mlp = TDQStepMLP(init_step=0.0371, zero_point=12.0)
    assert len([m for m in mlp.net if isinstance(m, torch.nn.Linear)]) == 4  # 3 hidden layers of 64 + output
    assert mlp.net[0].out_features == 64 and isinstance(mlp.net[1], torch.nn.ReLU)
    s = mlp(torch.arange(0, 1000, 37))
    assert torch.allclose(s, torch.full_like(s, 0.0371), rtol=1e-5)
    scale, zp = mlp.params_at(torch.tensor([5, 500]))
    assert torch.equal(zp, torch.tensor([12.0, 12.0]))


def test_precomputed_table_matches_mlp_and_fallback():
    torch.manual_seed(0)
    mlp = TDQStepMLP(init_step=0.05, zero_point=3.0)
    with torch.no_grad():
        mlp.net[-1].weight.normal_(0, 0.1)  # make the step depend on t
    q = TDQActQuantizer(6, mlp)
    timesteps = [999, 700, 300, 0]
    table = q.export(timesteps)
    assert torch.allclose(table.scale, mlp(torch.tensor(timesteps)))
    assert table.scale.std() > 0
    x = torch.linspace(-1, 3, 101)
    for i, t in enumerate(timesteps):
        with timestep_context(i, t, len(timesteps)):
            assert torch.allclose(table(x), q(x))
    with timestep_context(1, 512, 3):  # never calibrated: the MLP itself
        assert table.row_for(1, 512, 3) is None and torch.allclose(table(x), q(x))


def test_end_to_end_tiny_random(tmp_path):
    m = load_model(get_model("tiny-random"))
    sch = make_schedule(m, 6, "uniform")
    bank = TrajectoryBank(m, sch, "ddim", 0.0, tmp_path / "bank")
    cfg = TDQConfig(preset="fast", calib_images=2, calib_steps=3, iters=4, batch_size=2, init_max_values=4096)
    method = TDQ(cfg)
    d = m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet))
    res = method.quantize(d, bank, BitConfig(4, 8), UNIFORM, tmp_path / "art")
    assert res.facts["calib_seconds"] > 0 and res.facts["granularity"] == "per-tensor"
    assert res.artifacts["tdq_step_sizes"].exists()
    tables = [ly.act_quantizer for ly in quant_layers(res.denoiser.unet).values() if ly.quant_act]
    assert tables and all(isinstance(q, StepTableQuantizer) and q.fallback is not None for q in tables)

    x = torch.randn(2, *m.sample_shape, generator=torch.Generator().manual_seed(3))
    out = sample_ddim(res.denoiser, x, sch)
    assert torch.isfinite(out).all()
    save_quantized(res, tmp_path / "q.safetensors")
    loaded = load_quantized(method, m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet)), BitConfig(4, 8), UNIFORM,
                            tmp_path / "q.safetensors")
    assert torch.equal(sample_ddim(loaded, x, sch), out)
    # another step count: unseen timesteps come from the MLPs
    assert torch.isfinite(sample_ddim(loaded, x, make_schedule(m, 4, "uniform"))).all()
