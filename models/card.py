"""Model card of the embedded ``tiny-cifar10`` DDPM, rendered from its ``training.json`` and FP scores.

``python -m models.card`` rewrites ``models/assets/tiny-cifar10/README.md`` from the
training facts, from ``evaluation.json`` (FP metrics of the trained model and of a
random-init model of the same architecture, both under the smoke protocol) and from
``curve.json`` (the training curve: FP and RTN W4A8 scores of each training snapshot).
``python -m models.card --curve OUT [OUT ...]`` first rebuilds ``curve.json`` and
``training_curve.png`` from ``bench run --methods rtn --bits w4a8 --model-path SNAPSHOT --out OUT``
sweeps, one per snapshot.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from models.registry import ASSETS

KEYS = ("fid/cifarnet", "sfid/cifarnet", "is/cifarnet", "kid/cifarnet", "clean_fid/cifarnet")
CURVE_KEYS = ("fid/cifarnet", "kid/cifarnet", "fid_fp/cifarnet", "paired/psnr")


def segment_threads(segment: dict) -> int:
    """Threads a training segment ran on, from its hardware line (``CPU (x86_64, 2 threads)``); 1 if unsaid."""
    found = re.search(r"(\d+) threads?\b", segment.get("hardware", ""))
    return int(found.group(1)) if found else 1


def collect_curve(outs: list[Path]) -> dict:
    """``curve.json`` from sweeps of FP + RTN W4A8, one per snapshot (its step count from the snapshot's
    ``training.json``); metric values with their bootstrap intervals."""
    points, protocol = [], {}
    for out in outs:
        runs = {}
        for f in Path(out).glob("runs/*/*/results.json"):
            r = json.loads(f.read_text())
            if r.get("status") == "complete":
                runs[r["spec"]["method"]] = r
        fp, rtn = runs["fp"], runs["rtn"]
        train = json.loads((Path(fp["spec"]["model_path"]) / "training.json").read_text())
        spec = fp["spec"]
        protocol = {k: spec[k] for k in ("num_samples", "steps", "sampler", "spacing", "eta")}

        def pick(r):
            m = r["metrics"]
            return {k: [m[k], m.get(f"{k}_ci_low"), m.get(f"{k}_ci_high")] for k in CURVE_KEYS if k in m}

        # CPU time of the training so far (each segment's wall time x its threads): the curve's x in hours.
        cpu = sum(g["wall_seconds"] * segment_threads(g) for g in train.get("segments", []))
        points.append({"steps": train["steps"], "cpu_seconds": cpu or None, "fp": pick(fp), "rtn_w4a8": pick(rtn)})
    return {"protocol": protocol, "points": sorted(points, key=lambda p: p["steps"])}


def plot_curve(curve: dict, path: Path) -> None:
    """FP fid/kid, RTN W4A8 kid, and RTN's fidelity gap to FP against training steps (with intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = curve["points"]
    steps = [p["steps"] for p in pts]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = (("fid/cifarnet", "fid/cifarnet (data)"), ("kid/cifarnet", "kid/cifarnet (data)"),
              ("fid_fp/cifarnet", "RTN W4A8 fid_fp/cifarnet (gap to FP)"))
    for ax, (key, title) in zip(axes, panels):
        for row, label in (("fp", "FP"), ("rtn_w4a8", "RTN W4A8")):
            vals = [p[row].get(key) for p in pts]
            if key == "fid_fp/cifarnet" and row == "fp" or not all(vals):
                continue
            y = [v[0] for v in vals]
            lo = [v[1] if v[1] is not None else v[0] for v in vals]
            hi = [v[2] if v[2] is not None else v[0] for v in vals]
            ax.errorbar(steps, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                        marker="o", capsize=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training steps (batch 32)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve_lines(curve: dict, shipped_steps: int | None = None) -> list[str]:
    proto = curve["protocol"]

    def cell(v):
        if v is None:
            return "n/a"
        if v[1] is None or v[2] is None or not all(map(math.isfinite, v)):
            return f"{v[0]:.4g}"
        return f"{v[0]:.4g} [{v[1]:.4g}, {v[2]:.4g}]"

    lines = ["## Training curve", "",
             f"FP and RTN W4A8 of each training snapshot: {proto['num_samples']} samples, {proto['steps']} "
             f"{proto['sampler'].upper()} steps ({proto['spacing']} spacing, eta {proto['eta']}), `cifarnet` "
             "against CIFAR-10 test statistics; cells: value [95% bootstrap interval]; CPU h: training wall time "
             "x threads, summed over segments.", "",
             "![training curve](training_curve.png)", "",
             "| steps | CPU h | FP `fid` | FP `kid` | RTN W4A8 `fid` | RTN W4A8 `kid` | RTN W4A8 `fid_fp` "
             "| RTN W4A8 `paired/psnr` |",
             "|---|---|---|---|---|---|---|---|"]
    last = curve["points"][-1] if curve["points"] else None
    if last and shipped_steps is not None and last["steps"] > shipped_steps:
        lines[2:2] = [f"Training went on past the shipped checkpoint ({shipped_steps} steps) to {last['steps']} steps "
                      "(the same command with `--resume`); the later snapshots are scored here and were not "
                      "shipped (the one marked ships).",
                      ""]
    for p in curve["points"]:
        fp, q = p["fp"], p["rtn_w4a8"]
        steps = f"{p['steps']}" + (" (shipped)" if p["steps"] == shipped_steps else "")
        hours = f"{p['cpu_seconds'] / 3600:.2f}" if p.get("cpu_seconds") else "n/a"
        lines.append(f"| {steps} | {hours} | {cell(fp.get('fid/cifarnet'))} | {cell(fp.get('kid/cifarnet'))} | "
                     f"{cell(q.get('fid/cifarnet'))} | {cell(q.get('kid/cifarnet'))} | "
                     f"{cell(q.get('fid_fp/cifarnet'))} | {cell(q.get('paired/psnr'))} |")
    return [*lines, ""]


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
    lines += ["Reproduce (same data, same budgets; segment k > 1 adds `--resume`; `training.json` keeps only the "
              "last segment's `--lr`/`--ema-decay`, so earlier segments show those too: for tiny-cifar10, "
              "segments 1-2 used EMA 0.995):", "", "```bash"]
    for i, g in enumerate(segments or [{"wall_seconds": cfg["max_minutes"] * 60, "batch_size": cfg["batch_size"],
                                        "hardware": train.get("hardware", "")}]):
        lines.append(f"OMP_NUM_THREADS={segment_threads(g)} bench train model tiny-cifar10 --data {data['path']} "
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
    curve_path = asset_dir / "curve.json"
    if curve_path.exists():
        lines += _curve_lines(json.loads(curve_path.read_text()), shipped_steps=train["steps"])
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curve", nargs="+", type=Path, help="sweep OUT dirs, one per training snapshot")
    args = parser.parse_args()
    asset = ASSETS / "tiny-cifar10"
    if args.curve:
        curve = collect_curve(args.curve)
        (asset / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
        plot_curve(curve, asset / "training_curve.png")
    (asset / "README.md").write_text(render(asset))
    print(f"wrote {asset / 'README.md'}")
