"""Train the embedded ``tiny-cifar10`` DDPM: a small diffusers ``UNet2DModel``.

Recipe (Ho et al., 2020, Sec. 4 and App. B, scaled down): epsilon-prediction MSE, the
linear beta schedule of ``google/ddpm-cifar10-32`` (1e-4 -> 0.02 over 1000 steps),
random horizontal flips, AdamW with a short warm-up, and an EMA of the weights (the
EMA is what ships). The run is bounded by wall time *and* steps, seeded, and saves
a complete diffusers pipeline directory every few minutes, so an interrupted run
still leaves a usable model behind.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from tqdm import tqdm

from models.cifar10 import load_cifar10
from models.registry import TINY_UNET_CONFIG

# The scheduler of google/ddpm-cifar10-32 (docs/protocols.md, "Schedulers").
DDPM_CIFAR10_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    clip_sample=True,
    variance_type="fixed_large",
)


@dataclass
class UNetTrainConfig:
    data: str
    out: str
    seed: int = 0
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 200
    max_steps: int = 200_000
    max_minutes: float = 20.0
    ema_decay: float = 0.999
    save_every_minutes: float = 5.0
    cache_dir: str | None = None
    resume: bool = False  # continue from the EMA weights already in ``out`` (fresh optimiser, warm-up skipped)


def _save(ema: UNet2DModel, out: Path, card: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out / "unet", safe_serialization=True)
    DDPMScheduler(**DDPM_CIFAR10_SCHEDULER).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]},
            indent=2,
        )
    )
    (out / "training.json").write_text(json.dumps(card, indent=2))


def train_tiny_unet(cfg: UNetTrainConfig, log=None) -> dict:
    """Train and save; returns the training facts (also written to ``training.json``)."""
    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x_train, _, source = load_cifar10(cfg.data, "train", cache_dir=cfg.cache_dir)
    model = UNet2DModel(**TINY_UNET_CONFIG).to(device)
    prior = {"steps": 0, "wall_seconds": 0.0, "segments": []}
    if cfg.resume and (Path(cfg.out) / "training.json").exists():
        # A wall-time-bounded run continued: start from the shipped EMA weights; steps and time add up.
        model = UNet2DModel.from_pretrained(Path(cfg.out) / "unet").to(device)
        prior = json.loads((Path(cfg.out) / "training.json").read_text())
        prior.setdefault("segments", [{"steps": prior["steps"], "wall_seconds": prior["wall_seconds"],
                                       "hardware": prior["hardware"], "batch_size": prior["config"]["batch_size"]}])
        torch.manual_seed(cfg.seed + prior["steps"])
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sched = DDPMScheduler(**DDPM_CIFAR10_SCHEDULER)
    alphas_cumprod = sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_at = lambda s: cfg.lr * min(1.0, (s + 1 + prior["steps"]) / cfg.warmup_steps)  # noqa: E731
    gen = torch.Generator().manual_seed(cfg.seed + prior["steps"])
    n_params = sum(p.numel() for p in model.parameters())
    on_gpu = device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    start = time.time()
    last_save = start
    step = 0
    loss_ema = math.nan
    bar = tqdm(total=cfg.max_steps, desc="train tiny-cifar10", unit="step")
    card: dict = {}
    while step < cfg.max_steps and (time.time() - start) < cfg.max_minutes * 60:
        idx = torch.randint(0, len(x_train), (cfg.batch_size,), generator=gen)
        x0 = x_train[idx].float().div(127.5).sub(1.0)
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
        x0[flip] = x0[flip].flip(-1)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, t, noise = x0.to(device), t.to(device), noise.to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast:
            pred = model(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA warm-up (as in many DDPM ports): early on the EMA tracks faster.
        decay = min(cfg.ema_decay, (1 + step + prior["steps"]) / (10 + step + prior["steps"]))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        step += 1
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.98 * loss_ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if log is not None and step % 50 == 0:
            log({"loss": loss_ema}, step)
        if time.time() - last_save > cfg.save_every_minutes * 60:
            card = _card(cfg, source.to_dict(), step, time.time() - start, n_params, device, loss_ema, prior)
            _save(ema, Path(cfg.out), card)
            last_save = time.time()
    bar.close()
    card = _card(cfg, source.to_dict(), step, time.time() - start, n_params, device, loss_ema, prior)
    _save(ema, Path(cfg.out), card)
    return card


def _card(cfg, source, step, seconds, n_params, device, loss, prior) -> dict:
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    hw = torch.cuda.get_device_name(0) if device == "cuda" else cpu
    return {
        "model": "tiny-cifar10",
        "config": asdict(cfg),
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_UNET_CONFIG.items()},
        "scheduler": DDPM_CIFAR10_SCHEDULER,
        "parameters": n_params,
        "steps": prior["steps"] + step,
        "wall_seconds": round(prior["wall_seconds"] + seconds, 1),
        "segments": prior.get("segments", []) + [{"steps": step, "wall_seconds": round(seconds, 1), "hardware": hw,
                                                  "batch_size": cfg.batch_size}],
        "hardware": hw,
        "final_loss_ema": loss,
        "data": source,
        "torch": torch.__version__,
    }
