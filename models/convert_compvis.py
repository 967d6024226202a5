"""Convert an original CompVis latent-diffusion checkpoint (+ its YAML config) to a pipeline directory.

``bench convert compvis --ckpt model.ckpt --config config.yaml --out DIR`` (harness/commands/convert.py)
calls :func:`convert`. The directory loads with ``bench run --models NAME --model-path DIR`` and
``models.loading.load_model(ZOO[NAME], model_path=DIR)`` (through :func:`models.latent.load_compvis_dir`).

Supported (the LDM configs of CompVis/latent-diffusion ``configs/latent-diffusion/``):

* denoiser ``ldm.modules.diffusionmodules.openaimodel.UNetModel``

  - unconditional, ``AttentionBlock`` self-attention (``lsun_churches-ldm-kl-8``,
    ``lsun_bedrooms-ldm-vq-4``, ``celebahq-ldm-vq-4``) -> diffusers ``UNet2DModel``; the key mapping
    is written here (diffusers has none for this UNet);
  - cross-attention ``SpatialTransformer`` conditioned on ``ClassEmbedder`` (``cin256-v2``) ->
    diffusers ``UNet2DConditionModel`` via ``diffusers.loaders.single_file_utils``
    (``create_unet_diffusers_config_from_ldm``, ``convert_ldm_unet_checkpoint``), plus the
    class embedding table (``class_embedder/``: ``nn.Embedding(n_classes, context_dim)`` whose
    output is the length-1 ``encoder_hidden_states``).

* first stage ``AutoencoderKL`` (KL-f8) -> ``AutoencoderKL``, ``VQModelInterface`` (VQ-f4) ->
  ``VQModel``; encoder/decoder keys through diffusers' ``convert_ldm_vae_checkpoint``, the codebook
  (``quantize.embedding.weight``) added here.
* noise schedule: ``linear_start``/``linear_end`` (``beta_schedule: linear`` is linear in sqrt(beta),
  diffusers' ``scaled_linear``), checked against the checkpoint's ``betas`` buffer when present.
* weights: the EMA copy (``model_ema.*``) when the checkpoint has one, as CompVis' sampling scripts
  use it (``ema_scope``); ``ema=False`` keeps the raw weights.
* latent scale: the checkpoint's ``scale_factor`` buffer (``scale_by_std: True`` configs, e.g. church
  0.22765929), else the config's ``scale_factor``, else 1.0; recorded in ``compvis.json``.

Directory layout: ``model_index.json``, ``unet/``, ``vqvae/`` or ``vae/``, ``scheduler/`` (DDIM),
``class_embedder/`` (class-conditional only) and ``compvis.json`` (conversion record: source files,
latent scale, null class, attention heads per self-attention layer when they are not one fixed head
width -- ``UNet2DModel`` has a single ``attention_head_dim``, while e.g. the church config fixes
``num_heads: 8`` at every width; the loader applies them). An unconditional VQ directory is also a
plain diffusers ``LDMPipeline``.

Only random-init miniatures of these architectures were converted and checked here
(tests/test_convert_compvis.py: outputs equal the original ``ldm`` modules' to 1e-5).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path

import torch

LDM_UNET = "model.diffusion_model."
FIRST_STAGE = "first_stage_model."
COND_STAGE = "cond_stage_model."
RECORD = "compvis.json"

UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
KL_TARGETS = ("ldm.models.autoencoder.AutoencoderKL",)
VQ_TARGETS = ("ldm.models.autoencoder.VQModelInterface", "ldm.models.autoencoder.VQModel")
CLASS_EMBEDDER = "ldm.modules.encoders.modules.ClassEmbedder"

# What each CompVis zoo entry must be: (first stage, conditioning).
ZOO_ARCH = {
    "ldm-lsun-church": ("kl", "none"),
    "ldm-lsun-bedroom": ("vq", "none"),
    "ldm-celebahq": ("vq", "none"),
    "ldm-imagenet": ("vq", "class"),
}


class ConvertError(ValueError):
    """Bad input: the message is one line naming the problem."""


# ---- reading -----------------------------------------------------------------------------------------------------

def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a CompVis ``.ckpt``, loaded with ``weights_only=True`` (no arbitrary pickles)."""
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"checkpoint {p} not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f" (e.g. {found.group(1)})" if found else ""
        raise ConvertError(
            f"{p}: holds Python objects besides tensors{what} that torch.load(weights_only=True) refuses; "
            "in an environment you trust, re-save just its weights: torch.save({'state_dict': ckpt['state_dict']}, "
            "PATH)") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file; one line for the user
        first = (str(e).splitlines() or [""])[0][:160]
        raise ConvertError(f"{p}: not a torch checkpoint ({type(e).__name__}: {first})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(isinstance(k, str) and k.startswith(LDM_UNET) for k in sd):
        raise ConvertError(f"{p}: not a CompVis latent-diffusion checkpoint (expected a 'state_dict' with "
                           f"'{LDM_UNET}*' keys)")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConvertError(f"{p}: state_dict entry {bad[0]!r} is not a tensor")
    return sd


def load_config(path: str | Path) -> dict:
    """The YAML config as plain dicts (PyYAML ``safe_load``; OmegaConf interpolation is not used by these configs)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"config {p} not found")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConvertError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or "params" not in cfg["model"]:
        raise ConvertError(f"{p}: not a latent-diffusion config (no model.params)")
    return cfg


def _section(params: dict, key: str, cfg_path: str) -> dict:
    sec = params.get(key)
    if not isinstance(sec, dict) or "target" not in sec:
        raise ConvertError(f"{cfg_path}: model.params.{key} has no target")
    return sec


# ---- schedule ----------------------------------------------------------------------------------------------------

def scheduler_config(params: dict, sd: dict, cfg_path: str) -> dict:
    if params.get("parameterization", "eps") != "eps":
        raise ConvertError(f"{cfg_path}: parameterization {params['parameterization']!r} is not supported (eps only)")
    if params.get("beta_schedule", "linear") != "linear":
        raise ConvertError(f"{cfg_path}: beta_schedule {params['beta_schedule']!r} is not supported (linear only)")
    T = int(params.get("timesteps", 1000))
    start, end = float(params.get("linear_start", 1e-4)), float(params.get("linear_end", 2e-2))
    if "betas" in sd:
        betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
        stored = sd["betas"].double()
        if stored.shape != betas.shape or (stored - betas).abs().max() > 1e-6:
            raise ConvertError(f"{cfg_path}: linear_start/linear_end/timesteps do not match the checkpoint's betas")
    return dict(num_train_timesteps=T, beta_schedule="scaled_linear", beta_start=start, beta_end=end,
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)


# ---- UNet: unconditional openaimodel UNetModel -> UNet2DModel -----------------------------------------------------

def _unet_common(up: dict, cfg_path: str) -> tuple[list[int], int, int]:
    if up.get("dims", 2) != 2 or not up.get("conv_resample", True) or up.get("n_embed") is not None:
        raise ConvertError(f"{cfg_path}: unet_config with dims/conv_resample/n_embed options is not supported")
    nrb = up["num_res_blocks"]
    if not isinstance(nrb, int):
        raise ConvertError(f"{cfg_path}: per-level num_res_blocks is not supported")
    if up.get("num_attention_blocks") is not None:
        raise ConvertError(f"{cfg_path}: num_attention_blocks is not supported")
    mc = int(up["model_channels"])
    chans = [mc * int(m) for m in up.get("channel_mult", (1, 2, 4, 8))]
    if any(c % 32 for c in chans):
        raise ConvertError(f"{cfg_path}: channel widths {chans} are not multiples of 32 (GroupNorm32)")
    return chans, nrb, mc


def _heads(ch: int, up: dict, upsample: bool = False) -> int:
    nhc = int(up.get("num_head_channels", -1))
    if nhc != -1:
        return ch // nhc
    heads = int(up.get("num_heads", -1))
    if upsample and int(up.get("num_heads_upsample", -1)) != -1:
        heads = int(up["num_heads_upsample"])
    return heads


def unconditional_unet(up: dict, cfg_path: str) -> tuple[dict, dict[str, int]]:
    """``UNet2DModel`` kwargs of an unconditional UNetModel, and heads per attention module when not uniform."""
    if up.get("use_spatial_transformer") or up.get("context_dim") is not None or up.get("num_classes") is not None:
        raise ConvertError(f"{cfg_path}: conditional unet_config in an unconditional model")
    chans, nrb, _ = _unet_common(up, cfg_path)
    if int(up.get("num_head_channels", -1)) == -1 and int(up.get("num_heads", -1)) == -1:
        raise ConvertError(f"{cfg_path}: unet_config sets neither num_heads nor num_head_channels")
    attn_res = set(up.get("attention_resolutions", ()))
    attn_levels = [2**i in attn_res for i in range(len(chans))]
    updown = bool(up.get("resblock_updown", False))
    down = [("AttnDownBlock2D" if a else ("ResnetDownsampleBlock2D" if updown else "DownBlock2D")) for a in attn_levels]
    upb = [("AttnUpBlock2D" if a else ("ResnetUpsampleBlock2D" if updown else "UpBlock2D"))
           for a in reversed(attn_levels)]
    # Heads of every self-attention layer (openaimodel: fixed num_heads, or width // num_head_channels).
    heads: dict[str, int] = {}
    for i, (c, a) in enumerate(zip(chans, attn_levels, strict=True)):
        for r in range(nrb if a else 0):
            heads[f"down_blocks.{i}.attentions.{r}"] = _heads(c, up)
    heads["mid_block.attentions.0"] = _heads(chans[-1], up)
    for j, (c, a) in enumerate(zip(list(reversed(chans)), list(reversed(attn_levels)), strict=True)):
        for r in range(nrb + 1 if a else 0):
            heads[f"up_blocks.{j}.attentions.{r}"] = _heads(c, up, upsample=True)
    head_dims = {name: _width(name, chans, nrb) // h for name, h in heads.items()}
    uniform = len(set(head_dims.values())) == 1
    config = dict(
        sample_size=int(up["image_size"]), in_channels=int(up["in_channels"]), out_channels=int(up["out_channels"]),
        block_out_channels=chans, layers_per_block=nrb, down_block_types=down, up_block_types=upb,
        attention_head_dim=next(iter(head_dims.values())), norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if up.get("use_scale_shift_norm") else "default",
        downsample_type="resnet" if updown else "conv", upsample_type="resnet" if updown else "conv",
        flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, downsample_padding=1,
    )
    return config, ({} if uniform else heads)


def _width(name: str, chans: list[int], nrb: int) -> int:
    parts = name.split(".")
    if parts[0] == "mid_block":
        return chans[-1]
    i = int(parts[1])
    return chans[i] if parts[0] == "down_blocks" else list(reversed(chans))[i]


def _split_qkv(w: torch.Tensor, heads: int, legacy: bool) -> tuple[torch.Tensor, ...]:
    """openaimodel's fused qkv (conv1d, [3C, C(, 1)]) -> q, k, v ([C, C] / [C]).

    QKVAttentionLegacy reads channels per head as (q, k, v) blocks; QKVAttention as three (all-heads) thirds.
    """
    w = w.reshape(w.shape[0], -1) if w.dim() > 1 else w
    c3 = w.shape[0]
    d = c3 // (3 * heads)
    rest = w.shape[1:]
    grouped = w.reshape(heads, 3, d, *rest) if legacy else w.reshape(3, heads, d, *rest).transpose(0, 1)
    return tuple(grouped[:, j].reshape(heads * d, *rest).clone() for j in range(3))


def _resnet(sd: dict, old: str, new: str, out: dict) -> None:
    from diffusers.loaders.single_file_utils import update_unet_resnet_ldm_to_diffusers

    keys = [k for k in sd if k.startswith(old + ".")]
    tmp: dict = {}
    update_unet_resnet_ldm_to_diffusers(keys, tmp, sd, {"old": old, "new": new})
    out.update(tmp)


def _attention(sd: dict, old: str, new: str, heads: int, legacy: bool, out: dict) -> None:
    out[f"{new}.group_norm.weight"] = sd[f"{old}.norm.weight"]
    out[f"{new}.group_norm.bias"] = sd[f"{old}.norm.bias"]
    for part, w, b in zip(("to_q", "to_k", "to_v"), _split_qkv(sd[f"{old}.qkv.weight"], heads, legacy),
                          _split_qkv(sd[f"{old}.qkv.bias"], heads, legacy), strict=True):
        out[f"{new}.{part}.weight"], out[f"{new}.{part}.bias"] = w, b
    out[f"{new}.to_out.0.weight"] = sd[f"{old}.proj_out.weight"].reshape(sd[f"{old}.proj_out.weight"].shape[0], -1)
    out[f"{new}.to_out.0.bias"] = sd[f"{old}.proj_out.bias"]


def convert_unconditional_unet(sd: dict, up: dict, config: dict) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*`` (prefix removed) of an unconditional UNetModel -> ``UNet2DModel`` state dict."""
    chans, nrb = config["block_out_channels"], config["layers_per_block"]
    legacy = not up.get("use_new_attention_order", False)
    updown = config["downsample_type"] == "resnet"
    attn = ["Attn" in t for t in config["down_block_types"]]
    out: dict[str, torch.Tensor] = {
        "conv_in.weight": sd["input_blocks.0.0.weight"], "conv_in.bias": sd["input_blocks.0.0.bias"],
        "time_embedding.linear_1.weight": sd["time_embed.0.weight"],
        "time_embedding.linear_1.bias": sd["time_embed.0.bias"],
        "time_embedding.linear_2.weight": sd["time_embed.2.weight"],
        "time_embedding.linear_2.bias": sd["time_embed.2.bias"],
        "conv_norm_out.weight": sd["out.0.weight"], "conv_norm_out.bias": sd["out.0.bias"],
        "conv_out.weight": sd["out.2.weight"], "conv_out.bias": sd["out.2.bias"],
    }
    idx = 1
    for i, c in enumerate(chans):
        for r in range(nrb):
            _resnet(sd, f"input_blocks.{idx}.0", f"down_blocks.{i}.resnets.{r}", out)
            if attn[i]:
                _attention(sd, f"input_blocks.{idx}.1", f"down_blocks.{i}.attentions.{r}", _heads(c, up), legacy, out)
            idx += 1
        if i != len(chans) - 1:
            if updown:
                _resnet(sd, f"input_blocks.{idx}.0", f"down_blocks.{i}.downsamplers.0", out)
            else:
                for p in ("weight", "bias"):
                    out[f"down_blocks.{i}.downsamplers.0.conv.{p}"] = sd[f"input_blocks.{idx}.0.op.{p}"]
            idx += 1
    _resnet(sd, "middle_block.0", "mid_block.resnets.0", out)
    _attention(sd, "middle_block.1", "mid_block.attentions.0", _heads(chans[-1], up), legacy, out)
    _resnet(sd, "middle_block.2", "mid_block.resnets.1", out)
    idx = 0
    rchans, rattn = list(reversed(chans)), list(reversed(attn))
    for j, c in enumerate(rchans):
        for r in range(nrb + 1):
            _resnet(sd, f"output_blocks.{idx}.0", f"up_blocks.{j}.resnets.{r}", out)
            if rattn[j]:
                _attention(sd, f"output_blocks.{idx}.1", f"up_blocks.{j}.attentions.{r}",
                           _heads(c, up, upsample=True), legacy, out)
            if r == nrb and j != len(chans) - 1:
                k = 2 if rattn[j] else 1
                if updown:
                    _resnet(sd, f"output_blocks.{idx}.{k}", f"up_blocks.{j}.upsamplers.0", out)
                else:
                    for p in ("weight", "bias"):
                        out[f"up_blocks.{j}.upsamplers.0.conv.{p}"] = sd[f"output_blocks.{idx}.{k}.conv.{p}"]
            idx += 1
    return out


# ---- UNet: cross-attention UNetModel + ClassEmbedder -> UNet2DConditionModel -----------------------------------------

def crossattn_unet(cfg: dict, sd_full: dict, cfg_path: str) -> dict:
    """``UNet2DConditionModel`` kwargs through diffusers' ``create_unet_diffusers_config_from_ldm``."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    up = cfg["model"]["params"]["unet_config"]["params"]
    if not up.get("use_spatial_transformer") or up.get("context_dim") is None:
        raise ConvertError(f"{cfg_path}: a class-conditional (crossattn) model needs use_spatial_transformer and "
                           "context_dim in unet_config")
    if up.get("resblock_updown") or up.get("num_classes") is not None:
        raise ConvertError(f"{cfg_path}: resblock_updown / num_classes with cross-attention is not supported")
    chans, nrb, _ = _unet_common(up, cfg_path)
    filled = dict(up, transformer_depth=up.get("transformer_depth", 1), context_dim=up["context_dim"])
    if int(filled.get("num_heads", -1)) == -1:
        filled.pop("num_heads", None)
    original = {"model": {"params": {"unet_config": {"params": filled},
                                     "first_stage_config": cfg["model"]["params"]["first_stage_config"]}}}
    config = create_unet_diffusers_config_from_ldm(original, sd_full, image_size=None)
    config["sample_size"] = int(up["image_size"])
    if "num_heads" not in filled:  # heads from num_head_channels, per level
        config["attention_head_dim"] = [c // int(up["num_head_channels"]) for c in chans]
    if up.get("use_scale_shift_norm"):
        config["resnet_time_scale_shift"] = "scale_shift"
    return config


# ---- first stage ---------------------------------------------------------------------------------------------------

def first_stage(cfg: dict, sd_full: dict, cfg_path: str, scale: float) -> tuple[str, object]:
    """(``"vae"`` | ``"vqvae"``, the diffusers autoencoder with the converted weights)."""
    from diffusers import AutoencoderKL, VQModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    fs = _section(cfg["model"]["params"], "first_stage_config", cfg_path)
    p = fs.get("params", {})
    dd = p.get("ddconfig", {})
    if dd.get("attn_resolutions"):
        raise ConvertError(f"{cfg_path}: first stage attn_resolutions {dd['attn_resolutions']} is not supported "
                           "(diffusers' encoder/decoder have attention in the middle block only)")
    if any(k not in dd for k in ("ch", "ch_mult", "z_channels", "num_res_blocks", "in_channels", "out_ch")):
        raise ConvertError(f"{cfg_path}: first_stage_config.params.ddconfig is incomplete")
    original = {"model": {"params": {"first_stage_config": fs}}}
    config = create_vae_diffusers_config_from_ldm(original, sd_full, image_size=int(dd.get("resolution", 256)),
                                                  scaling_factor=scale)
    weights = convert_ldm_vae_checkpoint({k: v for k, v in sd_full.items() if k.startswith(FIRST_STAGE)}, config)
    if fs["target"] in KL_TARGETS:
        if not dd.get("double_z", True) or int(p.get("embed_dim", dd["z_channels"])) != int(dd["z_channels"]):
            raise ConvertError(f"{cfg_path}: KL first stage needs double_z and embed_dim == z_channels")
        model, name = AutoencoderKL(**config), "vae"
    elif fs["target"] in VQ_TARGETS:
        if p.get("remap") is not None:
            raise ConvertError(f"{cfg_path}: VQ codebook remapping (remap) is not supported")
        if "n_embed" not in p or "embed_dim" not in p:
            raise ConvertError(f"{cfg_path}: VQ first stage needs n_embed and embed_dim")
        vq = {k: v for k, v in config.items() if k != "scaling_factor"}
        model = VQModel(**vq, num_vq_embeddings=int(p["n_embed"]), vq_embed_dim=int(p["embed_dim"]),
                        scaling_factor=scale)
        name = "vqvae"
        code = f"{FIRST_STAGE}quantize.embedding.weight"
        if code in sd_full:
            weights["quantize.embedding.weight"] = sd_full[code]
    else:
        raise ConvertError(f"{cfg_path}: first stage {fs['target']} is not supported (AutoencoderKL, VQModelInterface)")
    _load_strict(model, weights, "first stage (first_stage_model.*)")
    return name, model


def _load_strict(module: torch.nn.Module, weights: dict, what: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    if missing or extra:
        example = (missing or extra)[0]
        raise ConvertError(f"checkpoint layout does not match the config for the {what}: {len(missing)} missing, "
                           f"{len(extra)} unexpected keys (e.g. {example})")
    bad = [k for k, v in weights.items() if v.shape != own[k].shape]
    if bad:
        raise ConvertError(f"checkpoint layout does not match the config for the {what}: {bad[0]} has shape "
                           f"{tuple(weights[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})


# ---- the whole model ----------------------------------------------------------------------------------------------

def _with_ema(sd: dict, ema: bool) -> tuple[dict, bool]:
    """Replace ``model.diffusion_model.*`` by the EMA copy (``model_ema.diffusion_model<name without dots>``)."""
    unet_keys = [k for k in sd if k.startswith(LDM_UNET)]
    ema_keys = {k: "model_ema." + "".join(k[len("model."):].split(".")) for k in unet_keys}
    present = [k for k, e in ema_keys.items() if e in sd]
    if not ema or not present:
        return sd, False
    if len(present) != len(unet_keys):
        missing = next(k for k, e in ema_keys.items() if e not in sd)
        raise ConvertError(f"the checkpoint's EMA weights are incomplete (no EMA copy of {missing}); pass --no-ema")
    out = dict(sd)
    for k, e in ema_keys.items():
        out[k] = sd[e]
    return out, True


def _latent_scale(params: dict, sd: dict) -> float:
    if "scale_factor" in sd:
        return float(sd["scale_factor"].reshape(-1)[0])
    return float(params.get("scale_factor", 1.0))


def build(ckpt: str | Path, config: str | Path, model: str | None = None, ema: bool = True) -> dict:
    """Everything :func:`convert` writes, in memory: ``{"unet", "scheduler", "vae"|"vqvae", ["class_embedder"],
    "record"}``. Raises :class:`ConvertError` on bad input."""
    from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel

    if model is not None and model not in ZOO_ARCH:
        raise ConvertError(f"--model {model!r} is not a CompVis zoo entry: use one of {', '.join(ZOO_ARCH)}")
    cfg = load_config(config)
    sd = load_checkpoint(ckpt)
    cfg_path = str(config)
    params = cfg["model"]["params"]
    unet_sec = _section(params, "unet_config", cfg_path)
    if unet_sec["target"] != UNET_TARGET:
        raise ConvertError(f"{cfg_path}: unet_config target {unet_sec['target']} is not supported ({UNET_TARGET})")
    up = unet_sec.get("params", {})
    if any(k not in up for k in ("image_size", "in_channels", "out_channels", "model_channels", "num_res_blocks")):
        raise ConvertError(f"{cfg_path}: unet_config.params is incomplete")
    cond_key = params.get("conditioning_key")
    cond_cfg = params.get("cond_stage_config")
    conditioning = "none"
    if cond_key is not None or (cond_cfg not in (None, "__is_unconditional__", "__is_first_stage__")):
        target = cond_cfg.get("target") if isinstance(cond_cfg, dict) else cond_cfg
        if cond_key != "crossattn" or target != CLASS_EMBEDDER:
            raise ConvertError(f"{cfg_path}: conditioning {cond_key!r} with {target} is not supported (unconditional, "
                               f"or crossattn with {CLASS_EMBEDDER})")
        conditioning = "class"
    sd, used_ema = _with_ema(sd, ema)
    scale = _latent_scale(params, sd)
    sched = scheduler_config(params, sd, cfg_path)

    ae_name, autoencoder = first_stage(cfg, sd, cfg_path, scale)
    if model is not None:
        want = ZOO_ARCH[model]
        have = ("kl" if ae_name == "vae" else "vq", conditioning)
        if have != want:
            raise ConvertError(f"{cfg_path} describes a {have[0].upper()} first stage, conditioning {have[1]!r}; "
                               f"{model} is {want[0].upper()}, conditioning {want[1]!r}")
    if int(up["in_channels"]) != autoencoder.config.latent_channels:
        raise ConvertError(f"{cfg_path}: unet in_channels {up['in_channels']} != the first stage's z_channels "
                           f"{autoencoder.config.latent_channels}")

    record: dict = {"source": "CompVis latent-diffusion", "checkpoint": str(Path(ckpt).name),
                    "config": str(Path(config).name), "model": model, "ema": used_ema, "latent_scale": scale,
                    "conditioning": conditioning, "attention_heads": {}}
    out: dict = {ae_name: autoencoder}
    unet_sd = {k[len(LDM_UNET):]: v for k, v in sd.items() if k.startswith(LDM_UNET)}
    if conditioning == "none":
        unet_config, heads = unconditional_unet(up, cfg_path)
        unet = UNet2DModel(**unet_config)
        try:
            weights = convert_unconditional_unet(unet_sd, up, unet_config)
        except KeyError as e:
            raise ConvertError(f"checkpoint layout does not match the config for the UNet: no key "
                               f"{LDM_UNET}{e.args[0]}") from None
        _apply_heads(unet, heads)
        record["attention_heads"] = heads
    else:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        unet_config = crossattn_unet(cfg, sd, cfg_path)
        unet = UNet2DConditionModel(**unet_config)
        try:
            weights = convert_ldm_unet_checkpoint(sd, unet_config)
        except KeyError as e:
            raise ConvertError(f"checkpoint layout does not match the config for the UNet: no key "
                               f"{e.args[0]}") from None
        cp = cond_cfg.get("params", {})
        n_classes, dim = int(cp.get("n_classes", 1000)), int(cp["embed_dim"])
        table = sd.get(f"{COND_STAGE}embedding.weight")
        if table is None or tuple(table.shape) != (n_classes, dim):
            raise ConvertError(f"checkpoint has no {COND_STAGE}embedding.weight of shape ({n_classes}, {dim})")
        if dim != unet_config["cross_attention_dim"]:
            raise ConvertError(f"{cfg_path}: ClassEmbedder embed_dim {dim} != unet context_dim "
                               f"{unet_config['cross_attention_dim']}")
        out["class_embedder"] = table.float().clone()
        record.update(num_classes=n_classes, null_class=n_classes - 1)  # ClassEmbedder: the last class is the null one
    _load_strict(unet, weights, f"UNet ({LDM_UNET}*)")
    out.update(unet=unet, scheduler=DDIMScheduler(**sched), record=record)
    return out


def _apply_heads(unet: torch.nn.Module, heads: dict[str, int]) -> None:
    from models.latent import apply_attention_heads

    apply_attention_heads(unet, heads)


def convert(ckpt: str | Path, config: str | Path, out: str | Path, model: str | None = None,
            ema: bool = True) -> Path:
    """Write the pipeline directory ``out`` (must not exist or be empty); nothing is written on bad input."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out} already exists and is not an empty directory")
    parts = build(ckpt, config, model, ema)
    tmp = out.parent / f".{out.name}.converting-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        parts["unet"].save_pretrained(tmp / "unet", safe_serialization=True)
        parts["scheduler"].save_pretrained(tmp / "scheduler")
        ae_name = "vae" if "vae" in parts else "vqvae"
        parts[ae_name].save_pretrained(tmp / ae_name, safe_serialization=True)
        index = {"_class_name": "LDMPipeline", "_diffusers_version": _diffusers_version(),
                 "unet": ["diffusers", type(parts["unet"]).__name__], "scheduler": ["diffusers", "DDIMScheduler"],
                 ae_name: ["diffusers", type(parts[ae_name]).__name__]}
        if ae_name == "vae" or "class_embedder" in parts:
            # Not a diffusers LDMPipeline (that one is VQ + UNet2DModel): dmqbench's loader reads the components.
            index["_class_name"] = "CompVisLatentDiffusion"
        if "class_embedder" in parts:
            table = parts["class_embedder"]
            (tmp / "class_embedder").mkdir()
            save_file({"weight": table.contiguous()}, str(tmp / "class_embedder" / "model.safetensors"))
            (tmp / "class_embedder" / "config.json").write_text(json.dumps(
                {"num_embeddings": table.shape[0], "embedding_dim": table.shape[1]}, indent=2) + "\n")
            index["class_embedder"] = ["dmqbench", "ClassEmbedding"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / RECORD).write_text(json.dumps(parts["record"], indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
