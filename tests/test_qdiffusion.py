"""Q-Diffusion: shortcut splitting, attention-matmul quantizers, presets, and an end-to-end run on tiny-random."""

import copy

import pytest
import torch

from harness.calibration import TrajectoryBank
from harness.generate import make_schedule
from methods.base import BitConfig, MethodConfig
from methods.qdiffusion import QDiffusion, QDiffusionConfig
from methods.quant.adaround import AdaRoundQuantizer
from methods.quant.attention import QuantAttnProcessor, attention_processors, quantize_attention
from methods.quant.shortcut import find_denoiser_splits
from methods.quant.surgery import UNIFORM, quant_layers
from methods.registry import get
from models.loading import load_model
from models.registry import get_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return load_model(get_model("tiny-random"))


def test_shortcut_splits_match_the_unet_structure(model):
    unet = model.denoiser.unet
    splits = find_denoiser_splits(model.denoiser, torch.randn(1, 3, 32, 32), torch.tensor([10]))
    # tiny-random: block_out_channels (16, 32), one resnet per block (+1 in up blocks).
    # up_blocks.0 (32 ch, deep path 32 ch) takes skips of 32 (down_blocks.1 resnet) and 32 (downsampler);
    # up_blocks.1: resnet 0 gets hidden 32 + skip 16, resnet 1 gets hidden 16 + skip 16 (conv_in).
    assert splits == {
        "up_blocks.0.resnets.0.conv1": 32, "up_blocks.0.resnets.0.conv_shortcut": 32,
        "up_blocks.0.resnets.1.conv1": 32, "up_blocks.0.resnets.1.conv_shortcut": 32,
        "up_blocks.1.resnets.0.conv1": 32, "up_blocks.1.resnets.0.conv_shortcut": 32,
        "up_blocks.1.resnets.1.conv1": 16, "up_blocks.1.resnets.1.conv_shortcut": 16,
    }
    for name, split in splits.items():
        assert 0 < split < unet.get_submodule(name).in_channels


def test_attention_processor_matches_diffusers_when_off_and_quantizes_when_on(model):
    unet = copy.deepcopy(model.denoiser.unet)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 500])
    with torch.no_grad():
        ref = unet(x, t).sample
        assert quantize_attention(unet, 8, 16) == 4
        procs = attention_processors(unet)
        assert all(isinstance(p, QuantAttnProcessor) for p in procs.values())
        torch.testing.assert_close(unet(x, t).sample, ref)  # uninitialised quantizers pass through
        p = next(iter(procs.values()))
        assert p.probs_quantizer.bits == 16 and p.q_quantizer.bits == 8
        for proc in procs.values():
            for q in (proc.q_quantizer, proc.k_quantizer, proc.v_quantizer):
                q.set_range(torch.tensor(-0.5), torch.tensor(0.5))
        assert all(proc.q_quantizer.active and not proc.probs_quantizer.active for proc in procs.values())
        assert not torch.allclose(unet(x, t).sample, ref)
    # The processors are submodules: their ranges are in the state dict.
    assert any(k.endswith("processor.q_quantizer.scale") for k in unet.state_dict())


def test_family_resolution_and_per_family_settings(model):
    from methods.envelope import build
    from methods.qdiffusion import FAMILIES, model_family

    assert [model_family(n) for n in ("tiny-cifar10", "ddpm-cifar10", "ldm-lsun-bedroom", "ldm-lsun-church",
                                      "ldm-imagenet", "sd-v1-4")] == ["ddim", "ddim", "ldm-lsun-bedroom",
                                                                      "ldm-lsun-church", "ldm", "sd"]
    paper = QDiffusionConfig.from_preset("paper")
    for family in FAMILIES:
        st = {"family": family, **paper.settings(family)}
        d = model.denoiser.with_unet(copy.deepcopy(model.denoiser.unet))
        build(QDiffusion(paper), d, BitConfig.parse("w6a6"), UNIFORM, {"splits": {}, "settings": st})
        proc = next(iter(attention_processors(d.unet).values()))
        layer = quant_layers(d.unet)["down_blocks.0.resnets.0.conv1"]
        # softmax at 8 bits whatever the activation bits (16 for SD); --a_sym on the layers and the softmax
        assert proc.probs_quantizer.bits == (16 if family == "sd" else 8) and proc.q_quantizer.bits == 6
        sym = family in ("ddim", "ldm-lsun-bedroom")
        assert layer.act_quantizer.symmetric == sym and proc.probs_quantizer.symmetric == sym
    # an explicit value wins over the family's
    assert QDiffusionConfig(softmax_bits=6).settings("sd")["softmax_bits"] == 6
    assert get("qdiffusion") is QDiffusion and isinstance(paper, MethodConfig)
    with pytest.raises(ValueError):
        QDiffusionConfig(family="dit")


