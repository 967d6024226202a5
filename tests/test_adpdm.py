"""ADP-DM: group binning, the mixture quantizer, the SRM selector, and an end-to-end run on tiny-random."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from harness.calibration import TrajectoryBank
from harness.generate import make_schedule
from harness.sampling import sample_ddim
from methods.adpdm import ADPDM, ADPDMConfig
from methods.base import BitConfig
from methods.envelope import load_quantized, save_quantized
from methods.quant.group_search import GroupMixtureQuantizer, SRMSelector, bin_groups, min_calib_step
from methods.quant.quantizer import fake_quant, scale_zero_point
from methods.quant.step_table import StepTableQuantizer
from methods.quant.surgery import UNIFORM, quant_layers
from methods.quant.timestep import timestep_context
from models.loading import load_model
from models.registry import get_model

torch.set_num_threads(1)


def test_bin_groups_hand_computed():
    v = torch.tensor([0.0, 1.0, 2.0, 10.0])  # G=2: bins [0, 5), [5, 10]
    assert torch.equal(bin_groups(v, 2, "min"), torch.tensor([0.0, 10.0]))
    assert torch.equal(bin_groups(v, 2, "max"), torch.tensor([2.0, 10.0]))
    # empty bins keep their upper edge: edges 2.5, 5, 7.5, 10
    assert torch.equal(bin_groups(torch.tensor([0.0, 10.0]), 4, "min"), torch.tensor([0.0, 5.0, 7.5, 10.0]))
    assert torch.equal(bin_groups(torch.tensor([0.0, 2.5, 5.0]), 2, "min"), torch.tensor([0.0, 2.5]))  # edge: upper bin


@pytest.mark.parametrize("per_channel", [True, False])
def test_mixture_with_one_hot_weights_is_a_single_quantizer(per_channel):
    q = GroupMixtureQuantizer(4, num_steps=2, groups=8, channels=3, channel_axis=1, per_channel=per_channel)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3
    q.calibrating = True
    with timestep_context(1, 10, 2):
        q(x)  # fills the step's candidate ranges
    q.calibrating = False
    with torch.no_grad():
        q.logits.zero_()
        q.logits[1, 5] = 100.0  # softmax: group 5 has weight 1 (exp(-100) underflows)
    assert torch.equal(q.weights(1)[5], torch.ones_like(q.weights(1)[5]))
    with timestep_context(1, 10, 2):
        y = q(x)
    s, z = scale_zero_point(q.group_lo[1, 5], q.group_hi[1, 5], 4, False)
    assert torch.allclose(y, fake_quant(x, s, z, 0, 15), atol=1e-6)
    # and the exported inference table holds exactly that group's range at that step
    table = q.export([20, 10])
    with timestep_context(1, 10, 2):
        assert torch.allclose(table(x), y, atol=1e-6)


def test_mixture_gradient_reaches_logits_and_input():
    q = GroupMixtureQuantizer(4, num_steps=1, groups=4, channels=3, channel_axis=1, floor=None)
    q.calibrating = True
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with timestep_context(0, 5, 1):
        q(x).square().sum().backward()
    assert q.logits.grad is not None and q.logits.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_floor_widens_channel_ranges():
    q = GroupMixtureQuantizer(8, num_steps=1, groups=2, channels=2, channel_axis=1, floor=(-4.0, 6.0))
    x = torch.tensor([[[[-1.0, 1.0]], [[-8.0, 2.0]]]])  # channel mins -1, -8 -> -4, -8; maxes 1, 2 -> 6, 6
    lo, hi = q.candidate_ranges(x)
    assert torch.equal(lo, torch.tensor([-8.0, -4.0])) and torch.equal(hi, torch.tensor([6.0, 6.0]))


def test_srm_selector_range_and_repeat_penalty():
    assert min_calib_step(100) == 30 and min_calib_step(20) == 6 and min_calib_step(10) == 3
    sel = SRMSelector(20)
    peaked = torch.zeros(20)
    peaked[2] = 100.0  # the highest entropy is outside the allowed range: never picked
    picks = [sel.select(peaked) for _ in range(30)]
    assert min(picks) >= 6
    # flat scores: ties go to the last step, then each pick costs 2, so 14 rounds visit 19, 18, ..., 6 once
    assert picks[:14] == list(range(19, 5, -1))
    assert sel.counts[6:].tolist() == [2.0] * 12 + [3.0] * 2 and sel.counts[:6].sum() == 0  # 30 = 2 x 14 + 2
    # a step with entropy 3 above the rest is picked twice before the others (3 - 2 > 0, 3 - 4 < 0)
    sel = SRMSelector(20)
    e = torch.zeros(20)
    e[10] = 3.0
    assert [sel.select(e) for _ in range(3)] == [10, 10, 19]


def test_paper_scope_is_resnet_convs_only():
    s = ADPDM().paper_scope()
    assert s.selects("down_blocks.0.resnets.0.conv1") and s.selects("mid_block.resnets.1.conv2")
    assert not s.selects("down_blocks.0.resnets.0.conv_shortcut") and not s.selects("conv_in")
    assert not s.selects("mid_block.attentions.0.to_q") and s.first_last_bits == 16 and not s.attention_matmuls


def test_official_weight_rule_hand_computed():
    from methods.quant.group_search import APQWeightQuantizer

    w = torch.tensor([[-1.0, 0.1, 0.35, 0.7], [-0.2, 0.0, 0.3, 0.2]])  # channel 0: |min| > max
    q = APQWeightQuantizer(3)  # step = max(0, w_max) / 3
    q.init_range(w)
    assert torch.allclose(q.scale.flatten(), torch.tensor([0.7 / 3, 0.1]))
    out = q(w)
    s0 = 0.7 / 3
    # -1 / s0 = -4.29 -> -4; 0.1 / s0 = 0.43 -> 0; 0.35 / s0 = 1.5 -> 2 (half to even)
    assert torch.allclose(out[0], torch.tensor([-4 * s0, 0.0, 2 * s0, 0.7]))
    assert torch.allclose(out[1], torch.tensor([-0.2, 0.0, 0.3, 0.2]))
    w2 = torch.tensor([[-3.0, 0.3]])  # more levels than 2^b: round(-3 / 0.1) = -30
    q.init_range(w2)
    assert torch.allclose(q(w2), torch.tensor([[-3.0, 0.3]])) and float(q.scale) == pytest.approx(0.1)


def test_official_mixture_passes_no_gradient_to_its_input():
    q = GroupMixtureQuantizer(4, num_steps=1, groups=4, channels=3, channel_axis=1, floor=None)
    q.calibrating, q.input_grad = True, False
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with timestep_context(0, 5, 1):
        (q(x) * torch.randn(2, 3, 4, 4)).sum().backward()
    assert q.logits.grad.abs().sum() > 0 and (x.grad is None or x.grad.abs().sum() == 0)


def test_paper_preset_is_the_official_code():
    paper = ADPDM(ADPDMConfig.from_preset("paper"))
    layer = paper.layer("down_blocks.0.resnets.0.conv1", torch.nn.Conv2d(4, 4, 3), 6, 6, {})
    from methods.quant.group_search import APQWeightQuantizer

    assert isinstance(layer.weight_quantizer, APQWeightQuantizer)
    cfg = paper.config
    assert (cfg.search_weights, cfg.input_grad, cfg.rounds) == ("fp", "none", 1024 // 16)
    with pytest.raises(ValueError):
        ADPDMConfig(granularity="per-pixel")
    with pytest.raises(ValueError):
        ADPDMConfig(weight_rule="official", weight_recon=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    m = load_model(get_model("tiny-random"))
    sch = make_schedule(m, 6, "uniform")
    bank = TrajectoryBank(m, sch, "ddim", 0.0, tmp_path_factory.mktemp("bank"))
    return m, sch, bank


def _sample(denoiser, m, sch):
    x = torch.randn(2, *m.sample_shape, generator=torch.Generator().manual_seed(3))
    return sample_ddim(denoiser, x, sch)


@pytest.mark.parametrize("granularity", ["per-channel", "per-tensor"])
def test_end_to_end_tiny_random(setup, tmp_path, granularity):
    m, sch, bank = setup
    cfg = ADPDMConfig(preset="fast", calib_images=2, batch_size=2, granularity=granularity)
    d = m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet))
    res = ADPDM(cfg).quantize(d, bank, BitConfig(4, 8), UNIFORM, tmp_path)
    f = res.facts
    assert f["granularity"] == granularity and f["calib_seconds"] > 0 and f["layers_quantized"] > 0
    assert 0 <= f["importance_kl_mean"] <= f["importance_kl_max"] <= math.log(8)
    assert 1 / 8 <= f["importance_weight_max"] <= 1
    assert all(min_calib_step(6) <= s for s in f["calib_steps_picked"])  # steps >= 30 % of 6
    assert res.artifacts["adpdm_groups"].exists() and res.artifacts["adpdm_groups"].suffix == ".png"
    layers = quant_layers(res.denoiser.unet)
    tables = [ly.act_quantizer for ly in layers.values() if ly.quant_act]
    assert tables and all(isinstance(q, StepTableQuantizer) and q.num_steps == 6 for q in tables)
    assert all((q.scale.dim() == 2) == (granularity == "per-channel") for q in tables)
    out = _sample(res.denoiser, m, sch)
    assert torch.isfinite(out).all()

    # safetensors round trip: rebuilt from the FP model, state loaded, same samples bit for bit
    save_quantized(res, tmp_path / "q.safetensors")
    fresh = load_quantized(ADPDM(cfg), m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet)), BitConfig(4, 8),
                           UNIFORM, tmp_path / "q.safetensors")
    assert torch.equal(_sample(fresh, m, sch), out)


def test_weight_recon_uses_adaround_from_the_engine(setup, tmp_path):
    from methods.quant.adaround import AdaRoundQuantizer

    m, sch, bank = setup
    cfg = ADPDMConfig(preset="fast", calib_images=2, batch_size=2, weight_recon=True, recon_images=2,
                      recon_iters=4, recon_batch=2, recon_samples=4)
    plain = ADPDM(ADPDMConfig(preset="fast", calib_images=2, batch_size=2)).quantize(
        m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet)), bank, BitConfig(4, 8), UNIFORM, tmp_path / "a")
    res = ADPDM(cfg).quantize(m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet)), bank, BitConfig(4, 8),
                              UNIFORM, tmp_path / "b")
    layers = quant_layers(res.denoiser.unet)
    assert res.facts["weights"].endswith("BRECQ/AdaRound")
    # learned roundings are baked into on-grid weights under plain quantizers (what a reload rebuilds)
    assert not any(isinstance(ly.weight_quantizer, AdaRoundQuantizer) for ly in layers.values())
    rtn_w = {n: ly.quantized_weight() for n, ly in quant_layers(plain.denoiser.unet).items()}
    assert any(not torch.equal(ly.quantized_weight(), rtn_w[n]) for n, ly in layers.items())  # rounding moved
    assert torch.isfinite(_sample(res.denoiser, m, sch)).all()


def test_weight_rules(setup, tmp_path):
    """``asymmetric``: exactly the ``rtn`` baseline's weights; ``symmetric``: step max|w| / (2^(b-1) - 1) (NOT the
    official rule); ``official``: the APQ-DM code's rule. TDQ's ``weight_symmetric`` is the signed grid."""
    import dataclasses

    import methods
    from methods.quant.group_search import APQWeightQuantizer

    m, sch, bank = setup
    bits = BitConfig(4, 8)
    rtn_cls = methods.get("rtn")
    rtn = rtn_cls(rtn_cls.config_cls.from_preset("fast")).quantize(
        m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet)), bank, bits, UNIFORM, tmp_path / "rtn")
    rtn_w = {n: ly.quantized_weight() for n, ly in quant_layers(rtn.denoiser.unet).items()}
    rules = ("asymmetric", "symmetric", "official")
    runs = [("adpdm", dict(calib_images=2, batch_size=2, weight_rule=r)) for r in rules]
    runs += [("tdq", dict(calib_images=2, calib_steps=2, iters=2, weight_symmetric=s)) for s in (False, True)]
    for method, over in runs:
        cls = methods.get(method)
        cfg = dataclasses.replace(cls.config_cls.from_preset("fast"), **over)
        res = cls(cfg).quantize(m.denoiser.with_unet(copy.deepcopy(m.denoiser.unet)), bank, bits, UNIFORM,
                                tmp_path / f"{method}{over}")
        layers = quant_layers(res.denoiser.unet)
        rule = over.get("weight_rule", "symmetric" if over.get("weight_symmetric") else "asymmetric")
        name, ly = next((n, ly) for n, ly in layers.items() if ly.module.weight.dim() == 4 and ly.w_bits == 4)
        w = ly.module.weight.detach()
        if rule == "asymmetric":
            assert all(torch.equal(x.quantized_weight(), rtn_w[n]) for n, x in layers.items())
        elif rule == "symmetric":
            step = w.abs().amax(dim=(1, 2, 3)).view(-1, 1, 1, 1) / 7  # 4 bits: levels -8..7
            assert torch.allclose(ly.quantized_weight(), torch.round(w / step).clamp(-8, 7) * step, atol=1e-6)
        else:
            assert isinstance(ly.weight_quantizer, APQWeightQuantizer)
            lo, hi = w.amin(dim=(1, 2, 3), keepdim=True), w.amax(dim=(1, 2, 3), keepdim=True)
            step = hi.clamp_min(0) / 7
            expected = torch.minimum(torch.maximum(torch.round(w / step) * step, lo), hi)
            assert torch.allclose(ly.quantized_weight(), expected, atol=1e-6), name
