"""Model card of the embedded ``tiny-cifar10`` DDPM, rendered from its ``training.json`` and FP scores.

``python -m models.card`` rewrites ``models/assets/tiny-cifar10/README.md`` from the
training facts and from ``evaluation.json`` (FP metrics of the trained model and of a
random-init model of the same architecture, both under the smoke protocol).
"""

from __future__ import annotations

import json
from pathlib import Path

from models.registry import ASSETS

KEYS = ("fid/cifarnet", "sfid/cifarnet", "is/cifarnet", "kid/cifarnet", "clean_fid/cifarnet")


def render(asset_dir: Path) -> str:
    train = json.loads((asset_dir / "training.json").read_text())
    eval_path = asset_dir / "evaluation.json"
    evaluation = json.loads(eval_path.read_text()) if eval_path.exists() else {}
    cfg, data = train["config"], train["data"]
    lines = [
        "# tiny-cifar10: the embedded DDPM of dmqbench",
        "",
        "A small diffusers `UNet2DModel` trained by this project on CIFAR-10 so that `bench run` has a real,",
        "trained diffusion model to quantize offline, on a CPU. It is **not** the DDPM of the papers",
        "(`google/ddpm-cifar10-32`, 35.7 M parameters): its absolute scores are not comparable with published ones.",
        "",
        "## Recipe",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | UNet2DModel, block_out_channels {train['unet_config']['block_out_channels']}, "
        f"one layer per block, attention at 16x16, {train['parameters']:,} parameters |",
        "| noise schedule | DDPM linear betas 1e-4 -> 0.02, 1000 steps (the scheduler of google/ddpm-cifar10-32) |",
        "| objective | epsilon-prediction MSE, uniform t; random horizontal flips |",
        f"| optimiser | AdamW lr {cfg['lr']} (warm-up {cfg['warmup_steps']} steps), grad-norm clip 1.0, "
        f"batch {cfg['batch_size']}, seed {cfg['seed']} |",
        f"| EMA | decay {cfg['ema_decay']} (with the usual (1+n)/(10+n) warm-up); the EMA weights ship |",
        f"| data | {data['kind']} `{Path(data['path']).name}` ({data['num_images']} train images), "
        f"sha256 `{data['sha256']}` — real CIFAR-10 stored as JPEG quality 75 |",
        f"| steps | {train['steps']} ({train['steps'] * cfg['batch_size'] / data['num_images']:.2f} epochs) |",
        f"| hardware | {train['hardware']} (no GPU was available to this project's training session) |",
        f"| wall time | {train['wall_seconds']:.0f} s (budget {cfg['max_minutes']} min) |",
        f"| final training loss (EMA of batch losses) | {train['final_loss_ema']:.4f} |",
        "",
    ]
    segments = train.get("segments", [])
    if len(segments) > 1:
        lines += ["Trained in segments (each continued from the previous EMA weights with `--resume`):", "",
                  "| segment | steps | batch | wall s | hardware |", "|---|---|---|---|---|"]
        lines += [f"| {i + 1} | {g['steps']} | {g['batch_size']} | {g['wall_seconds']:.0f} | {g['hardware']} |"
                  for i, g in enumerate(segments)]
        lines.append("")
    lines += ["Reproduce (same data, same budgets; segment k > 1 adds `--resume`):", "", "```bash"]
    for i, g in enumerate(segments or [{"wall_seconds": cfg["max_minutes"] * 60, "batch_size": cfg["batch_size"]}]):
        threads = "1" if "1 threads" in g.get("hardware", "") else "2"
        lines.append(f"OMP_NUM_THREADS={threads} bench train model tiny-cifar10 --data {data['path']} "
                     f"--minutes {round(g['wall_seconds'] / 60)} --batch-size {g['batch_size']} --lr {cfg['lr']} "
                     f"--ema-decay {cfg['ema_decay']}" + (" --resume" if i else ""))
    lines += [
        "```",
        "",
        "The first segment ran while other jobs shared the 2-core machine, so its steps per minute are",
        "lower than an idle machine gives.",
        "",
        "Training is bounded by wall time, so the step count depends on the machine; on a GPU the same",
        "command trains far more steps in the same minutes (and should be given at least 20 minutes).",
        "",
    ]
    if evaluation:
        proto = evaluation.get("protocol", "smoke")
        lines += [
            f"## FP scores ({proto} protocol: {evaluation.get('num_samples')} samples, "
            f"{evaluation.get('steps')} DDIM steps, quad spacing, eta 0)",
            "",
            "Scored by the embedded `cifarnet` against CIFAR-10 **test**-split statistics; the random-init row is",
            "a model of the same architecture with untrained weights (`bench run --methods fp --models "
            "tiny-cifar10-random`).",
            "",
            "| model | " + " | ".join(f"`{k}`" for k in KEYS) + " |",
            "|---|" + "---|" * len(KEYS),
        ]
        for label, key in (("tiny-cifar10 (trained, EMA)", "trained"), ("same architecture, random init", "random")):
            m = evaluation.get(key, {})
            lines.append(f"| {label} | " + " | ".join(f"{m[k]:.4g}" if k in m else "n/a" for k in KEYS) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    asset = ASSETS / "tiny-cifar10"
    (asset / "README.md").write_text(render(asset))
    print(f"wrote {asset / 'README.md'}")
