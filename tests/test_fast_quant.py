"""methods/quant/fast.py, harness/sampling_form.py: the fast sampling path equals the eager path on CPU."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from harness.generate import make_schedule
from harness.sampling import SAMPLERS
from harness.sampling_form import sampling_form
from methods.base import BitConfig
from methods.quant.base import fake_quant, fused_fake_quant
from methods.quant.fast import FastQuantLayer, fast_denoiser
from methods.quant.layers import QuantLayer
from methods.quant.quantizer import UniformQuantizer
from methods.quant.step_table import StepTableQuantizer
from methods.quant.surgery import UNIFORM, freeze_all, quant_layers
from methods.quant.timestep import step_tensor, timestep_context
from methods.rtn import RoundToNearest, RTNConfig
from models.loading import load_model
from models.registry import get_model


def test_fused_fake_quant_matches_both_eager_formulas(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 5, 5, generator=g) * 3
    scale, zp = torch.tensor(0.037), torch.tensor(12.0)
    assert torch.equal(fused_fake_quant(x, scale, zp, 0, 255, reciprocal=False), fake_quant(x, scale, zp, 0, 255))
    native = torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), 0, 255)
    assert torch.equal(fused_fake_quant(x, scale, zp, 0, 255, reciprocal=True), native)
    # per channel (broadcast scale) and low-precision input: math in fp32, result in the input dtype
    s_c = torch.rand(1, 8, 1, 1, generator=g) * 0.1 + 0.01
    z_c = torch.zeros(1, 8, 1, 1)
    assert torch.equal(fused_fake_quant(x, s_c, z_c, -8, 7, reciprocal=False), fake_quant(x, s_c, z_c, -8, 7))
    native_c = torch.fake_quantize_per_channel_affine(x, s_c.flatten(), z_c.flatten().int(), 1, -8, 7)
    assert torch.equal(fused_fake_quant(x, s_c, z_c, -8, 7), native_c)
    # CPU: computed in place on a fresh tensor, never on the caller's (fp32 input aliases x.float())
    x_before = x.clone()
    fused_fake_quant(x, scale, zp, 0, 255)
    assert torch.equal(x, x_before)
    # exact ties (k + 0.5) * s, and values clamped at both ends: the native kernel's rounding and clamp
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * scale
    assert torch.equal(fused_fake_quant(ties, scale, zp, 0, 255),
                       torch.fake_quantize_per_tensor_affine(ties, scale, zp.to(torch.int32), 0, 255))
    # with autograd on (calibration): the same values, computed out of place
    xg = x.clone().requires_grad_()
    assert torch.equal(fused_fake_quant(xg, scale, zp, 0, 255).detach(), native)
    xb = x.bfloat16()
    out = fused_fake_quant(xb, scale, zp, 0, 255)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fused_fake_quant(xb.float(), scale, zp, 0, 255).bfloat16())
    # Under torch.compile the reciprocal form is spelled elementwise: the same numbers as the native kernels.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(fused_fake_quant(x, scale, zp, 0, 255), native)
    assert torch.equal(fused_fake_quant(x, s_c, z_c, -8, 7), native_c)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from harness.calibration import TrajectoryBank

    model = load_model(get_model("ldm-imagenet-mini"))  # class CFG, VQ decoder
    schedule = make_schedule(model, 3, "uniform")
    bank = TrajectoryBank(model, schedule, "ddim", 0.0, tmp_path_factory.mktemp("bank"))
    res = RoundToNearest(RTNConfig(calib_images=4, calib_steps=2)).quantize(
        copy.deepcopy(model.denoiser), bank, BitConfig(4, 8), UNIFORM, tmp_path_factory.mktemp("art"))
    return model, schedule, res.denoiser


def _sample(model, schedule, denoiser):
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    return SAMPLERS["ddim"](denoiser, x, schedule, cond=torch.tensor([3, 7]))


def test_fast_denoiser_equals_eager_and_frees_fp_weights(quantized):
    model, schedule, denoiser = quantized
    fast, report = fast_denoiser(denoiser, timesteps=schedule.timesteps)
    assert report == {"converted": len(quant_layers(denoiser.unet)), "skipped": 0}
    assert not any(isinstance(m, QuantLayer) for m in fast.unet.modules())
    assert torch.equal(_sample(model, schedule, denoiser), _sample(model, schedule, fast))
    from harness.perf import module_bytes

    # FastQuantLayers hold only the fake-quantized weight: the FP weight + frozen copy are gone.
    assert module_bytes(fast.unet) < 0.6 * module_bytes(denoiser.unet)
    assert module_bytes(fast.unet) <= 1.05 * module_bytes(model.denoiser.unet)


def test_bf16_autocast_path(quantized):
    """bf16 for the UNet body; fake-quant math, guidance and the sampler update stay fp32.

    On the FP model bf16 is within 5% of fp32. On a random-init w4a8 model bf16 (and fp16, and
    eager autocast alike) flips activation levels (~8% here), which is why `bench perf` reports
    each fast row's deviation from eager fp32 (rel_err_vs_eager) instead of assuming safety.
    """
    model, schedule, denoiser = quantized
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(2))
    t, cond = torch.full((2,), int(schedule.timesteps[0])), torch.tensor([1, 2])
    fp_fast, _ = fast_denoiser(model.denoiser, dtype="bf16")
    q_fast, _ = fast_denoiser(denoiser, dtype="bf16", timesteps=schedule.timesteps)
    with timestep_context(0, int(schedule.timesteps[0]), schedule.num_steps):
        ref, low = model.denoiser(x, t, cond), fp_fast(x, t, cond)
        q_low = q_fast(x, t, cond)
    assert low.dtype == q_low.dtype == torch.float32  # UNet output (so guidance and sampler update) in fp32
    assert (low - ref).norm() / ref.norm() < 0.05
    assert torch.isfinite(q_low).all()
    assert all(m.weight.dtype == torch.bfloat16 for m in q_fast.unet.modules() if isinstance(m, FastQuantLayer))


def test_per_step_tables_indexed_on_device():
    conv = torch.nn.Conv2d(4, 4, 1)
    layer = QuantLayer(conv, 16, 8)
    q = StepTableQuantizer(8, False, channel_axis=1)
    lo = -torch.rand(3, 4) - 0.5
    q.set_ranges(lo, -lo * 2, [900, 500, 100])
    layer.act_quantizer = q
    freeze_all(layer)
    fast = FastQuantLayer(layer, timesteps=[900, 500, 100])
    assert fast.acts[0]["per_step"]
    x = torch.randn(2, 4, 3, 3) * 2
    for i, t in enumerate([900, 500, 100]):
        with timestep_context(i, t, 3):  # the context keeps the device step tensor current
            assert int(step_tensor("cpu")) == i
            with timestep_context(0, 900, 3):  # nested (e.g. a probe call): restored on exit
                assert int(step_tensor("cpu")) == 0
            assert int(step_tensor("cpu")) == i
            assert torch.equal(fast(x), layer(x))
    with pytest.raises(TypeError):  # tables fitted on another schedule stay eager
        FastQuantLayer(layer, timesteps=[999, 500, 0])


def test_unknown_layer_types_are_left_eager(quantized):
    model, schedule, denoiser = quantized

    class Custom(QuantLayer):
        pass

    d = copy.deepcopy(denoiser)
    name, layer = next(iter(quant_layers(d.unet).items()))
    custom = Custom(layer.module, 8, 8)
    custom.load_state_dict(layer.state_dict(), strict=False)
    parent, _, child = name.rpartition(".")
    setattr(d.unet.get_submodule(parent) if parent else d.unet, child, custom)
    fast, report = fast_denoiser(d, timesteps=schedule.timesteps)
    assert any(type(m) is Custom for m in fast.unet.modules())
    assert report["converted"] == len(quant_layers(denoiser.unet)) - 1


@pytest.mark.slow
def test_torch_compile_of_fused_fake_quant_and_layer_equals_eager(quantized):
    """Inductor on CPU (slow: C++ compilation on a shared box).

    Layer-level equality is the meaningful check: a whole compiled w4a8 UNet reorders conv
    arithmetic, and on a random-init model one flipped activation level cascades.
    """
    x = torch.randn(2, 8, 6, 6) * 3
    scale, zp = torch.tensor(0.041), torch.tensor(7.0)
    compiled = torch.compile(fused_fake_quant, dynamic=False)
    torch.testing.assert_close(compiled(x, scale, zp, 0, 255), fused_fake_quant(x, scale, zp, 0, 255),
                               rtol=0, atol=float(scale) * 1.001)
    _, _, denoiser = quantized
    layer = next(m for m in quant_layers(denoiser.unet).values() if isinstance(m.module, torch.nn.Conv2d))
    fast = FastQuantLayer(layer)
    inp = torch.randn(2, layer.module.in_channels, 8, 8)
    torch.testing.assert_close(torch.compile(fast, dynamic=False)(inp), layer(inp), rtol=1e-4, atol=1e-4)


def test_output_quant_layer_fast_form_quantizes_the_output():
    """PTQ4DM's OutputQuantLayer (QDrop: quantize the layer's output) converts too, bit-identically."""
    from methods.quant.layers import OutputQuantLayer

    torch.manual_seed(0)
    layer = OutputQuantLayer(torch.nn.Conv2d(3, 4, 3, padding=1), 4, 4)
    layer.init_weight_range("minmax")
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        y = torch.nn.functional.conv2d(x, layer.quantized_weight(), layer.module.bias, padding=1)
    layer.act_quantizer.init_range(y, "minmax")
    freeze_all(layer)
    fast = FastQuantLayer(layer)
    assert fast.on_output and fast.num_act == 1
    with torch.no_grad():
        out = fast(x)
        assert torch.equal(out, layer(x))
        assert torch.equal(out, layer.act_quantizer(y))  # the output is on the 4-bit grid, the input untouched
    assert len(torch.unique(out)) <= 16


# ---- harness/sampling_form.py: runs sample with the fast form only where it equals the eager one ----

def test_quantized_run_samples_with_fast_layers_and_the_same_images(quantized):
    model, schedule, denoiser = quantized
    form, facts = sampling_form(denoiser, model, schedule, seed=0, device="cpu")
    n = len(quant_layers(denoiser.unet))
    assert facts == {"sampling_engine": "fast", "fast_layers": n, "eager_layers": 0}
    assert sum(isinstance(m, FastQuantLayer) for m in form.unet.modules()) == n
    assert not any(isinstance(m, QuantLayer) for m in form.unet.modules())
    assert any(isinstance(m, QuantLayer) for m in denoiser.unet.modules())  # the eager one is untouched
    assert torch.equal(_sample(model, schedule, form), _sample(model, schedule, denoiser))


class _StaticFormWrongStep(UniformQuantizer):
    """A quantizer whose static (fast) form disagrees with its eager forward (a step 1.5x too large): what a
    method's quantizer with a wrong ``fast_params`` would look like."""

    def fast_params(self, timesteps=None):
        p = super().fast_params(timesteps)
        return dataclasses.replace(p, scale=p.scale * 1.5)


