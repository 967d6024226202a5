"""Run calibration samples through a denoiser and fit activation ranges from what the layers see.

Calibration batches mix timesteps, but the timestep context holds one step per call,
so :func:`iterate_by_step` groups samples by step index and enters the context for
each group: per-step quantizers then see their own step during calibration too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from methods.quant.layers import QuantLayer, quantizers_disabled
from methods.quant.timestep import timestep_context
from models.denoiser import Denoiser

Batch = dict[str, torch.Tensor | None]


def iterate_by_step(samples: Batch, batch_size: int) -> Iterator[Batch]:
    """Yield batches of at most ``batch_size`` samples that share one step index."""
    steps = samples["step"]
    for s in torch.unique(steps).tolist():
        idx = (steps == s).nonzero().flatten()
        for chunk in idx.split(batch_size):
            yield {k: (v[chunk] if isinstance(v, torch.Tensor) else v) for k, v in samples.items()}


def call_at_step(denoiser: Denoiser, batch: Batch, num_steps: int, device: torch.device | str) -> torch.Tensor:
    """Denoiser output for a single-step batch, inside that step's timestep context."""
    step = int(batch["step"][0])
    t = batch["t"].to(device)
    cond = batch["cond"].to(device) if batch.get("cond") is not None else None
    with timestep_context(step, int(t[0]), num_steps):
        return denoiser(batch["x"].to(device), t, cond)


@torch.no_grad()
def observe_layer_inputs(
    denoiser: Denoiser,
    layers: dict[str, QuantLayer],
    samples: Batch,
    num_steps: int,
    on_input: Callable[[str, torch.Tensor], None],
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> None:
    """Forward the samples with activation quantization off; report each layer's input."""
    handles = [layer.register_forward_pre_hook(lambda mod, args, name=name: on_input(name, args[0]))
               for name, layer in layers.items()]
    try:
        with quantizers_disabled(layers.values(), acts=True):
            for batch in iterate_by_step(samples, batch_size):
                call_at_step(denoiser, batch, num_steps, device)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def init_activation_ranges(
    denoiser: Denoiser,
    layers: dict[str, QuantLayer],
    samples: Batch,
    num_steps: int,
    method: str = "minmax",
    p: float = 2.4,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    max_values: int = 1 << 20,
) -> None:
    """Fit every layer's input quantizer(s) on FP activations of the calibration samples.

    ``minmax`` uses the running min/max over all samples; ``mse`` searches the L_p-optimal
    range on a random subsample of at most ``max_values`` values per layer (enough for a
    per-tensor range, and bounded memory whatever the calibration-set size).
    """
    lo: dict[str, list[torch.Tensor]] = {}
    hi: dict[str, list[torch.Tensor]] = {}
    reservoir: dict[str, list[torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(0)

    def parts(layer: QuantLayer, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[:, : layer.split], x[:, layer.split :]] if layer.split else [x]

    def on_input(name: str, x: torch.Tensor) -> None:
        layer = layers[name]
        for i, part in enumerate(parts(layer, x.detach().float())):
            key = f"{name}/{i}"
            cur_lo, cur_hi = part.amin(), part.amax()
            lo[key] = [torch.minimum(lo[key][0], cur_lo)] if key in lo else [cur_lo]
            hi[key] = [torch.maximum(hi[key][0], cur_hi)] if key in hi else [cur_hi]
            if method == "mse":
                flat = part.flatten().cpu()
                keep = min(flat.numel(), max_values // 8)
                reservoir.setdefault(key, []).append(flat[torch.randperm(flat.numel(), generator=gen)[:keep]])

    observe_layer_inputs(denoiser, layers, samples, num_steps, on_input, batch_size, device)
    for name, layer in layers.items():
        for i, quantizer in enumerate(layer.act_quantizers()):
            key = f"{name}/{i}"
            if key not in lo:
                continue
            if method == "mse":
                values = torch.cat(reservoir[key])[:max_values]
                quantizer.init_range(values, method="mse", p=p)
            else:
                quantizer.set_range(lo[key][0], hi[key][0])
