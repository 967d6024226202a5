"""Train :class:`models.cifarnet.CifarNet` on CIFAR-10 within a wall-clock budget and ship it.

Recipe (airbench-style, sized for a CPU):

* 45k training images; a seeded 5k slice of the **train** split is held out for the softmax
  temperature fit (the test split is only used for the final accuracy);
* whitening filters from the 2x2 patch covariance of 5k of the training images;
* random horizontal flip + random translation by up to 2 px (reflect padding);
* cross-entropy with label smoothing 0.2; SGD with Nesterov momentum 0.9, weight decay 5e-4
  on conv/linear weights only; one-cycle schedule (linear warm-up for 15% of the steps, then
  linear decay to zero);
* the number of steps is fitted to ``max_minutes`` from a timing of a few real steps, and
  shortened during training if the machine slows down (so the schedule still anneals before the
  deadline), unless ``steps`` is given (pass the card's ``steps`` to repeat a run's schedule);
* temperature ``T`` minimising the NLL of ``softmax(logits / T)`` on the held-out 5k (scipy).

Writes ``model.safetensors``, ``config.json`` and the model card ``README.md`` into ``out``.
Reproduce with ``bench train extractor cifarnet --data PATH --minutes M``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.cifar10 import load_cifar10, sha256_file
from models.cifarnet import DEFAULT_CONFIG, CifarNet, num_params

HOLDOUT = 5000
LABEL_SMOOTHING = 0.2
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WARMUP_FRAC = 0.15
TRANSLATE = 2


def _augment(x_pad: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of reflect-padded uint8 images ``x_pad[idx]`` plus random h-flips."""
    n = idx.numel()
    span = 2 * TRANSLATE + 1
    dx = torch.randint(0, span, (n,), generator=gen)
    dy = torch.randint(0, span, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty((n, 3, 32, 32), dtype=x_pad.dtype)
    for j in range(n):
        crop = x_pad[idx[j], :, dy[j] : dy[j] + 32, dx[j] : dx[j] + 32]
        out[j] = crop.flip(-1) if flip[j] else crop
    return out


@torch.no_grad()
def _logits(
    model: CifarNet, x_uint8: torch.Tensor, device: torch.device, bs: int = 500, flip: bool = False
) -> torch.Tensor:
    """Logits of ``x_uint8`` (of its mirror images when ``flip``; their mean is the flip-TTA figure)."""
    model.eval()
    outs = []
    for i in range(0, len(x_uint8), bs):
        xb = model.normalize(x_uint8[i : i + bs].to(device))
        if flip:
            xb = xb.flip(-1)
        if device.type == "cpu":
            xb = xb.contiguous(memory_format=torch.channels_last)
        outs.append(model(xb).float().cpu())
    return torch.cat(outs)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature ``T`` minimising the mean NLL of ``softmax(logits / T)`` (bounded scalar search on log T)."""
    from scipy.optimize import minimize_scalar

    z = logits.double()
    y = labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    res = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(res.x))


def _param_groups(model: CifarNet) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
        del name
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_at(step: int, total: int, peak: float, warm: int) -> float:
    if step < warm:
        return peak * (0.1 + 0.9 * step / warm)
    return peak * max(0.0, (total - step) / max(1, total - warm))


def train_cifarnet(
    data: str,
    out: str = "models/assets/cifarnet",
    seed: int = 0,
    max_minutes: float = 25.0,
    cache_dir: str | None = None,
    log: Callable[[dict, int], None] | None = None,
    *,
    steps: int | None = None,
    widths: tuple[int, int, int] | list[int] = (64, 256, 256),
    batch_size: int = 256,
    lr: float = 0.2,
    threads: int | None = None,
    device: str | None = None,
) -> dict:
    """Train CifarNet on ``data`` (a CIFAR-10 source for :func:`load_cifar10`) and write it to ``out``.

    ``max_minutes`` bounds the whole call (load + train + evaluation); the step count is sized
    from a timing of a few steps unless ``steps`` is given. ``log(metrics, step)`` is called
    periodically (e.g. an MLflow logger). Returns the summary written to ``config.json``.
    """
    t_start = time.time()
    if threads is not None:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)

    x_all, y_all, src_train = load_cifar10(data, "train", cache_dir=cache_dir)
    x_test, y_test, src_test = load_cifar10(data, "test", cache_dir=cache_dir)
    perm = torch.randperm(len(x_all), generator=gen)
    hold_idx, train_idx = perm[:HOLDOUT], perm[HOLDOUT:]
    x_tr, y_tr = x_all[train_idx], y_all[train_idx]
    x_ho, y_ho = x_all[hold_idx], y_all[hold_idx]
    x_pad = torch.from_numpy(
        np.pad(x_tr.numpy(), ((0, 0), (0, 0), (TRANSLATE, TRANSLATE), (TRANSLATE, TRANSLATE)), mode="reflect")
    )

    arch = dict(DEFAULT_CONFIG, widths=[int(w) for w in widths])
    model = CifarNet(**arch)
    model.init_whitening(x_tr[:5000])  # 5k images are plenty for a 12x12 patch covariance
    model = model.to(dev)
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(_param_groups(model), lr=lr, momentum=MOMENTUM, nesterov=True)
    n_train = len(x_tr)
    steps_per_epoch = n_train // batch_size

    def batches():
        while True:
            order = torch.randperm(n_train, generator=gen)
            for i in range(steps_per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                yield _augment(x_pad, idx, gen), y_tr[idx]

    def step_fn(m: CifarNet, o: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor) -> tuple[float, float]:
        m.train()
        xin = m.normalize(xb.to(dev))
        if dev.type == "cpu":
            xin = xin.contiguous(memory_format=torch.channels_last)
        out_ = m(xin)
        loss = F.cross_entropy(out_, yb.to(dev), label_smoothing=LABEL_SMOOTHING)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()
        return float(loss.detach()), float((out_.detach().argmax(1) == yb.to(dev)).float().mean())

    # Eval reserve: logits for 25k images (hold-out, test, mirrored test), ~1/3 of a step's cost each, + slack.
    stream = batches()
    sized_from_timing = steps is None
    if steps is None:
        probe = copy.deepcopy(model)
        probe_opt = torch.optim.SGD(_param_groups(probe), lr=0.0, momentum=MOMENTUM, nesterov=True)
        probe_rng = torch.Generator().manual_seed(seed + 1)
        times = []
        for i in range(8):
            idx = torch.randint(0, n_train, (batch_size,), generator=probe_rng)
            t0 = time.time()
            step_fn(probe, probe_opt, _augment(x_pad, idx, probe_rng), y_tr[idx])
            if i >= 2:
                times.append(time.time() - t0)
        del probe, probe_opt
        step_time = float(np.median(times))
        eval_reserve = 25000 / batch_size * step_time / 2.5 + 20.0
        left = max_minutes * 60.0 - (time.time() - t_start) - eval_reserve
        steps = max(10, int(0.93 * left / step_time))
    total_steps = planned_steps = int(steps)
    warm_steps = max(1, int(WARMUP_FRAC * total_steps))
    deadline = t_start + max_minutes * 60.0 - 25000 / batch_size * 0.5  # hard stop, eval still fits

    t_train = time.time()
    done = 0
    run_loss = run_acc = None
    truncated = False
    replans = 0
    t_window = time.time()
    pbar = tqdm(total=total_steps, desc="cifarnet", unit="step", mininterval=5.0)
    while done < total_steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(done, total_steps, lr, warm_steps)
        xb, yb = next(stream)
        loss, acc = step_fn(model, opt, xb, yb)
        run_loss = loss if run_loss is None else 0.95 * run_loss + 0.05 * loss
        run_acc = acc if run_acc is None else 0.95 * run_acc + 0.05 * acc
        done += 1
        pbar.update(1)
        if done % 25 == 0:
            pbar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{run_acc:.3f}", lr=f"{opt.param_groups[0]['lr']:.3f}")
            if log is not None:
                log({"train/loss": run_loss, "train/acc": run_acc, "train/lr": opt.param_groups[0]["lr"]}, done)
            # Shared machines slow down: if the recent pace cannot finish the plan before the deadline,
            # shorten the plan so the learning rate still decays to zero (only when sized from timing).
            recent = (time.time() - t_window) / 25
            t_window = time.time()
            fits = int(0.95 * (deadline - time.time()) / recent)
            if sized_from_timing and done + fits < total_steps:
                total_steps = max(done + 1, done + fits)
                pbar.total = total_steps
                replans += 1
        if time.time() > deadline and done < total_steps:
            truncated = True
            break
    pbar.close()
    train_seconds = time.time() - t_train

    ho_logits = _logits(model, x_ho, dev)
    temperature = fit_temperature(ho_logits, y_ho)
    ho_acc = float((ho_logits.argmax(1) == y_ho).float().mean())
    ho_nll_raw = float(F.cross_entropy(ho_logits.double(), y_ho))
    ho_nll_t = float(F.cross_entropy(ho_logits.double() / temperature, y_ho))
    test_logits = _logits(model, x_test, dev)
    test_acc = float((test_logits.argmax(1) == y_test).float().mean())
    test_nll_t = float(F.cross_entropy(test_logits.double() / temperature, y_test))
    # Reported beside the headline, never used by the metrics (their features see each image once).
    test_acc_flip_tta = float(
        ((test_logits + _logits(model, x_test, dev, flip=True)).argmax(1) == y_test).float().mean()
    )
    model.temperature.fill_(temperature)

    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    wall = time.time() - t_start
    summary = {
        **model.config,
        "architecture": "CifarNet (airbench-style: fixed 2x2 whitening, 3 conv groups, global max pool, linear)",
        "params": num_params(model),
        "trainable_params": num_params(model, trainable_only=True),
        "pool_dim": model.pool_dim,
        "spatial_dim": model.spatial_dim,
        "test_accuracy": test_acc,
        "test_accuracy_flip_tta": test_acc_flip_tta,
        "test_nll_at_temperature": test_nll_t,
        "holdout_accuracy": ho_acc,
        "holdout_nll_raw": ho_nll_raw,
        "holdout_nll_at_temperature": ho_nll_t,
        "temperature": temperature,
        "seed": seed,
        "steps": done,
        "planned_steps": planned_steps,
        "replanned_shorter": replans,
        "steps_sized_from_timing": sized_from_timing,
        "truncated_by_deadline": truncated,
        "batch_size": batch_size,
        "epochs": round(done * batch_size / n_train, 3),
        "train_images": n_train,
        "holdout_images": HOLDOUT,
        "lr_peak": lr,
        "momentum": MOMENTUM,
        "nesterov": True,
        "weight_decay": WEIGHT_DECAY,
        "label_smoothing": LABEL_SMOOTHING,
        "warmup_frac": WARMUP_FRAC,
        "augmentation": f"random h-flip + random translate <= {TRANSLATE}px (reflect pad)",
        "max_minutes": max_minutes,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall, 1),
        "hardware": _hardware(dev),
        "torch": torch.__version__,
        "data_train": src_train.to_dict(),
        "data_test": src_test.to_dict(),
        "reproduce": f"bench train extractor cifarnet --data {data} --minutes {max_minutes:g}",
    }
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    summary["weights_sha256"] = sha256_file(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "README.md").write_text(_model_card(summary))
    if log is not None:
        log({"test/acc": test_acc, "holdout/acc": ho_acc, "temperature": temperature}, done)
    return summary


def _hardware(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(dev)}"
    return (
        f"CPU ({platform.processor() or platform.machine()}), torch threads={torch.get_num_threads()}, "
        f"os.cpu_count={os.cpu_count()}"
    )


def _model_card(s: dict) -> str:
    src = s["data_train"]
    return f"""# CifarNet: CIFAR-10 feature extractor for dmqbench metrics

A small airbench-style CIFAR-10 classifier whose features feed the `*/cifarnet` metrics
(FID, IS, KID, sFID, clean-FID analogues; see `harness/metrics.py`). It is **not** Inception:
numbers computed with it are not comparable with published Inception FIDs.

## Architecture

- fixed 2x2-patch whitening conv (3 -> {2 * 3 * s["whiten_kernel"] ** 2} channels; eigenvectors of the
  training-patch covariance / sqrt(eigenvalue + {s["whiten_eps"]}), and their negatives)
- 3 conv groups of widths {s["widths"]}: conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU
- global max pool -> linear ({s["num_classes"]} classes, no bias)
- parameters: {s["params"]:,} ({s["trainable_params"]:,} trainable)
- features: `pool` ({s["pool_dim"]}-d), `logits` (divided by the temperature), `spatial` (first
  {s["spatial_channels"]} channels of the group-2 7x7 map, {s["spatial_dim"]}-d)

## Training

| | |
|---|---|
| data | `{src["path"]}` ({src["kind"]}), sha256 `{src["sha256"]}` |
| split | train: {s["train_images"]} images for training, a seeded {s["holdout_images"]}-image slice held out |
| augmentation | {s["augmentation"]} |
| loss | cross-entropy, label smoothing {s["label_smoothing"]} |
| optimiser | SGD, Nesterov momentum {s["momentum"]}, weight decay {s["weight_decay"]} (weights only) |
| schedule | one-cycle: warm-up {s["warmup_frac"]:.0%} of steps to lr {s["lr_peak"]}, linear decay to 0 |
| batch size | {s["batch_size"]} |
| steps | {s["steps"]} (planned {s["planned_steps"]}; sized from timing: {s["steps_sized_from_timing"]}; \
shortened on slowdown: {s.get("replanned_shorter", "n/a")}; truncated by deadline: {s["truncated_by_deadline"]}) |
| epochs | {s["epochs"]} |
| seed | {s["seed"]} |
| hardware | {s["hardware"]} |
| torch | {s["torch"]} |
| wall time | {s["wall_seconds"]} s total ({s["train_seconds"]} s training), budget {s["max_minutes"]} min |

## Results

| | |
|---|---|
| test accuracy (CIFAR-10 test, 10k, no TTA) | **{s["test_accuracy"]:.4f}** |
| test accuracy with flip TTA (mean logits of image and mirror; not what the metrics use) | \
{s.get("test_accuracy_flip_tta", float("nan")):.4f} |
| temperature (NLL fit on the held-out train slice) | {s["temperature"]:.4f} |
| held-out accuracy | {s["holdout_accuracy"]:.4f} |
| held-out NLL raw / at T | {s["holdout_nll_raw"]:.4f} / {s["holdout_nll_at_temperature"]:.4f} |
| test NLL at T | {s["test_nll_at_temperature"]:.4f} |

The test split was used only for the accuracy above; the temperature was fitted on the train
slice. Weights sha256: see `config.json` (`weights_sha256`).

## Reproduce

```
{s["reproduce"]}
```

{_reproduce_note(s)}
"""


def _reproduce_note(s: dict) -> str:
    if s["truncated_by_deadline"]:
        return (
            f"This run was stopped by the wall-clock deadline at step {s['steps']} of a {s['planned_steps']}-step "
            "schedule (the machine slowed down mid-run, shared with other jobs), so its learning rate had not "
            "decayed to zero. The current code shortens the schedule when the pace drops instead, so a rerun "
            "anneals fully; the step count is sized from the measured step time, so reruns on other hardware "
            "train for a different number of steps."
        )
    return (
        "The step count is sized from the measured step time, so other hardware trains for a different\n"
        "number of steps; to repeat this run's schedule exactly call\n"
        f"`models.train_cifarnet.train_cifarnet(..., seed={s['seed']}, steps={s['steps']})`."
    )


if __name__ == "__main__":  # pragma: no cover - convenience entry point
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="models/assets/cifarnet")
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--widths", type=int, nargs=3, default=None, help="conv group widths (default: the function's)")
    a = ap.parse_args()
    extra = {"widths": a.widths} if a.widths else {}
    res = train_cifarnet(a.data, a.out, a.seed, a.minutes, a.cache_dir, threads=a.threads, steps=a.steps, **extra)
    print(json.dumps({k: res[k] for k in ("test_accuracy", "temperature", "steps", "wall_seconds", "params")}))
