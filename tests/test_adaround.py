"""AdaRound: rectified sigmoid, initialisation, beta schedule, hardening, a layer-output win over RTN."""

import torch
from torch import nn

from methods.quant.adaround import (
    AdaRoundQuantizer,
    attach_adaround,
    beta_schedule,
    hardness,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
)
from methods.quant.layers import QuantLayer
from methods.quant.quantizer import UniformQuantizer
from methods.quant.recon import ReconConfig, Unit, reconstruct_unit

torch.set_num_threads(1)


def test_rectified_sigmoid_values_and_inverse():
    # h(0) = 0.5 * 1.2 - 0.1 = 0.5; saturates at 0 and 1.
    assert rectified_sigmoid(torch.tensor(0.0)).item() == 0.5
    assert rectified_sigmoid(torch.tensor(-20.0)).item() == 0.0
    assert rectified_sigmoid(torch.tensor(20.0)).item() == 1.0
    h = torch.tensor([0.1, 0.25, 0.7, 0.9])
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(h)), h)


def test_beta_schedule_warmup_then_linear():
    assert beta_schedule(0, 100) == 20.0
    assert beta_schedule(19, 100) == 20.0  # warm-up: 20 % of 100
    assert beta_schedule(20, 100) == 20.0
    assert abs(beta_schedule(60, 100) - 11.0) < 1e-9  # halfway through the 80 annealing steps
    assert beta_schedule(100, 100) == 2.0


def test_soft_init_reproduces_weight_and_hard_is_nearest_grid_point():
    w = torch.tensor([[0.26, -0.74, 0.5], [1.1, 0.04, -0.31]])
    base = UniformQuantizer(4, symmetric=True, channel_axis=0)  # max|w| maps exactly onto level 7: no clipping
    base.init_range(w, "minmax")
    q = AdaRoundQuantizer(base, w)
    torch.testing.assert_close(q(w), w, atol=1e-3 * float(base.scale.max()), rtol=0)  # h(V) = frac(w / s)
    q.harden()
    assert q.alpha is None and q.hardened
    # At init V >= 0 iff frac >= 0.5: hard rounding equals round-to-nearest (ties aside).
    torch.testing.assert_close(q(w), base(w))
    assert set(q.hard_offsets.unique().tolist()) <= {0.0, 1.0}


def test_regulariser_is_zero_at_hard_values():
    w = torch.randn(4, 6)
    base = UniformQuantizer(4, False, 0)
    base.init_range(w)
    q = AdaRoundQuantizer(base, w)
    with torch.no_grad():
        q.alpha.copy_(torch.where(torch.rand_like(w) > 0.5, 10.0, -10.0))
    assert q.regularizer(2.0).item() == 0.0
    with torch.no_grad():
        q.alpha.zero_()  # h = 0.5: each term is 1
    assert q.regularizer(20.0).item() == w.numel()


def test_adaround_converges_to_hard_and_beats_rtn_on_layer_output():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    # Correlated inputs (rank 8 plus noise): with iid inputs the output MSE's Hessian is diagonal and
    # round-to-nearest is already optimal; AdaRound's gain comes from the input correlations.
    x = torch.randn(256, 8) @ torch.randn(8, 32) + 0.1 * torch.randn(256, 32)
    target = lin(x).detach()

    rtn = QuantLayer(lin, 3, 16, w_symmetric=False)
    rtn.init_weight_range("minmax")
    rtn_mse = ((rtn(x) - target) ** 2).mean().item()

    layer = QuantLayer(lin, 3, 16, w_symmetric=False)
    layer.init_weight_range("minmax")
    quantizers = attach_adaround(layer)
    cfg = ReconConfig(iters=1000, batch_size=64, learn_weights=True, p=2.0, w_lr=1e-2, progress=False)
    stats = reconstruct_unit(Unit("lin", layer, "layer", {"lin": layer}), ([x], {}, 256), target, cfg,
                             torch.Generator().manual_seed(0))
    assert stats["soft_hardness"] > 0.95  # the regulariser drove h(V) to 0/1 before hardening
    assert all(q.hardened for q in quantizers) and hardness(quantizers) == 1.0
    layer.freeze()  # freeze() uses the learned rounding
    ada_mse = ((layer(x) - target) ** 2).mean().item()
    assert ada_mse < 0.5 * rtn_mse, (ada_mse, rtn_mse)
    # The frozen weight is on the quantization grid of the original range.
    q = quantizers[0]
    grid = layer.frozen_weight / q.scale + q.zero_point
    torch.testing.assert_close(grid, grid.round(), atol=1e-4, rtol=0)


def test_adaround_state_dict_roundtrip():
    conv = nn.Linear(5, 3)
    layer = QuantLayer(conv, 4, 16)
    layer.init_weight_range()
    attach_adaround(layer)
    layer.weight_quantizer.harden()
    sd = layer.state_dict()
    fresh = QuantLayer(nn.Linear(5, 3), 4, 16)
    fresh.init_weight_range()
    attach_adaround(fresh)
    fresh.load_state_dict(sd)
    fresh.module.load_state_dict(conv.state_dict())
    torch.testing.assert_close(fresh.quantized_weight(), layer.quantized_weight())
