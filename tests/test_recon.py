"""Block reconstruction on a real (random-init) diffusers UNet: discovery, caching, optimisation, hardening."""

import copy

import pytest
import torch

from harness.calibration import TrajectoryBank
from harness.generate import make_schedule
from methods.quant.adaround import AdaRoundQuantizer
from methods.quant.attention import AttentionRangeObserver, attention_processors, quantize_attention
from methods.quant.calibrate import init_activation_ranges
from methods.quant.layers import QuantLayer, quantizers_disabled
from methods.quant.recon import (
    ReconConfig,
    _capture,
    execution_order,
    find_units,
    lp_loss,
    reconstruct,
)
from methods.quant.surgery import UNIFORM, freeze_all, quant_layers, quantize_modules
from models.loading import load_model
from models.registry import get_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    m = load_model(get_model("tiny-random"))
    sch = make_schedule(m, 10, "uniform")
    bank = TrajectoryBank(m, sch, "ddim", 0.0, tmp_path_factory.mktemp("bank"))
    samples = bank.trajectories(4).at_steps([0, 5, 9])
    return m, samples


def quantized(m, samples, w_bits=4, a_bits=8):
    d = m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet))
    quantize_modules(d.unet, UNIFORM, w_bits, a_bits, lambda n, mod, wb, ab: QuantLayer(mod, wb, ab, False))
    quantize_attention(d.unet, a_bits, a_bits)
    layers = quant_layers(d.unet)
    for layer in layers.values():
        layer.init_weight_range("minmax")
    with AttentionRangeObserver(d.unet):
        init_activation_ranges(d, layers, samples, 10)
    return d


def test_lp_loss_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    tgt = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert lp_loss(pred, tgt, 2.0).item() == pytest.approx((1 + 4 + 1) / 2)  # sum over dim 1, mean over batch
    assert lp_loss(pred, tgt, 2.4).item() == pytest.approx((1 + 2**2.4 + 1) / 2)


def test_units_cover_every_layer_once_in_execution_order(setup):
    m, samples = setup
    d = quantized(m, samples)
    units = find_units(d.unet)
    kinds = {u.name: u.kind for u in units}
    assert kinds["down_blocks.0.resnets.0"] == "block"
    assert kinds["down_blocks.1.attentions.0"] == "block"
    assert kinds["down_blocks.0.downsamplers.0"] == "block" and kinds["up_blocks.0.upsamplers.0"] == "block"
    assert kinds["conv_in"] == kinds["conv_out"] == kinds["time_embedding.linear_1"] == "layer"
    covered = [n for u in units for n in u.layers]
    assert sorted(covered) == sorted(quant_layers(d.unet))  # each quantized layer in exactly one unit
    order = [u.name for u in execution_order(d, units, samples, 10, "cpu")]
    pos = order.index
    assert pos("down_blocks.1.resnets.0") < pos("mid_block.resnets.0") < pos("up_blocks.0.resnets.0")
    assert order[-1] == "conv_out"


def test_capture_caches_resnet_args_and_fp_targets(setup):
    m, samples = setup
    d = quantized(m, samples)
    name = "up_blocks.0.resnets.1"
    args, kwargs, _ = _capture(d, d.unet.get_submodule(name), samples, 10, "cpu", 5, False)
    temb_dim = m.denoiser.unet.config.block_out_channels[0] * 4
    assert len(args) == 2 and args[0].shape[0] == 12 and args[1].shape == (12, temb_dim)
    fp_mod = m.denoiser.unet.get_submodule(name)
    fp_args, _, target = _capture(m.denoiser, fp_mod, samples, 10, "cpu", 5, True)
    with torch.no_grad():
        torch.testing.assert_close(fp_mod(*fp_args), target)
        # The quantized model's inputs differ from the FP ones (asymmetric reconstruction).
        assert not torch.allclose(args[0], fp_args[0])


def test_activations_disabled_in_a_whole_unet(setup):
    m, samples = setup
    d = quantized(m, samples)
    with quantizers_disabled(d.unet, acts=True):
        assert not any(layer.quant_act for layer in quant_layers(d.unet).values())
        assert all(layer.quant_weight for layer in quant_layers(d.unet).values())
        assert not any(q.enabled for p in attention_processors(d.unet).values() for q in p.quantizers().values())
        # a layer's own quantizers are gated by its flags, not switched themselves
        assert all(q.enabled for layer in quant_layers(d.unet).values() for q in layer.act_quantizers())
    assert all(layer.quant_act for layer in quant_layers(d.unet).values())
    assert all(q.enabled for p in attention_processors(d.unet).values() for q in p.quantizers().values())


