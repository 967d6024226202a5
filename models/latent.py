"""Latent and conditional pipelines for :func:`models.loading.load_model`.

What this adds to a plain pixel-space UNet:

* ``LoadedModel.decode``: latents -> images in [-1, 1] through the pipeline's VQ or KL
  autoencoder, in full precision (methods only ever receive ``denoiser.unet``, so the
  autoencoder and the text encoder are never quantized). ``z / latent_scale`` is decoded:
  VQ LDMs use 1.0 (as ``LDMPipeline``, and the VQ decoder snaps latents to the codebook),
  KL ones their ``scale_factor`` (SD 0.18215, LDM-8 church 0.22765929).
* text conditioning: ``LoadedModel.extra["cond_fn"](seeds)`` returns the FP text-encoder
  embeddings ``[B, L, D]`` of the captions of those images; the caption of image ``i`` of
  a seed domain (``seed mod EVAL_SEED_STRIDE``) is line ``i mod N`` of the caption file.
  The empty-prompt embedding is ``Denoiser.uncond`` for classifier-free guidance.
* class-conditional CFG: labels are drawn from the real classes only, and the null class
  (``EXTRAS[name]["null_class"]``, else the last embedding) is ``Denoiser.uncond``.
* the ``miniature`` source kind: random-init networks built from :func:`models.zoo.miniature`
  (seeded, so every process builds the same network).
* directories written by ``bench convert compvis`` (:mod:`models.convert_compvis`, marked by
  ``compvis.json``): :func:`load_compvis_dir` reads the components, applies the recorded
  attention heads and latent scale, and wraps a class-conditional cross-attention UNet
  (cin256) as :class:`ClassConditionedUNet`, whose class embedding feeds the cross-attention.

With guidance the Denoiser runs (uncond, cond) as one UNet batch inside the sampler's one
timestep context, so both halves see the same per-step quantizer parameters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel, VQModel
from torch import nn

from models.denoiser import Denoiser
from models.loading import LoadedModel, ModelLoadError
from models.registry import ModelSpec

CAPTIONS_ENV = "DMQBENCH_CAPTIONS"
EVAL_SEED_STRIDE = 10_000_000  # harness.calibration.EVAL_SEED_STRIDE (kept here: models must not import harness)
DECODE_BATCH = 16


def _extras(spec: ModelSpec) -> dict:
    from models.zoo import EXTRAS

    key = spec.location if spec.source == "miniature" else spec.name
    return EXTRAS.get(key, {})


def is_latent_dir(path: str | Path) -> bool:
    """True for a diffusers pipeline directory with an autoencoder or a text encoder."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    keys = set(json.loads(index.read_text()))
    return bool(keys & {"vqvae", "vae", "text_encoder"})


def needs_latent_loader(spec: ModelSpec, model_path: str | None) -> bool:
    if spec.source == "miniature" or spec.pipeline == "latent" or spec.conditioning == "text":
        return True
    location = model_path or (spec.location if spec.source == "local" else "")
    return bool(location) and is_latent_dir(location)


# ---- text ------------------------------------------------------------------------------------------------------

class ByteTokenizer:
    """Tokenizer-free ids for the miniature text encoder: ``[bos] + utf-8 bytes + [eos] + pad``."""

    def __init__(self, max_length: int, bos: int, eos: int, pad: int) -> None:
        self.model_max_length, self.bos, self.eos, self.pad = max_length, bos, eos, pad

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        rows = []
        for c in captions:
            ids = [self.bos, *list(c.encode("utf-8"))[: self.model_max_length - 2], self.eos]
            rows.append(ids + [self.pad] * (self.model_max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class TinyTextEncoder(nn.Module):
    """A CLIP-like causal text transformer, used for the SD miniature only when transformers is absent."""

    def __init__(self, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 num_attention_heads: int, max_position_embeddings: int, **_) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_position_embeddings, hidden_size)
        layer = nn.TransformerEncoderLayer(hidden_size, num_attention_heads, intermediate_size, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_hidden_layers, enable_nested_tensor=False)
        self.final_layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        n = input_ids.shape[1]
        h = self.token_embedding(input_ids) + self.position_embedding(torch.arange(n, device=input_ids.device))
        mask = torch.triu(torch.full((n, n), float("-inf"), device=input_ids.device), 1)
        return (self.final_layer_norm(self.encoder(h, mask=mask)),)


def _tiny_text_encoder(cfg: dict) -> nn.Module:
    try:
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError:
        return TinyTextEncoder(**cfg)
    return CLIPTextModel(CLIPTextConfig(**cfg))


def _hf_tokenize(tokenizer) -> Callable[[Sequence[str]], torch.Tensor]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer
    return lambda captions: tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                                      truncation=True, return_tensors="pt").input_ids