def test_official_activation_init_sees_quantized_upstream():
    """Official init: each quantizer fits on its first input, with every upstream quantizer already on."""
    from methods.quant.calibrate import fit_ranges_online
    from methods.quant.layers import QuantLayer

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = QuantLayer(torch.nn.Linear(4, 4), 8, 2)
            self.b = QuantLayer(torch.nn.Linear(4, 4), 8, 8)

        def forward(self, x, t, cond=None):
            return self.b(self.a(x))

    torch.manual_seed(0)
    net = Two()
    for ly in (net.a, net.b):
        ly.init_weight_range("minmax")
    x = torch.randn(16, 4)
    fit_ranges_online(net, [net.a.act_quantizer, net.b.act_quantizer], [{"x": x, "t": torch.zeros(16)}], "minmax")
    with torch.no_grad():
        seen = net.a(x)  # what b receives: a's output from a 2-bit quantized input
        fp = torch.nn.functional.linear(x, net.a.quantized_weight(), net.a.module.bias)
    b = net.b.act_quantizer
    lo, hi = b.fit_range(seen)
    assert torch.equal(b.scale, (hi.clamp(min=0) - lo.clamp(max=0)) / 255)
    assert not torch.equal(b.fit_range(fp)[1], hi)


def test_end_to_end_tiny_random(model, tmp_path):
    sch = make_schedule(model, 10, "uniform")
    bank = TrajectoryBank(model, sch, "ddim", 0.0, tmp_path)
    cfg = QDiffusionConfig.from_preset("fast")
    cfg.calib_images, cfg.calib_steps, cfg.joint_iters, cfg.batch_size, cfg.recon_samples = 2, 5, 3, 4, 6
    cfg.progress = False
    d = model.denoiser.with_unet(copy.deepcopy(model.denoiser.unet))
    res = QDiffusion(cfg).quantize(d, bank, BitConfig.parse("w4a8"), UNIFORM, tmp_path)
    f = res.facts
    assert f["calib_seconds"] > 0 and f["layers_quantized"] == len(quant_layers(d.unet))
    # official splitting: only the 1x1 shortcut that sees the raw concatenation, conv1 unsplit
    assert f["shortcut_splits"] == 4 and f["attention_matmuls_quantized"] == 8 and f["family"] == "ddim"
    layers = quant_layers(d.unet)
    assert not layers["up_blocks.1.resnets.1.conv1"].split
    split = layers["up_blocks.1.resnets.1.conv_shortcut"]
    # Two activation quantizers and two weight quantizers per skip concatenation, both active.
    assert split.split == 16 and len(split.act_quantizers()) == 2 and len(split.weight_quantizers()) == 2
    assert all(q.active for q in split.act_quantizers())
    assert not torch.equal(split.act_quantizer.scale, split.act_quantizer_skip.scale)
    # AdaRound's hardened roundings are baked into on-grid weights under plain quantizers
    assert not any(isinstance(q, AdaRoundQuantizer) for q in split.weight_quantizers())
    w, q = split.module.weight, split.weight_quantizer
    assert torch.equal(split.quantized_weight()[:, :16], w[:, :16]) and bool(q.initialized)
    for proc in attention_processors(d.unet).values():
        assert all(q.active for q in proc.quantizers().values())
    assert all(layer.frozen_weight is not None for layer in layers.values())
    with torch.no_grad():
        out = d(torch.randn(2, 3, 32, 32), torch.tensor([3, 700]))
    assert torch.isfinite(out).all()


def test_fast_preset_softmax_grid_keeps_small_probabilities(model):
    """fast (no LSQ to shrink the step): asymmetric, so a 16x16 attention's uniform 1/256 probabilities
    survive (step 1/255 -> 1/255); the paper preset's symmetric grid (step 1/127) rounds them to 0."""
    from methods.envelope import build

    probs = torch.cat([torch.full((1, 255), 1 / 256), torch.ones(1, 1)], dim=1)  # range [0, 1]
    out = {}
    for preset in ("fast", "paper"):
        cfg = QDiffusionConfig.from_preset(preset)
        d = model.denoiser.with_unet(copy.deepcopy(model.denoiser.unet))
        build(QDiffusion(cfg), d, BitConfig.parse("w8a8"), UNIFORM,
              {"splits": {}, "settings": {"family": "ddim", **cfg.settings("ddim")}})
        q = next(iter(attention_processors(d.unet).values())).probs_quantizer
        q.init_range(probs, "minmax")
        out[preset] = q(probs)[0, 0].item()
    assert out["fast"] == pytest.approx(1 / 255) and out["paper"] == 0.0


