"""The paper zoo: the models the PTQ papers evaluate, each with its published protocol.

Imported at the end of :mod:`models.registry`, so every entry is in ``ZOO``. Sources
(docs/protocols.md; docs/zoo.md has the details and conversion recipes):

* ``ddpm-cifar10``: google/ddpm-cifar10-32 (hub), pixel; DDIM 100, eta 0, quad; 50k vs CIFAR-10 train.
* ``ddpm-church`` / ``ddpm-bedroom``: google/ddpm-{church,bedroom}-256 (hub), pixel; DDIM 100, eta 0.
* ``ldm-celebahq``: CompVis/ldm-celebahq-256 (hub), LDM-4 VQ-f4; DDIM 500, eta 0 (LDM Table 1).
* ``ldm-lsun-bedroom``: CompVis lsun_beds256 (local), LDM-4 VQ-f4; DDIM 200, eta 1.0.
* ``ldm-lsun-church``: CompVis lsun_churches256 (local), LDM-8 KL-f8; DDIM 400, eta 0.
* ``ldm-imagenet``: CompVis cin256-v2 (local), LDM-4 VQ-f4, class-cond.; DDIM 20, eta 0, cfg 3.0.
* ``sd-v1-4``: CompVis/stable-diffusion-v1-4 (hub), LDM-8 KL-f8 + CLIP; PLMS 50, cfg 7.5, COCO captions.

The three CompVis-only LDMs have ``source="local"`` and no default location: convert
the original checkpoint (docs/zoo.md) and pass ``--model-path DIR``.

Every entry also has a random-init **miniature** (:func:`miniature`): the same
architecture family built from a shrunken copy of its config (same block types, same
latent channels and autoencoder down-factor, same scheduler), sized so that its images
are 32x32 and load -> quantize -> sample -> decode -> score runs in seconds on a CPU.
They are registered as ``<name>-mini`` with ``source="miniature"`` (random weights:
numbers only test plumbing).

Protocol details a :class:`ModelSpec` has no field for live in :data:`EXTRAS`
(captions file, latent scaling factor, the CFG null class).
"""

from __future__ import annotations

from dataclasses import replace

from models.registry import ZOO, ModelSpec, register_model

# DDPM linear schedule (Ho et al.), as in every google/ddpm-* scheduler config.
DDPM_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                      clip_sample=True)
# CompVis LDM configs: linear_start/linear_end on sqrt(beta) = diffusers "scaled_linear", no clipping.
LDM_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                     clip_sample=False)
# lsun_churches-ldm-kl-8.yaml uses linear_end 0.0155.
LDM_CHURCH_SCHEDULER = dict(LDM_SCHEDULER, beta_end=0.0155)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    clip_sample=False)

# Per-model protocol facts beyond ModelSpec's fields.
#   latent_scale: z = scale * E(x); the decoder sees z / scale (VQ LDMs: 1.0, as LDMPipeline).
#   captions: the protocol's caption file name (one caption per line; image i uses line i mod N), relative
#             to the working directory; not shipped. `bench run --captions FILE` (or DMQBENCH_CAPTIONS=FILE)
#             names another; the spec records the file's sha256 (docs/zoo.md).
#   null_class: the class id of the unconditional embedding used for classifier-free guidance.
#   scheduler: the training noise schedule (used for miniatures and when a directory has none).
EXTRAS: dict[str, dict] = {
    "ddpm-cifar10": {"scheduler": DDPM_SCHEDULER},
    "ddpm-church": {"scheduler": DDPM_SCHEDULER},
    "ddpm-bedroom": {"scheduler": DDPM_SCHEDULER},
    "ldm-celebahq": {"scheduler": LDM_SCHEDULER, "latent_scale": 1.0, "autoencoder": "vq-f4"},
    "ldm-lsun-bedroom": {"scheduler": LDM_SCHEDULER, "latent_scale": 1.0, "autoencoder": "vq-f4"},
    "ldm-lsun-church": {"scheduler": LDM_CHURCH_SCHEDULER, "latent_scale": 0.22765929, "autoencoder": "kl-f8"},
    "ldm-imagenet": {"scheduler": LDM_SCHEDULER, "latent_scale": 1.0, "autoencoder": "vq-f4", "null_class": 1000},
    "sd-v1-4": {"scheduler": SD_SCHEDULER, "latent_scale": 0.18215, "autoencoder": "kl-f8",
                "captions": "data/coco/captions_val2014_30k.txt", "text_max_length": 77},
}