def read_captions(path: str | Path) -> list[str]:
    """The non-blank lines of a caption file (stripped), in order; a one-line :class:`ModelLoadError` if none."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"caption file {p} not found: write one caption per line (e.g. the 30k COCO val2014 "
                             "captions, docs/zoo.md) and pass --captions FILE")
    try:
        captions = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"caption file {p} cannot be read as UTF-8 text ({type(e).__name__}): "
                             "pass --captions FILE with one caption per line") from None
    if not captions:
        raise ModelLoadError(f"caption file {p} has no captions: pass --captions FILE with one caption per line")
    return captions


class TextConditioner:
    """``cond_fn(seeds)``: FP text embeddings of each image's caption (cached per caption)."""

    def __init__(self, text_encoder: nn.Module, tokenize: Callable, captions: list[str],
                 device: str | torch.device, batch_size: int = 64) -> None:
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.tokenize, self.captions, self.device, self.batch_size = tokenize, captions, device, batch_size
        self._cache: dict[str, torch.Tensor] = {}

    def caption(self, seed: int) -> str:
        return self.captions[(int(seed) % EVAL_SEED_STRIDE) % len(self.captions)]

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for b in range(0, len(missing), self.batch_size):
            chunk = missing[b : b + self.batch_size]
            ids = self.tokenize(chunk).to(self.device)
            hidden = self.text_encoder(ids)[0].float().cpu()
            self._cache.update(zip(chunk, hidden))
        return torch.stack([self._cache[t] for t in texts])

    def __call__(self, seeds: Sequence[int]) -> torch.Tensor:
        return self.embed([self.caption(s) for s in seeds])


# ---- decoding --------------------------------------------------------------------------------------------------

def make_decode(autoencoder: nn.Module, latent_scale: float, batch_size: int = DECODE_BATCH):
    """latents -> images in [-1, 1], through the full-precision autoencoder, in chunks."""
    autoencoder = autoencoder.eval().requires_grad_(False)

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        p = next(autoencoder.parameters())
        z = z.to(device=p.device, dtype=p.dtype) / latent_scale
        return torch.cat([autoencoder.decode(c).sample.float() for c in z.split(batch_size)])

    decode.autoencoder = autoencoder  # for callers that need to move or inspect it
    return decode


# ---- converted CompVis directories (bench convert compvis) --------------------------------------------------

COMPVIS_RECORD = "compvis.json"


class ClassConditionedUNet(UNet2DConditionModel):
    """A ``UNet2DConditionModel`` conditioned on a class through cross-attention, as CompVis ``cin256``.

    ``class_embedder`` (``nn.Embedding(n_classes, cross_attention_dim)``, attached after loading) maps a
    label to a length-1 context: ``forward(x, t, class_labels=y)`` runs the UNet with
    ``encoder_hidden_states = class_embedder(y)[:, None]``. Module names are those of the plain UNet
    (``conv_in``, ``down_blocks...``), so quantization scopes apply unchanged; the embedding table is not
    a Conv2d/Linear, so it stays in full precision like CompVis' ``cond_stage_model``.
    """

    class_embedder: nn.Embedding

    def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None, **kwargs):
        if encoder_hidden_states is None:
            if class_labels is None:
                raise ValueError("ClassConditionedUNet needs class_labels (or encoder_hidden_states)")
            encoder_hidden_states = self.class_embedder(class_labels.to(sample.device).long())[:, None, :]
            encoder_hidden_states = encoder_hidden_states.to(sample.dtype)
        return super().forward(sample, timestep, encoder_hidden_states, **kwargs)


