"""Quantizer math against hand-computed values."""

import pytest
import torch
from torch import nn

from methods.quant.layers import QuantLayer
from methods.quant.quantizer import UniformQuantizer, qrange, round_ste, scale_zero_point


def test_qrange_levels():
    assert qrange(8, symmetric=True) == (-128, 127)
    assert qrange(4, symmetric=False) == (0, 15)


def test_asymmetric_minmax_hand_values():
    # range [-1, 2] at 2 bits: s = 3/3 = 1, z = round(1/1) = 1; grid {-1, 0, 1, 2}
    q = UniformQuantizer(bits=2, symmetric=False)
    q.init_range(torch.tensor([-1.0, 2.0]))
    assert q.scale.item() == pytest.approx(1.0)
    assert q.zero_point.item() == 1.0
    x = torch.tensor([-1.4, -0.6, 0.2, 0.5001, 1.7, 5.0])
    assert q(x).tolist() == pytest.approx([-1.0, -1.0, 0.0, 1.0, 2.0, 2.0])  # rounding and clipping


def test_symmetric_hand_values():
    # max|x| = 1.5 at 3 bits: s = 1.5 / 3 = 0.5, levels -4..3 -> values -2.0..1.5
    q = UniformQuantizer(bits=3, symmetric=True)
    q.init_range(torch.tensor([-0.2, 1.5]))
    assert q.scale.item() == pytest.approx(0.5)
    x = torch.tensor([-3.0, -0.74, 0.26, 1.49, 9.0])
    assert q(x).tolist() == pytest.approx([-2.0, -0.5, 0.5, 1.5, 1.5])


def test_asymmetric_range_widened_to_contain_zero():
    s, z = scale_zero_point(torch.tensor(0.5), torch.tensor(2.0), bits=8, symmetric=False)
    assert z.item() == 0.0 and s.item() == pytest.approx(2.0 / 255)


def test_per_channel_scales():
    w = torch.tensor([[1.0, -1.0], [4.0, -2.0]])  # two output channels
    q = UniformQuantizer(bits=8, symmetric=True, channel_axis=0)
    q.init_range(w)
    assert q.scale.flatten().tolist() == pytest.approx([1 / 127, 4 / 127])
    assert q.scale.shape == (2, 1)


def test_sixteen_bits_is_identity():
    q = UniformQuantizer(bits=16)
    q.init_range(torch.randn(10))
    x = torch.randn(10)
    assert torch.equal(q(x), x)


def test_uninitialised_quantizer_passes_through():
    q = UniformQuantizer(bits=4)
    x = torch.randn(5)
    assert torch.equal(q(x), x)


def test_mse_search_picks_the_better_range():
    # A heavy outlier: min-max wastes levels on it, the L_p search clips it and wins.
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10_000) * 0.1, torch.tensor([8.0])])
    mm, mse = UniformQuantizer(4), UniformQuantizer(4)
    mm.init_range(x, "minmax")
    mse.init_range(x, "mse", p=2.4)
    assert mse.scale.item() < mm.scale.item()
    err = lambda q: (q(x) - x).abs().pow(2.4).mean().item()  # noqa: E731
    assert err(mse) < err(mm)


def test_round_ste_gradient_is_identity():
    x = torch.tensor([0.3, 1.6], requires_grad=True)
    round_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]
    assert round_ste(torch.tensor([0.3, 1.6])).tolist() == [0.0, 2.0]


def test_learnable_scale_gets_lsq_gradient():
    q = UniformQuantizer(bits=4, learnable=True)
    q.init_range(torch.tensor([-1.0, 1.0]))
    assert isinstance(q.scale, nn.Parameter)
    q(torch.tensor([0.3, -0.9, 5.0])).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().item() > 0


def test_bad_bits_rejected():
    with pytest.raises(ValueError, match="bits must be"):
        UniformQuantizer(bits=12)


def test_state_dict_round_trip_restores_per_channel_shapes():
    q = UniformQuantizer(4, channel_axis=0)
    q.init_range(torch.randn(3, 5))
    fresh = UniformQuantizer(4, channel_axis=0)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 5)
    assert torch.equal(fresh(x), q(x))


def test_quant_layer_keeps_original_weight_and_matches_manual_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    original = conv.weight.detach().clone()
    layer = QuantLayer(conv, w_bits=4, a_bits=8)
    layer.init_weight_range("minmax")
    x = torch.randn(2, 4, 5, 5)
    layer.act_quantizer.init_range(x)
    y = layer(x)
    expected = torch.nn.functional.conv2d(
        layer.act_quantizer(x), layer.weight_quantizer(original), conv.bias, padding=1
    )
    assert torch.allclose(y, expected)
    assert torch.equal(conv.weight, original)
    layer.freeze()
    assert torch.equal(layer(x), y)


def test_quant_layer_switches():
    lin = nn.Linear(3, 2)
    layer = QuantLayer(lin, 4, 4)
    layer.init_weight_range()
    layer.quant_weight = layer.quant_act = False
    x = torch.randn(4, 3)
    assert torch.allclose(layer(x), lin(x))


def test_shortcut_split_has_two_quantizer_pairs():
    conv = nn.Conv2d(6, 2, 1)
    layer = QuantLayer(conv, 8, 8, split=4)
    assert len(layer.act_quantizers()) == 2 and len(layer.weight_quantizers()) == 2
    layer.init_weight_range()
    assert layer.quantized_weight().shape == conv.weight.shape


def test_fused_inference_path_matches_differentiable_path():
    from methods.quant.quantizer import fake_quant

    torch.manual_seed(0)
    for axis, shape in ((None, (4, 8, 6, 6)), (0, (8, 4, 3, 3))):
        q = UniformQuantizer(4, symmetric=axis is not None, channel_axis=axis)
        x = torch.randn(shape)
        q.init_range(x)
        qmin, qmax = q.qmin_qmax
        ref = fake_quant(x, q.scale, q.zero_point, qmin, qmax)
        with torch.no_grad():
            fused = q(x)
        # x * (1/s) vs x / s may flip an exact tie: at most one level, almost never
        mismatch = (fused - ref).abs() > 1e-6
        assert mismatch.float().mean() < 1e-3
        assert ((fused - ref).abs() <= q.scale.max() + 1e-6).all()
