"""harness/sampling_form.py: runs sample with FastQuantLayers only where they equal the eager path."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from harness.calibration import TrajectoryBank
from harness.generate import make_schedule
from harness.sampling import SAMPLERS
from harness.sampling_form import sampling_form
from methods.base import BitConfig
from methods.quant.fast import FastQuantLayer
from methods.quant.layers import QuantLayer
from methods.quant.quantizer import UniformQuantizer
from methods.quant.surgery import UNIFORM, quant_layers
from methods.rtn import RoundToNearest, RTNConfig
from models.loading import load_model
from models.registry import get_model


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    model = load_model(get_model("ldm-imagenet-mini"))  # class-conditional, CFG
    schedule = make_schedule(model, 3, "uniform")
    bank = TrajectoryBank(model, schedule, "ddim", 0.0, tmp_path_factory.mktemp("bank"))
    res = RoundToNearest(RTNConfig(calib_images=4, calib_steps=2)).quantize(
        copy.deepcopy(model.denoiser), bank, BitConfig(4, 8), UNIFORM, tmp_path_factory.mktemp("art"))
    return model, schedule, res.denoiser


def _sample(model, schedule, denoiser):
    x = torch.randn(3, *model.sample_shape, generator=torch.Generator().manual_seed(5))
    return SAMPLERS["ddim"](denoiser, x, schedule, cond=torch.tensor([2, 0, 9]))


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