PAPER_ZOO = tuple(EXTRAS)

_CONVERT = "convert the CompVis checkpoint (docs/zoo.md) and pass --model-path DIR"

register_model(replace(
    ZOO["ddpm-cifar10"], reference="cifar10-train",
    description="DDPM CIFAR-10 (Ho et al. 2020) via diffusers; DDIM 100, eta 0, quad, 50k vs CIFAR-10 train "
                "(Q-Diffusion, APQ-DM, TFMQ-DM)",
))
register_model(ModelSpec(
    "ddpm-church", "hub", "google/ddpm-church-256", steps=100, eta=0.0, spacing="uniform", resolution=256,
    reference="lsun-church-train", extractor="inception",
    clip_sample=False,  # the papers' DDIM/PLMS code does not clip x0
    description="DDPM LSUN-Church 256 (pixel) via diffusers; DDIM 100, eta 0 (DDIM-port setting of APQ-DM)",
))
register_model(ModelSpec(
    "ddpm-bedroom", "hub", "google/ddpm-bedroom-256", steps=100, eta=0.0, spacing="uniform", resolution=256,
    reference="lsun-bedroom-train", extractor="inception",
    clip_sample=False,  # the papers' DDIM/PLMS code does not clip x0
    description="DDPM LSUN-Bedroom 256 (pixel) via diffusers; DDIM 100, eta 0 (DDIM-port setting of APQ-DM)",
))
register_model(ModelSpec(
    "ldm-celebahq", "hub", "CompVis/ldm-celebahq-256", pipeline="latent", steps=500, eta=0.0, spacing="uniform",
    resolution=256, reference="celebahq-256", extractor="inception",
    clip_sample=False,  # the papers' DDIM/PLMS code does not clip x0
    description="LDM-4 CelebA-HQ 256 (VQ-f4) via diffusers LDMPipeline; DDIM 500, eta 0 (LDM paper Table 1)",
))
register_model(ModelSpec(
    "ldm-lsun-bedroom", "local", "", pipeline="latent", steps=200, eta=1.0, spacing="uniform", resolution=256,
    reference="lsun-bedroom-train", extractor="inception",
    clip_sample=False,  # the papers' DDIM/PLMS code does not clip x0
    description=f"LDM-4 LSUN-Bedroom 256 (VQ-f4); DDIM 200, eta 1.0 (Q-Diffusion, TFMQ-DM, PTQD); {_CONVERT}",
))
register_model(ModelSpec(
    "ldm-lsun-church", "local", "", pipeline="latent", steps=400, eta=0.0, spacing="uniform", resolution=256,
    reference="lsun-church-train", extractor="inception",
    clip_sample=False,  # the papers' DDIM/PLMS code does not clip x0
    description=f"LDM-8 LSUN-Church 256 (KL-f8); DDIM 400, eta 0 (Q-Diffusion, TFMQ-DM); {_CONVERT}",
))
register_model(ModelSpec(
    "ldm-imagenet", "local", "", pipeline="latent", conditioning="class", steps=20, eta=0.0, spacing="uniform",
    guidance_scale=3.0, resolution=256, reference="imagenet-256-50-per-class", extractor="inception",
    clip_sample=False,  # the papers' DDIM/PLMS code does not clip x0
    description=f"LDM-4 ImageNet 256 cin256-v2 (VQ-f4, class-cond.); DDIM 20, eta 0, cfg 3.0 (TFMQ-DM); {_CONVERT}",
))
register_model(ModelSpec(
    "sd-v1-4", "hub", "CompVis/stable-diffusion-v1-4", pipeline="latent", conditioning="text", sampler="plms",
    steps=50, eta=0.0, spacing="uniform", guidance_scale=7.5, resolution=512, num_samples=30_000,
    reference="coco-val2014", extractor="inception",
    clip_sample=False,  # the papers' DDIM/PLMS code does not clip x0
    description="Stable Diffusion v1.4 (KL-f8, CLIP text); PLMS 50, cfg 7.5, COCO captions (TFMQ-DM, Q-Diffusion)",
))


# ---- miniatures ----------------------------------------------------------------------------------------------

