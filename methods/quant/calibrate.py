"""Run calibration samples through a denoiser and fit activation ranges from what the layers see.

Calibration batches mix timesteps, but the timestep context holds one step per call,
so :func:`iterate_by_step` groups samples by step index and enters the context for
each group: per-step quantizers then see their own step during calibration too.

Two ways to fit static activation ranges:

* :func:`init_activation_ranges`: on FP activations (activation quantizers off) of all
  calibration samples; ``mse`` searches a :class:`Reservoir`, a uniform random subsample
  of every value the layer saw (all steps alike);
* :func:`fit_ranges_online`: the BRECQ/QDrop/Q-Diffusion way. Quantizers fit themselves on
  the first batch that reaches them (later batches: an EMA of the per-batch fit), with the
  weights and every upstream activation quantizer already on, so each range is fitted on
  the inputs it will see at inference. Batches are random and mix steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from methods.quant.base import OFF_BITS, Quantizer
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


class Reservoir:
    """A uniform random sample, without replacement, of at most ``size`` values from a stream of tensors.

    Each value gets a uniform random key and the ``size`` smallest keys are kept, so every value
    seen has the same chance of being in the sample whatever the batch it came in (and the
    order of the batches).
    """

    def __init__(self, size: int, gen: torch.Generator) -> None:
        self.size, self.gen = size, gen
        self.values = torch.empty(0)
        self.keys = torch.empty(0)

    def add(self, x: torch.Tensor) -> Reservoir:
        flat = x.detach().float().flatten().cpu()
        keys = torch.rand(flat.numel(), generator=self.gen)
        if self.keys.numel() >= self.size:  # full: only keys below the largest kept one can enter
            keep = keys < self.keys.max()  # and the selection below runs over fewer
            flat, keys = flat[keep], keys[keep]
        values, keys = torch.cat([self.values, flat]), torch.cat([self.keys, keys])
        if values.numel() > self.size:
            keys, idx = torch.topk(keys, self.size, largest=False)
            values = values[idx]
        self.values, self.keys = values, keys
        return self


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
    seed: int = 0,
) -> None:
    """Fit every layer's input quantizer(s) on FP activations of the calibration samples.

    ``minmax`` uses the running min/max over all samples; ``mse``/``qdrop`` search the L_p-optimal
    range on a uniform random subsample (:class:`Reservoir`) of at most ``max_values`` values per
    layer, drawn over all samples and steps (enough for a per-tensor range, bounded memory).
    """
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    reservoir: dict[str, Reservoir] = {}
    gen = torch.Generator().manual_seed(seed)

    def parts(layer: QuantLayer, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[:, : layer.split], x[:, layer.split :]] if layer.split else [x]

    def on_input(name: str, x: torch.Tensor) -> None:
        layer = layers[name]
        for i, part in enumerate(parts(layer, x.detach().float())):
            key = f"{name}/{i}"
            cur_lo, cur_hi = part.amin(), part.amax()
            lo[key] = torch.minimum(lo[key], cur_lo) if key in lo else cur_lo
            hi[key] = torch.maximum(hi[key], cur_hi) if key in hi else cur_hi
            if method != "minmax":
                reservoir.setdefault(key, Reservoir(max_values, gen)).add(part)

    observe_layer_inputs(denoiser, layers, samples, num_steps, on_input, batch_size, device)
    for name, layer in layers.items():
        for i, quantizer in enumerate(layer.act_quantizers()):
            key = f"{name}/{i}"
            if key not in lo:
                continue
            if method == "minmax":
                quantizer.set_range(lo[key], hi[key])
            else:
                quantizer.init_range(reservoir[key].values, method=method, p=p)


def random_batches(samples: Batch, batch_size: int, max_samples: int | None = None, seed: int = 0) -> list[Batch]:
    """The samples in a seeded random order (the first ``max_samples`` of it), cut into batches (steps mixed)."""
    n = samples["x"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if max_samples is not None:
        order = order[:max_samples]
    return [{k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in samples.items()}
            for idx in order.split(batch_size)]


@torch.no_grad()
def fit_ranges_online(
    denoiser: Denoiser,
    quantizers: list[Quantizer],
    batches: list[Batch],
    method: str = "minmax",
    p: float = 2.4,
    momentum: float | None = None,
    device: torch.device | str = "cpu",
    max_values: int | None = None,
    seed: int = 0,
) -> int:
    """Fit each of ``quantizers`` on what reaches it, with everything upstream quantized; return #batches.

    A forward pre-hook on each quantizer fits its range on its input before it quantizes it (the
    quantizer self-initialisation of BRECQ, QDrop and Q-Diffusion): on the first batch the range
    is ``method``'s fit; on later batches, with ``momentum`` m, ``range = m * range + (1 - m) * fit``
    (QDrop's EMA of per-batch optima, m = 0.9); ``momentum=None`` keeps the first batch's range.
    Weights and all other quantizers stay as they are (on). Batches may mix timesteps: the
    quantizers fitted here must not be timestep-aware. ``max_values``: a per-tensor quantizer's
    search sees a uniform random subsample (:class:`Reservoir`, without replacement, seeded) of that
    many of its input's values (None: all of them, as the official code does).
    """
    fitted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(seed)

    def pre(q, args):
        if not q.enabled or q.bits >= OFF_BITS:
            return
        x = args[0]
        seen = x
        if max_values is not None and q.channel_axis is None and x.numel() > max_values:
            seen = Reservoir(max_values, gen).add(x).values.to(x.device)
        lo, hi = q.fit_range(seen, method, p)
        if id(q) in fitted and momentum is not None:
            lo0, hi0 = fitted[id(q)]
            lo, hi = momentum * lo0 + (1 - momentum) * lo, momentum * hi0 + (1 - momentum) * hi
        elif id(q) in fitted:
            return
        fitted[id(q)] = (lo, hi)
        q.set_range(lo, hi, like=x.detach().float())

    for q in quantizers:
        q.initialized.fill_(False)  # a quantizer passes through until the hook has fitted it
    handles = [q.register_forward_pre_hook(pre) for q in quantizers]
    try:
        for b in batches:
            cond = b["cond"].to(device) if b.get("cond") is not None else None
            denoiser(b["x"].to(device), b["t"].to(device), cond)
    finally:
        for h in handles:
            h.remove()
    return len(batches)
