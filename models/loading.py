"""Load a :class:`ModelSpec` into a denoiser + scheduler, offline first.

* ``hub``: ``DiffusionPipeline.from_pretrained(repo_id)`` — from the local Hugging Face
  cache when offline (``HF_HUB_OFFLINE=1`` or no network), else downloaded;
* ``local`` / ``--model-path``: any diffusers pipeline directory (``save_pretrained`` layout);
* ``embedded``: the project's own trained assets under ``models/assets/``;
* ``random``: a random-init UNet built from a real config (seeded), labelled as such;
* ``miniature``, latent (VQ/KL autoencoder) and text-conditioned pipelines, and local
  directories holding an autoencoder or text encoder: delegated to :mod:`models.latent`
  (FP decoder, text ``cond_fn``, CFG null class).

Class-conditional UNets (``num_class_embeds``) are detected from the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from models.denoiser import Denoiser
from models.registry import ASSETS, ModelSpec

_DDPM_LINEAR = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True)


@dataclass
class LoadedModel:
    spec: ModelSpec
    denoiser: Denoiser
    scheduler: DDPMScheduler  # the training noise schedule (alphas_cumprod)
    sample_shape: tuple[int, int, int]  # (C, H, W) of what the sampler draws (latents for LDMs)
    num_classes: int | None = None
    decode: object | None = None  # latents -> images in [-1, 1] (latent pipelines)
    extra: dict = field(default_factory=dict)  # text encoder, prompts, ...


class ModelLoadError(RuntimeError):
    pass


def pipeline_dir(spec: ModelSpec, model_path: str | None) -> str:
    """Where a model's pipeline loads from: ``--model-path``, the embedded asset directory, or the hub id."""
    if model_path:
        return model_path
    if spec.source == "embedded":
        return str(ASSETS / spec.location)
    return spec.location


def _from_pipeline(location: str, spec: ModelSpec) -> tuple[torch.nn.Module, object, dict]:
    path = Path(location)
    if spec.source in ("local", "embedded") or path.exists():
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise ModelLoadError(
                f"{location} is not a diffusers pipeline directory (no model_index.json or unet/): "
                "save one with pipeline.save_pretrained(DIR)"
            )
        unet = None
        if (path / "unet").is_dir():
            # low_cpu_mem_usage=False: the fast path needs `accelerate`, which these small UNets do not warrant
            unet = UNet2DModel.from_pretrained(path / "unet", local_files_only=True, low_cpu_mem_usage=False)
        if unet is not None:
            sched = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True) if (
                path / "scheduler").is_dir() else DDPMScheduler(**_DDPM_LINEAR)
            return unet, sched, {}
    try:
        pipe = DiffusionPipeline.from_pretrained(location)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load {location!r} ({type(e).__name__}): it is not in the Hugging Face cache and the hub is "
            "unreachable; download it where you have network, or pass --model-path DIR (a diffusers pipeline directory)"
        ) from None
    components = {k: v for k, v in pipe.components.items() if k not in ("unet", "scheduler")}
    return pipe.unet, pipe.scheduler, components


def load_model(spec: ModelSpec, model_path: str | None = None, device: str | torch.device = "cpu",
               captions: str | None = None) -> LoadedModel:
    """``spec`` (weights from ``model_path`` when given) on ``device``.

    ``captions``: the caption file of a text-conditional model (one caption per line; image ``i``
    uses line ``i mod N``); ignored by models without a text encoder."""
    from models import latent  # lazy: models.latent imports this module

    if latent.needs_latent_loader(spec, model_path):
        return latent.load_latent_model(spec, model_path, device, captions=captions)
    if spec.source == "random":
        torch.manual_seed(0)  # the miniature is the same network in every process
        unet = UNet2DModel(**spec.random_config)
        scheduler, components = DDPMScheduler(**_DDPM_LINEAR), {}
    else:
        unet, scheduler, components = _from_pipeline(pipeline_dir(spec, model_path), spec)
    if not isinstance(scheduler, DDPMScheduler):
        scheduler = DDPMScheduler.from_config(scheduler.config)
    unet = unet.to(device).eval().requires_grad_(False)
    cfg = unet.config
    num_classes = getattr(cfg, "num_class_embeds", None)
    conditioning = "class" if num_classes else spec.conditioning
    out_ch = cfg.in_channels
    denoiser = Denoiser(unet, conditioning=conditioning, guidance_scale=spec.guidance_scale, out_channels=out_ch)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return LoadedModel(spec, denoiser, scheduler, (cfg.in_channels, size, size), num_classes, extra=components)