def _pixel_unet(down, up, channels, num_class_embeds=None, in_channels=3, sample_size=32) -> dict:
    cfg = dict(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
               block_out_channels=channels, layers_per_block=1, down_block_types=down, up_block_types=up,
               norm_num_groups=8, attention_head_dim=None)
    if num_class_embeds:
        cfg["num_class_embeds"] = num_class_embeds
    return cfg


def _vq_f4(latent_channels: int = 3) -> dict:
    # VQ-f4: 3 resolution levels (2 downsamplings), 3 latent channels, like CompVis vq-f4.
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
                latent_channels=latent_channels, num_vq_embeddings=64, vq_embed_dim=latent_channels,
                norm_num_groups=4, sample_size=32)


def _kl_f8(latent_channels: int = 4) -> dict:
    # KL-f8: 4 resolution levels (3 downsamplings), 4 latent channels, like SD's and LDM-8's autoencoder.
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                latent_channels=latent_channels, norm_num_groups=4, sample_size=32)


_LDM_DOWN = ("DownBlock2D", "AttnDownBlock2D")
_LDM_UP = ("AttnUpBlock2D", "UpBlock2D")


def miniature(name: str) -> dict:
    """A small random-init config of ``name``'s architecture family (32x32 images out).

    Returns ``{"unet_class", "unet", "scheduler", ...}`` plus ``"vq"`` / ``"kl"`` (autoencoder
    config), ``"text_encoder"`` (tiny CLIPTextConfig kwargs) and ``"latent_scale"`` as they apply.
    """
    base = name[: -len("-mini")] if name.endswith("-mini") else name
    if base not in EXTRAS:
        raise KeyError(f"no miniature for {name!r}: known {', '.join(PAPER_ZOO)}")
    ex = EXTRAS[base]
    out: dict = {"scheduler": dict(ex["scheduler"]), "unet_class": "UNet2DModel"}
    if base == "ddpm-cifar10":
        # ddpm-cifar10-32: DownBlock2D, AttnDownBlock2D, ... (first two levels kept).
        out["unet"] = _pixel_unet(_LDM_DOWN, _LDM_UP, (16, 32))
    elif base in ("ddpm-church", "ddpm-bedroom"):
        # google/ddpm-*-256: 6 levels, attention at the 16x16 level; here 3 levels, attention in the middle.
        out["unet"] = _pixel_unet(("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                  ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), (8, 16, 16))
    elif base in ("ldm-celebahq", "ldm-lsun-bedroom"):
        out["unet"] = _pixel_unet(_LDM_DOWN, _LDM_UP, (16, 32), in_channels=3, sample_size=8)
        out["vq"] = _vq_f4(3)
    elif base == "ldm-lsun-church":
        out["unet"] = _pixel_unet(_LDM_DOWN, _LDM_UP, (16, 32), in_channels=4, sample_size=4)
        out["kl"] = _kl_f8(4)
    elif base == "ldm-imagenet":
        # 1000 classes + the null class (id 1000) for classifier-free guidance.
        out["unet"] = _pixel_unet(_LDM_DOWN, _LDM_UP, (16, 32), num_class_embeds=1001, in_channels=3,
                                  sample_size=8)
        out["vq"] = _vq_f4(3)
    elif base == "sd-v1-4":
        out["unet_class"] = "UNet2DConditionModel"
        out["unet"] = dict(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                           block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                           attention_head_dim=4, norm_num_groups=8)
        out["kl"] = _kl_f8(4)
        # A tiny CLIP text transformer (CLIPTextConfig kwargs); ids come from caption bytes.
        out["text_encoder"] = dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=16, bos_token_id=257,
                                   eos_token_id=258, pad_token_id=259)
        out["captions"] = ["a photo of a cat", "a red bus on a street", "two people on a beach",
                           "a bowl of fruit on a table"]
    out["latent_scale"] = ex.get("latent_scale", 1.0)
    return out


def miniature_spec(name: str) -> ModelSpec:
    """The ``-mini`` spec of a paper-zoo entry: same protocol, random-init miniature weights."""
    spec = ZOO[name]
    return replace(spec, name=f"{name}-mini", source="miniature", location=name, resolution=32, num_samples=64,
                   reference="cifar10-test", extractor="cifarnet", random_init=True,
                   description=f"RANDOM-INIT miniature of {name} (same architecture family, 32x32 images); tests only")


for _name in PAPER_ZOO:
    register_model(miniature_spec(_name))