def test_running_stat_is_the_official_ema():
    """--running_stat: range = 0.95 * range + 0.05 * [min, max] of each batch, starting from the init
    batch's raw min/max, updated before the batch is quantized; the last partial batch is dropped."""
    from methods.qdiffusion import running_stat
    from methods.quant.layers import QuantLayer

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = QuantLayer(torch.nn.Linear(2, 2), 16, 8)

        def forward(self, x, t, cond=None):
            return self.a(x)

    def batch(lo, hi):  # two samples whose values span exactly [lo, hi]
        return torch.tensor([[lo, 0.0], [0.0, hi]])

    net = One()
    init = {"x": batch(-1.0, 1.0), "t": torch.zeros(2)}
    x = torch.cat([batch(-3.0, 2.0), batch(0.0, 4.0), batch(-50.0, 50.0)[:1]])  # 5 samples: 2 batches of 2 + 1
    samples = {"x": x, "t": torch.zeros(5)}
    n = running_stat(net, [net.a.act_quantizer], init, samples,
                     {"running_stat_batch": 2, "running_stat_shuffle": False}, "cpu")
    assert n == 2
    lo, hi = -1.0, 1.0
    for b_lo, b_hi in ((-3.0, 2.0), (0.0, 4.0)):  # by hand: -1.1, 1.05 then -1.045, 1.1975
        lo, hi = 0.95 * lo + 0.05 * b_lo, 0.95 * hi + 0.05 * b_hi
    q = net.a.act_quantizer
    assert (lo, hi) == pytest.approx((-1.045, 1.1975))
    assert q.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert q.zero_point.item() == round(-lo / ((hi - lo) / 255))
    # fewer samples than one batch: int(N / batch) = 0 passes, the range is left as it is
    scale = q.scale.clone()
    assert running_stat(net, [q], init, {"x": x[:1], "t": torch.zeros(1)},
                        {"running_stat_batch": 2, "running_stat_shuffle": True}, "cpu") == 0
    assert torch.equal(q.scale, scale)


def test_running_stat_follows_the_family(model, tmp_path):
    """On for bedroom and SD (unless turned off), off for the DDIM family; when on, it moves the ranges."""
    assert QDiffusionConfig().settings("ldm-lsun-bedroom")["running_stat"] is True
    assert QDiffusionConfig().settings("ddim")["running_stat"] is False
    sch = make_schedule(model, 10, "uniform")
    bank = TrajectoryBank(model, sch, "ddim", 0.0, tmp_path)
    out = {}
    for running in (None, False):  # None: the SD family's own value (on: shuffled batches of 16)
        cfg = QDiffusionConfig.from_preset("fast")
        cfg.family, cfg.calib_images, cfg.calib_steps, cfg.joint_iters, cfg.batch_size = "sd", 4, 5, 1, 4
        cfg.recon_samples, cfg.act_init_samples, cfg.progress, cfg.w_lr, cfg.split = 6, 4, False, 0.0, False
        cfg.softmax_bits, cfg.running_stat = 8, running
        d = model.denoiser.with_unet(copy.deepcopy(model.denoiser.unet))
        res = QDiffusion(cfg).quantize(d, bank, BitConfig.parse("w8a8"), UNIFORM, tmp_path / str(running))
        out[running] = res.facts["running_stat_batches"], quant_layers(d.unet)["conv_in"].act_quantizer.scale.item()
    assert out[None][0] == 20 // 16 and out[False][0] == 0  # 4 images x 5 steps; the partial batch dropped
    assert out[None][1] != pytest.approx(out[False][1])


def test_guided_calibration_sees_cond_and_uncond_halves(tmp_path):
    """The official SD calibration doubles its set (x with the prompt, x with the empty prompt). Here
    every calibration call goes through the Denoiser, which sends both halves through the UNet as one
    batch: each UNet input Q-Diffusion calibrates on (act init, reconstruction caches) comes as a
    conditional and an unconditional copy of the same x_t."""
    guided = load_model(get_model("ldm-imagenet-mini"))  # class-conditional, CFG 3.0, null class 1000
    sch = make_schedule(guided, 4, "uniform")
    bank = TrajectoryBank(guided, sch, "ddim", 0.0, tmp_path)
    cfg = QDiffusionConfig.from_preset("fast")
    cfg.calib_images, cfg.calib_steps, cfg.joint_iters, cfg.batch_size, cfg.recon_samples = 2, 2, 1, 2, 4
    cfg.act_init_samples, cfg.progress = 4, False
    d = guided.denoiser.with_unet(copy.deepcopy(guided.denoiser.unet))
    calls = []

    def seen(module, args, kwargs):
        calls.append((args[0].detach().clone(), kwargs["class_labels"].detach().clone()))

    handle = d.unet.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        QDiffusion(cfg).quantize(d, bank, BitConfig.parse("w8a8"), UNIFORM, tmp_path / "q")
    finally:
        handle.remove()
    assert calls
    for x, labels in calls:
        half = len(labels) // 2
        assert torch.equal(x[:half], x[half:])  # the same x_t twice
        assert (labels[:half] == 1000).all() and (labels[half:] != 1000).all()  # uncond, then cond