def test_reconstruct_whole_unet_hardens_and_improves_blocks(setup):
    m, samples = setup
    d = quantized(m, samples)
    rtn = quantized(m, samples)
    cfg = ReconConfig(iters=12, batch_size=4, learn_weights=True, learn_acts=True, act_quant=True, p=2.4,
                      w_lr=1e-2, progress=False)
    stats = reconstruct(d, m.denoiser, samples, 10, cfg)
    assert len(stats) == len(find_units(d.unet))
    for layer in quant_layers(d.unet).values():
        assert all(isinstance(q, AdaRoundQuantizer) and q.hardened for q in layer.weight_quantizers())
        assert all(q.learnable for q in layer.act_quantizers())
    assert all(p.probs_quantizer.learnable for p in attention_processors(d.unet).values())
    freeze_all(d.unet)
    freeze_all(rtn.unet)
    with torch.no_grad():
        x, t = samples["x"], samples["t"]
        fp, out_rec, out_rtn = m.denoiser(x, t), d(x, t), rtn(x, t)
    assert torch.isfinite(out_rec).all()
    assert ((out_rec - fp) ** 2).mean() < ((out_rtn - fp) ** 2).mean()


def test_learned_step_is_stored_positive(setup):
    """Training quantizes with |s|, the fused inference kernel with s: a step Adam pushed below zero must come
    out of the unit as |s| (a negative step mirrors the clipping range in the fused kernel)."""
    from methods.quant.recon import Unit, reconstruct_unit

    layer = QuantLayer(torch.nn.Linear(4, 3), 16, 8, False)
    layer.act_quantizer.init_range(torch.linspace(-1, 1, 50))
    s = layer.act_quantizer.learnable_step()
    with torch.no_grad():
        s.neg_()
    x = torch.randn(16, 4)
    with torch.no_grad():
        target = layer.module(x)
    cfg = ReconConfig(iters=1, batch_size=4, learn_weights=False, learn_acts=True, act_quant=True, a_lr=0.0,
                      progress=False)
    reconstruct_unit(Unit("l", layer, "layer", {"l": layer}), ([x], {}, 16), target, cfg, torch.Generator())
    assert (layer.act_quantizer.scale > 0).all()
    with torch.no_grad():  # the inference (fused) path now matches the training (|s|) path
        inference = layer(x)
    with torch.enable_grad():
        training = layer(x)
    torch.testing.assert_close(inference, training.detach())


def test_recon_learns_the_step_any_quantizer_declares():
    """LSQ in reconstruction goes through Quantizer.learnable_step / settle_step, not a class check."""
    from torch import nn

    from methods.quant.base import Quantizer, fake_quant
    from methods.quant.recon import Unit, reconstruct_unit

    class PerTensorStep(Quantizer):  # a quantizer that is not a UniformQuantizer
        def __init__(self):
            super().__init__(4)
            self.step = nn.Parameter(torch.tensor(0.3))
            self.settled = False

        def learnable_step(self):
            return self.step

        def settle_step(self):
            self.settled = True
            self.step.requires_grad_(False)

        def forward(self, x):
            return fake_quant(x, self.step, torch.tensor(8.0), *self.qmin_qmax) if self.active else x

    class Fixed(PerTensorStep):
        def learnable_step(self):
            return None

    layer = QuantLayer(torch.nn.Linear(4, 3), 16, 4, False)
    layer.act_quantizer = PerTensorStep()
    other = QuantLayer(torch.nn.Linear(3, 2), 16, 4, False)
    other.act_quantizer = Fixed()
    unit = torch.nn.Sequential(layer, other)
    x = torch.randn(16, 4)
    with torch.no_grad():
        target = unit(x) * 1.5
    cfg = ReconConfig(iters=3, batch_size=8, learn_weights=False, learn_acts=True, act_quant=True, a_lr=1e-2,
                      progress=False)
    stats = reconstruct_unit(Unit("u", unit, "block", {"0": layer, "1": other}), ([x], {}, 16), target, cfg,
                             torch.Generator().manual_seed(0))
    assert stats["iters"] == 3
    assert layer.act_quantizer.step.item() != pytest.approx(0.3, abs=1e-6) and layer.act_quantizer.settled
    assert other.act_quantizer.step.item() == pytest.approx(0.3) and not other.act_quantizer.settled
