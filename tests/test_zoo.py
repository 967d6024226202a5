"""Every paper-zoo entry, offline, on its random-init miniature: load, quantize with every
registered method's ``fast`` preset (shrunk for CPU), sample, decode, score."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

import methods
from harness.calibration import TrajectoryBank
from harness.generate import make_schedule, sample_images
from harness.metrics import paired_metrics
from methods.base import BitConfig
from methods.quant.layers import QuantLayer
from methods.quant.surgery import UNIFORM
from methods.quant.timestep import current_step
from models.cifarnet import DEFAULT_ASSET_DIR
from models.loading import load_model
from models.registry import ZOO, get_model, local_model
from models.zoo import EXTRAS, PAPER_ZOO, miniature

STEPS, IMAGES, SEEDS = 2, 4, [0, 1]
HAVE_CIFARNET = (DEFAULT_ASSET_DIR / "model.safetensors").is_file()


def small_config(cls):
    """The method's ``fast`` preset with its size knobs capped, so each run takes seconds on a CPU."""
    cfg = cls.config_cls.from_preset("fast")
    caps = {"images": IMAGES, "samples": IMAGES, "steps": STEPS, "iters": 2, "iterations": 2, "epochs": 1,
            "rounds": 1, "batch": IMAGES}
    changes = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, int) and not isinstance(v, bool):
            for key, cap in caps.items():
                if key in f.name and v > cap:
                    changes[f.name] = cap
    return dataclasses.replace(cfg, **changes)


_CACHE: dict[str, tuple] = {}


def _setup(name: str, tmp_root):
    if name not in _CACHE:
        spec = get_model(f"{name}-mini")
        model = load_model(spec)
        schedule = make_schedule(model, STEPS, "uniform")
        bank = TrajectoryBank(model, schedule, spec.sampler, spec.eta, tmp_root / name)
        fp_images = sample_images(model, model.denoiser, schedule, spec.sampler, spec.eta, SEEDS, "cpu")
        _CACHE[name] = (spec, model, schedule, bank, fp_images)
    return _CACHE[name]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def test_zoo_entries_record_published_protocols():
    assert ZOO["ddpm-cifar10"].reference == "cifar10-train"
    expect = {
        "ddpm-cifar10": ("ddim", 100, 0.0, "quad", 1.0),
        "ldm-lsun-bedroom": ("ddim", 200, 1.0, "uniform", 1.0),
        "ldm-lsun-church": ("ddim", 400, 0.0, "uniform", 1.0),
        "ldm-imagenet": ("ddim", 20, 0.0, "uniform", 3.0),
        "sd-v1-4": ("plms", 50, 0.0, "uniform", 7.5),
        "ldm-celebahq": ("ddim", 500, 0.0, "uniform", 1.0),
    }
    for name, (sampler, steps, eta, spacing, cfg) in expect.items():
        s = ZOO[name]
        assert (s.sampler, s.steps, s.eta, s.spacing, s.guidance_scale) == (sampler, steps, eta, spacing, cfg), name
    assert ZOO["sd-v1-4"].location == "CompVis/stable-diffusion-v1-4" and ZOO["sd-v1-4"].conditioning == "text"
    assert ZOO["ldm-celebahq"].location == "CompVis/ldm-celebahq-256"
    assert {ZOO["ddpm-church"].location, ZOO["ddpm-bedroom"].location} == {"google/ddpm-church-256",
                                                                             "google/ddpm-bedroom-256"}
    for name in ("ldm-lsun-bedroom", "ldm-lsun-church", "ldm-imagenet"):  # CompVis-only: --model-path DIR
        assert ZOO[name].source == "local" and ZOO[name].pipeline == "latent"
    for name in PAPER_ZOO:
        assert ZOO[f"{name}-mini"].source == "miniature" and ZOO[f"{name}-mini"].random_init


def test_compvis_only_entry_without_path_fails_with_the_fix():
    from models.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="--model-path"):
        load_model(ZOO["ldm-lsun-bedroom"])


BASELINES = ("fp", "rtn")
# Methods beyond the baselines run on the richest miniature (text CFG, PLMS, cross-attention, KL decoder)
# by default; the full entry x method matrix is marked slow.
FULL = ("sd-v1-4",)
CASES = [pytest.param(n, m, marks=() if (m in BASELINES or n in FULL) else pytest.mark.slow)
         for n in PAPER_ZOO for m in methods.names()]


