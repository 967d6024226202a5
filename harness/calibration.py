"""The trajectory bank: FP sampling trajectories (x_t, t, condition, eps) for calibration.

Every method draws its calibration data from here with its own timestep strategy
(uniform intervals, NDTC, ADP-DM's entropy rounds), so no method needs its own
generator (docs/protocols.md, "Calibration data"). Trajectories are cached on disk
(safetensors) under a key hashed from (model, sampler, steps, spacing, eta, seed
domain); asking for more images than are cached extends the file, so the first n
images are the same whatever n was asked first.

Calibration seeds live in their own domain (``CALIB_SEED_BASE + j``), disjoint from
evaluation seeds (``seed * EVAL_SEED_STRIDE + i``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harness.sampling import SAMPLERS, Schedule, image_generators, per_image_randn
from methods.base import Trajectories
from models.atomic import atomic_path
from models.denoiser import Denoiser
from models.loading import LoadedModel

CALIB_SEED_BASE = 1_000_000_000
ROUND_SEED_STRIDE = 1_000_000
EVAL_SEED_STRIDE = 10_000_000


def eval_seeds(run_seed: int, start: int, stop: int) -> list[int]:
    """Image i of a run with seed s always uses seed ``s * EVAL_SEED_STRIDE + i``."""
    return [run_seed * EVAL_SEED_STRIDE + i for i in range(start, stop)]


def initial_noise_and_cond(model: LoadedModel, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, list]:
    """x_T (and the class label for class-conditional models) from each image's own generator."""
    gens = image_generators(seeds)
    cond = None
    if model.num_classes:
        # The label is the generator's first draw, then the noise: both derive from the seed alone.
        cond = torch.stack([torch.randint(model.num_classes, (), generator=g) for g in gens])
    elif model.extra.get("cond_fn") is not None:
        cond = model.extra["cond_fn"](seeds)
    return per_image_randn(gens, model.sample_shape), cond, gens


def first_images(model: LoadedModel, run_seed: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x_T and condition of a run's first ``n`` images, on ``device`` (the checks before sampling use them)."""
    x, cond, _ = initial_noise_and_cond(model, eval_seeds(run_seed, 0, n))
    return x.to(device), (cond.to(device) if cond is not None else None)


@torch.no_grad()
def record_trajectories(
    model: LoadedModel,
    denoiser: Denoiser,
    schedule: Schedule,
    sampler: str,
    eta: float,
    seeds: list[int],
    device: torch.device | str,
    batch_size: int = 64,
    with_eps: bool = True,
) -> Trajectories:
    xs, epss, conds = [], [], []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        x, cond, gens = initial_noise_and_cond(model, chunk)
        steps_x: list[torch.Tensor] = []
        steps_eps: list[torch.Tensor] = []

        def keep(i: int, t: int, x_t: torch.Tensor, eps: torch.Tensor, steps_x=steps_x, steps_eps=steps_eps) -> None:
            steps_x.append(x_t.detach().cpu())
            if with_eps:
                steps_eps.append(eps.detach().cpu())

        SAMPLERS[sampler](
            denoiser,
            x.to(device),
            schedule,
            eta=eta,
            gens=gens,
            cond=cond.to(device) if cond is not None else None,
            callback=keep,
                    )
        xs.append(torch.stack(steps_x, 1))
        if with_eps:
            epss.append(torch.stack(steps_eps, 1))
        if cond is not None:
            conds.append(cond.cpu())
    return Trajectories(
        x=torch.cat(xs),
        timesteps=list(schedule.timesteps),
        cond=torch.cat(conds) if conds else None,
        eps=torch.cat(epss) if with_eps else None,
    )


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names and bytes), cached on the module: identifies the exact weights."""
    cached = getattr(module, "_dmq_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    module._dmq_fingerprint = h.hexdigest()[:16]
    return module._dmq_fingerprint


def _concat(a: Trajectories, b: Trajectories) -> Trajectories:
    cat = lambda u, v: None if u is None else torch.cat([u, v])  # noqa: E731
    return Trajectories(torch.cat([a.x, b.x]), a.timesteps, cat(a.cond, b.cond), cat(a.eps, b.eps))


class TrajectoryBank:
    """Implements ``methods.base.CalibrationSource`` over an on-disk cache."""

    def __init__(
        self,
        model: LoadedModel,
        schedule: Schedule,
        sampler: str,
        eta: float,
        cache_dir: str | Path,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        seed_base: int = CALIB_SEED_BASE,
        model_key: str = "",
    ) -> None:
        self.model = model
        self.model_name = model.spec.name
        self.denoiser = model.denoiser
        self.schedule = schedule
        self.timesteps = list(schedule.timesteps)
        self.alphas_cumprod = schedule.alphas_cumprod
        self.sampler, self.eta = sampler, eta
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.seed_base = seed_base
        # The weights' fingerprint is part of the key: a re-trained model never reuses stale trajectories.
        self.fingerprint = weights_fingerprint(model.denoiser.unet)
        key = [model_key or model.spec.name, self.fingerprint, sampler, self.timesteps, eta, seed_base]
        if not schedule.clip_sample:  # (appended only when off, so existing caches of clipped runs stay valid)
            key.append("no-clip")
        key = json.dumps(key, default=str)
        self.path = Path(cache_dir) / f"traj-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"

    def _record(self, seeds: list[int]) -> Trajectories:
        return record_trajectories(
            self.model, self.denoiser, self.schedule, self.sampler, self.eta, seeds, self.device, self.batch_size
        )

    def _load(self, path: Path) -> Trajectories | None:
        if not path.exists():
            return None
        d = load_file(str(path))
        return Trajectories(d["x"], self.timesteps, d.get("cond"), d.get("eps"))

    def _save(self, traj: Trajectories, path: Path) -> None:
        tensors = {"x": traj.x.contiguous(), "eps": traj.eps.contiguous()}
        if traj.cond is not None:
            tensors["cond"] = traj.cond.contiguous()
        # atomic, per-process temporary: a crash never leaves a half-written bank, and concurrent jobs
        # of one array may extend the same bank
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))

    def _cached(self, path: Path, seed_base: int, n: int) -> Trajectories:
        """The first ``n`` trajectories of seeds ``seed_base + j``, recorded once into ``path``."""
        have = self._load(path)
        count = 0 if have is None else have.num_images
        if count < n:
            new = self._record([seed_base + j for j in range(count, n)])
            have = new if have is None else _concat(have, new)
            self._save(have, path)
        sl = slice(0, n)
        return Trajectories(have.x[sl], self.timesteps, None if have.cond is None else have.cond[sl], have.eps[sl])

    def trajectories(self, n: int) -> Trajectories:
        return self._cached(self.path, self.seed_base, n)

    def generate(self, n: int, round_index: int) -> Trajectories:
        """Round ``round_index``'s own seeds, cached beside the bank: the runs of one method at other
        bit-widths (and reruns) draw the same rounds without sampling them again."""
        path = self.path.with_name(f"{self.path.stem}-round{round_index}{self.path.suffix}")
        return self._cached(path, self.seed_base + (round_index + 1) * ROUND_SEED_STRIDE, n)
