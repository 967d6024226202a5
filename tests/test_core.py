"""Surgery, scope, registry, bit configs, specs and the timestep context, on real diffusers UNets."""

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

import methods
from harness.sampling import Schedule, make_timesteps, sample_ddim, to_uint8
from harness.spec import SpecError, expand
from methods.base import BitConfig, MethodConfig, QuantMethod
from methods.quant.layers import QuantLayer
from methods.quant.surgery import UNIFORM, Scope, quantize_modules
from methods.quant.timestep import current_step, require_step, timestep_context
from methods.registry import METHODS, UnknownMethodError, register_method
from models.loading import load_model
from models.registry import get_model


@pytest.fixture(scope="module")
def tiny():
    return load_model(get_model("tiny-random"))


def _n_conv_linear(unet):
    return sum(isinstance(m, torch.nn.Conv2d | torch.nn.Linear) for m in unet.modules())


def test_uniform_scope_quantizes_every_conv_and_linear(tiny):
    unet = load_model(get_model("tiny-random")).denoiser.unet
    n = _n_conv_linear(unet)
    summary = quantize_modules(unet, UNIFORM, 4, 8)
    assert summary.num_quantized == n and summary.fp_layers == []
    assert summary.layers["conv_in"] == "w8a8" and summary.layers["conv_out"] == "w8a8"
    assert summary.bit_histogram() == {"w4a8": n - 2, "w8a8": 2}
    assert isinstance(unet.get_submodule("conv_in"), QuantLayer)


def test_scope_patterns_and_fp_first_last():
    unet = load_model(get_model("tiny-random")).denoiser.unet
    scope = Scope("custom", include=("*resnets.*.conv1", "*resnets.*.conv2", "conv_in", "conv_out"), first_last_bits=16)
    summary = quantize_modules(unet, scope, 6, 6)
    assert all(name.endswith(("conv1", "conv2")) for name in summary.layers)
    assert "conv_in" in summary.fp_layers and "time_embedding.linear_1" in summary.fp_layers
    assert summary.num_quantized + len(summary.fp_layers) == _n_conv_linear(
        load_model(get_model("tiny-random")).denoiser.unet
    )


def test_bit_config_parsing():
    assert BitConfig.parse("W4A8") == BitConfig(4, 8) and str(BitConfig(6, 6)) == "w6a6"
    for bad in ("w4", "a8w4", "w1a8", "w4a9", "w12a8"):
        with pytest.raises(ValueError):
            BitConfig.parse(bad)


def test_registry_did_you_mean_and_known_list():
    with pytest.raises(UnknownMethodError) as e:
        methods.get("rtm")
    assert "did you mean 'rtn'" in str(e.value) and "fp" in str(e.value)
    assert {"fp", "rtn"} <= set(methods.names())


def test_register_third_party_method_and_config_json():
    @dataclasses.dataclass
    class MyConfig(MethodConfig):
        VERSION = 2
        knob: int = 3

    @register_method("test-plugin")
    class MyMethod(QuantMethod):
        config_cls = MyConfig

        def quantize(self, denoiser, calib, bits, scope, artifact_dir):
            raise NotImplementedError

    try:
        assert methods.get("test-plugin") is MyMethod and MyMethod.name == "test-plugin"
    finally:
        METHODS.unregister("test-plugin")
    assert "test-plugin" not in methods.names()
    cfg = MyConfig(knob=5)
    assert MyConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["version"] == 2
    with pytest.raises(ValueError, match="version 1"):
        MyConfig.from_dict({"version": 1, "knob": 1, "preset": "fast"})
    with pytest.raises(ValueError, match="already registered"):
        register_method("rtn")(MyMethod)


def test_timestep_context_nesting():
    assert current_step() is None
    with timestep_context(3, 700, 10):
        assert require_step().step_index == 3
        with timestep_context(4, 600, 10):
            assert current_step().t == 600
        assert current_step().t == 700
    with pytest.raises(RuntimeError, match="timestep context"):
        require_step()


def test_sampler_sets_timestep_context_for_each_call(tiny):
    seen = []

    class Spy:
        def __call__(self, x, t, cond=None):
            s = require_step()
            seen.append((s.step_index, s.t, int(t[0])))
            return torch.zeros_like(x)

    ts = make_timesteps(1000, 5, "uniform")
    sample_ddim(Spy(), torch.zeros(1, 3, 4, 4), Schedule(tuple(ts), tiny.scheduler.alphas_cumprod))
    assert seen == [(i, t, t) for i, t in enumerate(ts)]


def test_quad_and_uniform_spacing():
    assert make_timesteps(1000, 4, "uniform") == [750, 500, 250, 0]
    quad = make_timesteps(1000, 100, "quad")
    # (sqrt(800))^2 = 800 in floats; DDIM's official quad schedule repeats t = 0 (kept for fidelity)
    assert quad[0] == 800 and len(quad) == 100 and quad[-5:] == [1, 0, 0, 0, 0]


def test_ddim_step_matches_diffusers(tiny):
    """Our DDIM update (needed for quad spacing) equals DDIMScheduler.step on its own spacing."""
    sched = DDIMScheduler.from_config(
        tiny.scheduler.config, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0
    )
    sched.set_timesteps(10)
    ts = [int(t) for t in sched.timesteps]
    assert ts == make_timesteps(1000, 10, "uniform")
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 32, 32)
    ours = sample_ddim(tiny.denoiser, x0.clone(), Schedule(tuple(ts), tiny.scheduler.alphas_cumprod, clip_sample=True))
    x = x0.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(tiny.denoiser(x, t.expand(2)), t, x, eta=0.0).prev_sample
    assert torch.allclose(ours, x, atol=1e-3)  # float64 vs float32 alpha-bar arithmetic


def test_to_uint8_conversion():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6)
    assert to_uint8(x).flatten().tolist() == [0, 64, 128, 255, 255, 255]  # 0 -> 127.5 rounds to even 128


def test_expand_puts_fp_first_and_validates():
    specs = expand("rtn", "tiny-random", "w8a8,w4a8", [0, 1], num_samples=4, steps=2)
    assert [s.method for s in specs] == ["fp", "rtn", "rtn"] * 2
    assert len({s.config_hash for s in specs}) == 6
    with pytest.raises(SpecError, match="Known methods"):
        expand("nosuch", "tiny-random")
    with pytest.raises(SpecError, match="Known models"):
        expand("rtn", "tiny-randon")
    with pytest.raises(SpecError, match="wXaY"):
        expand("rtn", "tiny-random", "w4")


def test_model_path_keeps_the_named_zoo_protocol(tmp_path):
    specs = expand("rtn", "ddpm-cifar10", "w8a8", [0], protocol="paper", model_path=str(tmp_path))
    assert {s.model for s in specs} == {"ddpm-cifar10"}
    assert all(s.steps == 100 and s.spacing == "quad" and s.model_path == str(tmp_path.resolve()) for s in specs)
    generic = expand("rtn", None, "w8a8", [0], model_path=str(tmp_path))
    assert generic[0].model == f"local-{tmp_path.name}"