def apply_attention_heads(unet: nn.Module, heads: dict[str, int]) -> None:
    """Set the head count of self-attention layers whose head width differs per level (see convert_compvis)."""
    for name, n in heads.items():
        attn = unet.get_submodule(name)
        if attn.inner_dim % int(n):
            raise ModelLoadError(f"{name}: {attn.inner_dim} channels do not split into {n} heads")
        attn.heads = attn.sliceable_head_dim = int(n)
        attn.scale = (attn.inner_dim // int(n)) ** -0.5


def compvis_record(location: str | Path) -> dict | None:
    """The conversion record of a ``bench convert compvis`` directory, else None."""
    p = Path(location) / COMPVIS_RECORD
    return json.loads(p.read_text()) if p.is_file() else None


def load_compvis_dir(location: str | Path) -> tuple[nn.Module, DDPMScheduler, dict, dict]:
    """(unet, scheduler, components, record) of a directory written by ``bench convert compvis``."""
    from diffusers import DDIMScheduler
    from safetensors.torch import load_file

    path = Path(location)
    record = compvis_record(path)
    kw = dict(local_files_only=True, low_cpu_mem_usage=False)
    components: dict = {}
    try:
        if (path / "class_embedder").is_dir():
            unet = ClassConditionedUNet.from_pretrained(path / "unet", **kw)
            cfg = json.loads((path / "class_embedder" / "config.json").read_text())
            table = nn.Embedding(int(cfg["num_embeddings"]), int(cfg["embedding_dim"]))
            table.load_state_dict(load_file(str(path / "class_embedder" / "model.safetensors")))
            unet.class_embedder = table
        elif json.loads((path / "unet" / "config.json").read_text()).get("_class_name") == "UNet2DConditionModel":
            raise ModelLoadError(f"{path}: a cross-attention UNet without class_embedder/ is not a CompVis class model")
        else:
            unet = UNet2DModel.from_pretrained(path / "unet", **kw)
        apply_attention_heads(unet, record.get("attention_heads") or {})
        if (path / "vqvae").is_dir():
            components["vqvae"] = VQModel.from_pretrained(path / "vqvae", **kw)
        elif (path / "vae").is_dir():
            components["vae"] = AutoencoderKL.from_pretrained(path / "vae", **kw)
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load the converted CompVis directory {path} ({type(e).__name__}: "
                             f"{str(e)[:200]}); re-run bench convert compvis") from None
    return unet, scheduler, components, record


# ---- building ----------------------------------------------------------------------------------------------------

def build_miniature(spec: ModelSpec) -> tuple[nn.Module, DDPMScheduler, dict]:
    """Random-init UNet (+ autoencoder, + text encoder) of a zoo entry's miniature config, seeded."""
    from models.zoo import miniature

    cfg = miniature(spec.location or spec.name)
    torch.manual_seed(0)  # the miniature is the same network in every process
    unet_cls = UNet2DConditionModel if cfg["unet_class"] == "UNet2DConditionModel" else UNet2DModel
    unet = unet_cls(**cfg["unet"])
    components: dict = {}
    if "vq" in cfg:
        components["vqvae"] = VQModel(**cfg["vq"])
    if "kl" in cfg:
        components["vae"] = AutoencoderKL(**cfg["kl"], scaling_factor=cfg["latent_scale"])
    if "text_encoder" in cfg:
        te = cfg["text_encoder"]
        components["text_encoder"] = _tiny_text_encoder(te)
        components["tokenizer"] = ByteTokenizer(te["max_position_embeddings"], te["bos_token_id"],
                                                te["eos_token_id"], te["pad_token_id"])
        components["captions"] = list(cfg["captions"])
    return unet, DDPMScheduler(**cfg["scheduler"]), components


def _from_pretrained(spec: ModelSpec, location: str) -> tuple[nn.Module, object, dict]:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    local = Path(location).exists()
    try:
        pipe = DiffusionPipeline.from_pretrained(location, local_files_only=local)
    except (OSError, ValueError, ImportError) as e:
        where = "a local diffusers directory" if local else "not in the Hugging Face cache and the hub is unreachable"
        raise ModelLoadError(
            f"cannot load {location!r} ({type(e).__name__}: {str(e)[:200]}); it is {where}. Download it where you "
            "have network, or pass --model-path DIR (a diffusers pipeline directory; docs/zoo.md shows how to convert "
            "the CompVis checkpoints)"
        ) from None
    comps = dict(pipe.components)
    return comps.pop("unet"), comps.pop("scheduler", None), comps


def _scheduler(scheduler, spec: ModelSpec) -> DDPMScheduler:
    if scheduler is None:
        fallback = _extras(spec).get("scheduler")
        if fallback is None:
            raise ModelLoadError(f"{spec.name}: the pipeline has no scheduler and the zoo knows no schedule for it")
        return DDPMScheduler(**fallback)
    return scheduler if isinstance(scheduler, DDPMScheduler) else DDPMScheduler.from_config(scheduler.config)


def load_latent_model(spec: ModelSpec, model_path: str | None = None,
                      device: str | torch.device = "cpu", captions: str | None = None) -> LoadedModel:
    """``load_model`` for miniatures, latent pipelines and text-conditioned models.

    A text-conditioned model's prompts come from ``captions`` (a file, one caption per line), else
    ``$DMQBENCH_CAPTIONS``, else a miniature's built-in prompts, else the zoo's default file."""
    if spec.source == "miniature":
        unet, scheduler, components = build_miniature(spec)
        record = None
    else:
        location = model_path or spec.location
        if not location:
            raise ModelLoadError(f"{spec.name} has no public diffusers weights: convert the CompVis checkpoint "
                                 "(docs/zoo.md) and pass --model-path DIR")
        record = compvis_record(location) if Path(location).is_dir() else None
        if record is not None:
            unet, scheduler, components, record = load_compvis_dir(location)
        else:
            unet, scheduler, components = _from_pretrained(spec, location)
    scheduler = _scheduler(scheduler, spec)
    extras = _extras(spec)
    unet = unet.to(device).eval().requires_grad_(False)
    cfg = unet.config

    # Autoencoder (full precision, never handed to a method).
    decode = None
    autoencoder = components.get("vqvae") or components.get("vae")
    if autoencoder is not None:
        autoencoder = autoencoder.to(device)
        if record is not None:  # the converted checkpoint's own scale_factor
            scale = float(record["latent_scale"])
        elif isinstance(autoencoder, VQModel):
            scale = float(extras.get("latent_scale", 1.0))
        else:
            scale = float(extras.get("latent_scale", autoencoder.config.scaling_factor))
        decode = make_decode(autoencoder, scale)

    # Conditioning.
    num_embeds = getattr(cfg, "num_class_embeds", None)
    if isinstance(unet, ClassConditionedUNet):
        num_embeds = unet.class_embedder.num_embeddings
    conditioning = "class" if num_embeds else ("text" if components.get("text_encoder") is not None
                                               else spec.conditioning)
    denoiser = Denoiser(unet, conditioning=conditioning, guidance_scale=spec.guidance_scale,
                        out_channels=cfg.in_channels)
    num_classes = None
    extra: dict = {k: v for k, v in components.items() if k not in ("vqvae", "vae", "captions")}
    if autoencoder is not None:
        extra["autoencoder"] = autoencoder
    if conditioning == "class":
        null = extras.get("null_class", (record or {}).get("null_class"))
        if null is None and spec.guidance_scale != 1.0:
            null = num_embeds - 1  # convention: the last embedding is the null class
        if null is not None and null < num_embeds:
            num_classes = int(null)  # labels are drawn from the real classes 0..null-1
            denoiser.uncond = torch.tensor([int(null)], device=device)
        else:
            num_classes = int(num_embeds)
    elif conditioning == "text":
        text_encoder, tokenizer = components.get("text_encoder"), components.get("tokenizer")
        if text_encoder is None or tokenizer is None:
            raise ModelLoadError(f"{spec.name}: a text-conditioned pipeline needs text_encoder and tokenizer")
        path = captions or os.environ.get(CAPTIONS_ENV)
        prompts = components.get("captions")  # a miniature's built-in prompts
        if path or prompts is None:
            prompts = read_captions(path or extras.get("captions", "captions.txt"))
        cond = TextConditioner(text_encoder, _hf_tokenize(tokenizer), prompts, device)
        denoiser.uncond = cond.embed([""]).to(device)  # [1, L, D]
        extra.update(cond_fn=cond, captions=prompts)

    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return LoadedModel(spec, denoiser, scheduler, (cfg.in_channels, size, size), num_classes, decode, extra)
