"""The sampler's x0 clipping is a protocol field (RunSpec.clip_sample), not whatever the scheduler file says."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from harness.generate import make_schedule, sample_images
from harness.spec import expand
from models.loading import load_model
from models.registry import TINY_RANDOM_UNET, get_model


def _clip(model_name: str, **kw) -> bool | None:
    return next(s for s in expand("fp", model_name, "w8a8", **kw)).clip_sample


def test_zoo_protocols_record_the_papers_clipping(tmp_path):
    # Q-Diffusion's and APQ-DM's generalized_steps do not clip; the embedded model keeps its DDPM scheduler's.
    assert _clip("ddpm-cifar10") is False and _clip("ddpm-cifar10-mini") is False and _clip("ldm-celebahq") is False
    assert _clip("tiny-cifar10") is True
    assert "clip_sample" in next(iter(expand("fp", "ddpm-cifar10", "w8a8"))).to_dict()
    # a local directory without a zoo name: its scheduler config decides, and the spec records it
    DDPMPipeline(unet=UNet2DModel(**TINY_RANDOM_UNET), scheduler=DDPMScheduler(clip_sample=False)).save_pretrained(
        tmp_path / "pipe")
    assert _clip(None, model_path=str(tmp_path / "pipe")) is False
    cfg = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "clip_sample": True}))
    assert _clip(None, model_path=str(tmp_path / "pipe")) is True


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddpm", 1.0)])
def test_both_samplers_follow_the_schedule_clipping(sampler, eta):
    model = load_model(get_model("tiny-random"))  # random weights: x0 predictions leave [-1, 1]
    assert model.scheduler.config.clip_sample is True
    den = model.denoiser
    out = {}
    for clip in (True, False):
        schedule = make_schedule(model, 4, "uniform", clip_sample=clip)
        assert schedule.clip_sample is clip and schedule.scheduler.config.clip_sample is clip
        out[clip] = sample_images(model, den, schedule, sampler, eta, [0, 1], "cpu")
    assert not np.array_equal(out[True], out[False])
    assert model.scheduler.config.clip_sample is True  # the loaded model's scheduler is not modified