def test_a_fast_form_that_differs_is_rejected(quantized):
    model, schedule, denoiser = quantized
    d = copy.deepcopy(denoiser)
    layer = next(iter(quant_layers(d.unet).values()))
    layer.act_quantizer.__class__ = _StaticFormWrongStep
    form, facts = sampling_form(d, model, schedule, seed=0, device="cpu")
    assert form is d
    assert facts["sampling_engine"] == "eager"
    assert facts["sampling_engine_reason"].startswith("fast form differs from eager by up to ")


def test_fp_has_nothing_to_convert(quantized):
    model, schedule, _ = quantized
    form, facts = sampling_form(model.denoiser, model, schedule, seed=0, device="cpu")
    assert form is model.denoiser
    assert facts == {"sampling_engine": "eager", "sampling_engine_reason": "no quantized layer",
                     "fast_layers": 0, "eager_layers": 0}


def test_a_method_wrapper_samples_as_it_is(quantized):
    """A method may return its own denoiser wrapper (the envelope allows it): it is sampled unchanged."""
    model, schedule, denoiser = quantized

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.unet = inner, inner.unet

        def forward(self, x, t, cond=None):
            return self.inner(x, t, cond)

    w = Wrapper(denoiser)
    form, facts = sampling_form(w, model, schedule, seed=0, device="cpu")
    assert form is w and facts["sampling_engine"] == "eager"
    assert facts["sampling_engine_reason"] == "the method's own wrapper (Wrapper)"
