"""CLIP score of text-to-image samples against their own captions, from a local CLIP directory.

``clip_score/<dir-name>`` is the mean over images of ``100 * max(cos(E_I(x_i), E_T(c_i)), 0)``, where
``E_I``/``E_T`` are the projected image/text embeddings of a ``transformers`` ``CLIPModel`` and ``c_i`` is
the caption image ``i`` was sampled from (CLIPScore, Hessel et al. 2021, with the 100 scale torchmetrics
and the quantization papers use; the clamp is per image). Higher is better. The key names the directory
(``--clip-model ~/clip-vit-large-patch14`` gives ``clip_score/clip-vit-large-patch14``): scores of two
CLIP models are not comparable.

The directory is what ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained`` write (a snapshot
of ``openai/clip-vit-large-patch14`` from the hub has that layout); it is read with
``local_files_only=True``, so nothing is downloaded. torchmetrics' ``CLIPScore`` is not used: its 1.9
release reads ``get_image_features`` as a tensor, which transformers 5 no longer returns, and it
clamps the mean rather than each image.

The interval is the bootstrap over images of the per-image mean (the resamples of every other metric,
:mod:`harness.metrics.bootstrap`), so two runs' CLIP scores can be compared with the paired test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from harness.metrics.errors import MetricSetupError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def clip_key(clip_dir: str | Path) -> str:
    """``clip_score/<name of the directory>``."""
    name = Path(clip_dir).expanduser().resolve().name or "clip"
    return f"clip_score/{name}"


def _quiet_transformers():
    try:
        import transformers
    except ImportError:
        raise MetricSetupError("--clip-model needs the transformers package: pip install 'dmqbench[text]' "
                               "(or pip install transformers)") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def check_clip_model(clip_dir: str | Path) -> None:
    """Plan-time check of ``--clip-model DIR``: a saved CLIP model with its weights, tokenizer and image
    processor, readable offline. Raises a one-line :class:`MetricSetupError`; the weights are not read."""
    p = Path(clip_dir).expanduser()
    fix = ("pass --clip-model DIR, a directory written by CLIPModel.save_pretrained and "
           "CLIPProcessor.save_pretrained (e.g. a snapshot of openai/clip-vit-large-patch14)")
    if not p.is_dir():
        raise MetricSetupError(f"--clip-model {p}: no such directory: {fix}")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise MetricSetupError(f"--clip-model {p}: no readable config.json ({type(e).__name__}): {fix}") from None
    if cfg.get("model_type") != "clip":
        raise MetricSetupError(f"--clip-model {p}: config.json is a {cfg.get('model_type')!r} model, not 'clip': {fix}")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise MetricSetupError(f"--clip-model {p}: no weights ({' or '.join(WEIGHT_FILES[::2])}): {fix}")
    transformers = _quiet_transformers()
    try:
        transformers.CLIPProcessor.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # missing tokenizer/processor files raise OSError, ValueError, TypeError...
        raise MetricSetupError(f"--clip-model {p}: its tokenizer or image processor does not load offline "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:160]}): {fix}") from None


def load_clip(clip_dir: str | Path, device: str | torch.device = "cpu"):
    """``(model, processor)`` from a local directory, offline, in eval mode on ``device``."""
    check_clip_model(clip_dir)
    transformers = _quiet_transformers()
    p = str(Path(clip_dir).expanduser())
    model = transformers.CLIPModel.from_pretrained(p, local_files_only=True).to(device).eval().requires_grad_(False)
    return model, transformers.CLIPProcessor.from_pretrained(p, local_files_only=True)


@torch.no_grad()
def clip_scores(images: np.ndarray, captions: list[str], model, processor, device: str | torch.device = "cpu",
                batch_size: int = 64) -> np.ndarray:
    """Per-image ``100 * max(cos(image, caption), 0)`` of uint8 ``images`` ``[N, 3, H, W]`` and ``captions`` ``[N]``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, 3, H, W]; got {images.dtype} {images.shape}")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    max_len = min(int(processor.tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
    out = []
    for b in range(0, len(images), batch_size):
        chunk = [im.transpose(1, 2, 0) for im in images[b : b + batch_size]]  # HWC, as PIL would give
        inputs = processor(text=list(captions[b : b + batch_size]), images=chunk, return_tensors="pt",
                           padding=True, truncation=True, max_length=max_len)
        res = model(**{k: v.to(device) for k, v in inputs.items()})
        cos = torch.nn.functional.cosine_similarity(res.image_embeds.float(), res.text_embeds.float(), dim=-1)
        out.append((100.0 * cos.clamp(min=0)).cpu().double().numpy())
    return np.concatenate(out)


def clip_score_metrics(images: np.ndarray, captions: list[str], clip_dir: str | Path,
                       device: str | torch.device = "cpu", replicates: dict | None = None) -> dict[str, float]:
    """``{clip_score/<dir>: mean, + its 95% interval}``; the bootstrap replicates go into ``replicates``."""
    from harness.metrics.bootstrap import add_interval, mean_replicates, resample_weights
    from harness.metrics.registry import CHEAP_RESAMPLES

    model, processor = load_clip(clip_dir, device)
    per_image = clip_scores(images, captions, model, processor, device)
    key = clip_key(clip_dir)
    metrics = {key: float(per_image.mean())}
    if len(per_image) >= 2:
        reps = mean_replicates(per_image, resample_weights(len(per_image), CHEAP_RESAMPLES))
        add_interval(metrics, replicates if replicates is not None else {}, key, metrics[key], reps)
    return metrics