@pytest.mark.parametrize(("name", "method"), CASES)
def test_miniature_quantize_sample_decode_score(name, method, tmp_root, tmp_path):
    spec, model, schedule, bank, fp_images = _setup(name, tmp_root)
    ae = model.extra.get("autoencoder")
    ae_state = {k: v.clone() for k, v in ae.state_dict().items()} if ae is not None else None
    cls = methods.get(method)
    result = cls(small_config(cls)).quantize(copy.deepcopy(model.denoiser), bank, BitConfig(4, 8), UNIFORM, tmp_path)
    unet = result.denoiser.unet
    if cls.quantizes:
        assert any(isinstance(m, QuantLayer) for m in unet.modules())
    # Only the denoiser is quantized: autoencoder and text encoder stay FP and untouched.
    for part in (ae, model.extra.get("text_encoder")):
        if part is not None:
            assert not any(isinstance(m, QuantLayer) for m in part.modules())
    if ae is not None:
        assert all(torch.equal(v, ae.state_dict()[k]) for k, v in ae_state.items())

    images = sample_images(model, result.denoiser, schedule, spec.sampler, spec.eta, SEEDS, "cpu")
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8
    paired = paired_metrics(images, fp_images)
    if not cls.quantizes:
        assert paired["paired/mse"] == 0.0
    assert np.isfinite(paired["paired/mse"])
    if HAVE_CIFARNET:
        from harness.metrics import compute_metrics

        scores = compute_metrics(np.concatenate([images, fp_images]), extractor="cifarnet", device="cpu",
                                 clean_fid=False, kid_subsets=2)
        assert np.isfinite(scores["fid/cifarnet"])


@pytest.mark.parametrize("name", ["ldm-imagenet", "sd-v1-4"])
def test_cfg_batches_cond_and_uncond_in_one_call_under_one_timestep(name, tmp_root):
    spec, model, schedule, bank, _ = _setup(name, tmp_root)
    calls = []
    hook = model.denoiser.unet.register_forward_pre_hook(
        lambda mod, args: calls.append((current_step().step_index, args[0].shape[0])))
    try:
        sample_images(model, model.denoiser, schedule, spec.sampler, spec.eta, SEEDS, "cpu")
    finally:
        hook.remove()
    expected_calls = STEPS + (1 if spec.sampler == "plms" else 0)  # PLMS warm-up: S + 1 calls
    assert len(calls) == expected_calls
    assert all(b == 2 * len(SEEDS) for _, b in calls)  # (uncond, cond) in one UNet batch
    assert sorted({s for s, _ in calls}) == list(range(STEPS))


def test_class_conditional_null_class_and_text_conditioning(tmp_root):
    _, cin, _, _, _ = _setup("ldm-imagenet", tmp_root)
    assert cin.num_classes == EXTRAS["ldm-imagenet"]["null_class"] == 1000
    assert cin.denoiser.uncond.tolist() == [1000]
    from harness.calibration import initial_noise_and_cond

    _, labels, _ = initial_noise_and_cond(cin, list(range(50)))
    assert int(labels.max()) < 1000

    _, sd, _, _, _ = _setup("sd-v1-4", tmp_root)
    cond_fn = sd.extra["cond_fn"]
    e = cond_fn([0, 1, 0, 10_000_000 * 3 + 1])  # image index = seed mod EVAL_SEED_STRIDE
    assert e.shape[0] == 4 and torch.equal(e[0], e[2]) and torch.equal(e[1], e[3]) and not torch.equal(e[0], e[1])
    assert sd.denoiser.uncond.shape == (1, *e.shape[1:])
    assert torch.equal(sd.denoiser.uncond[0].cpu(), cond_fn.embed([""])[0])


def test_captions_file_override(tmp_root, tmp_path, monkeypatch):
    f = tmp_path / "captions.txt"
    f.write_text("a dog\n\na tree\n")
    monkeypatch.setenv("DMQBENCH_CAPTIONS", str(f))
    sd = load_model(get_model("sd-v1-4-mini"))
    assert sd.extra["captions"] == ["a dog", "a tree"]
    assert sd.extra["cond_fn"].caption(3) == "a tree"


def test_latent_pipeline_directory_loads_as_model_path(tmp_path, tmp_root):
    """A converted CompVis LDM (LDMPipeline.save_pretrained layout) loads through --model-path DIR."""
    from diffusers import DDIMScheduler, LDMPipeline

    _, mini, schedule, _, fp_images = _setup("ldm-lsun-bedroom", tmp_root)
    sched = DDIMScheduler(**miniature("ldm-lsun-bedroom")["scheduler"])
    LDMPipeline(vqvae=mini.extra["autoencoder"], unet=mini.denoiser.unet, scheduler=sched).save_pretrained(tmp_path)
    assert "vqvae" in json.loads((tmp_path / "model_index.json").read_text())
    model = load_model(ZOO["ldm-lsun-bedroom"], model_path=str(tmp_path))
    assert model.decode is not None and model.sample_shape == mini.sample_shape
    assert torch.allclose(model.scheduler.alphas_cumprod, mini.scheduler.alphas_cumprod)
    assert not model.scheduler.config.clip_sample
    images = sample_images(model, model.denoiser, schedule, "ddim", 1.0, SEEDS, "cpu")
    assert np.array_equal(images, fp_images)
    generic = load_model(local_model(tmp_path))  # the generic local spec detects the autoencoder too
    assert generic.decode is not None
