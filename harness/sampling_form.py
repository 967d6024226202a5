"""The denoiser a run samples with: FastQuantLayers wherever they reproduce the eager path bit for bit.

After calibration a method's QuantLayers are frozen (their fake-quantized weight is cached), but
each call still walks the eager quantizer objects. :func:`methods.quant.fast.fast_denoiser`
resolves all of that once: the fake-quantized weight replaces the FP weight and every input
quantizer becomes one fused kernel with constants fixed at conversion (same arithmetic as the
eager inference path, :func:`methods.quant.base.fused_fake_quant`). Layers it cannot convert (a
method's own QuantLayer subclass, quantizers without a static form such as TDQ's MLP fallback,
per-step tables fitted on another schedule) stay eager inside the converted UNet.

"Bit-identical" is checked, not assumed: the converted denoiser must return exactly the eager
output (``torch.equal``) on the run's own first images at the first and the last sampling step
(different rows of any per-step table). Otherwise the run samples with the eager denoiser and
says why in its facts. fp32 only: the low-precision and compiled forms stay opt-in in
``bench perf``, which reports their deviation.
"""

from __future__ import annotations

import torch

from harness.calibration import first_images
from methods.quant.fast import fast_denoiser
from methods.quant.timestep import timestep_context
from models.denoiser import Denoiser

CHECK_IMAGES = 4


@torch.no_grad()
def _outputs(denoiser, x, cond, schedule, device) -> list[torch.Tensor]:
    outs = []
    for step in sorted({0, schedule.num_steps - 1}):
        t_val = int(schedule.timesteps[step])
        t = torch.full((x.shape[0],), t_val, dtype=torch.long, device=device)
        with timestep_context(step, t_val, schedule.num_steps):
            outs.append(denoiser(x, t, cond).detach().cpu())
    return outs


@torch.no_grad()
def sampling_form(denoiser, model, schedule, seed: int, device) -> tuple[object, dict]:
    """``(denoiser to sample with, facts)``. ``facts["sampling_engine"]`` is ``fast`` (with the
    number of converted and still-eager layers) or ``eager`` (with the reason)."""
    if not isinstance(denoiser, Denoiser):  # a method's own wrapper (envelope contract): sample it as it is
        reason = f"the method's own wrapper ({type(denoiser).__name__})"
        return denoiser, {"sampling_engine": "eager", "sampling_engine_reason": reason, "fast_layers": 0,
                          "eager_layers": 0}
    fast, report = fast_denoiser(denoiser, timesteps=schedule.timesteps)
    facts = {"fast_layers": report["converted"], "eager_layers": report["skipped"]}
    if report["converted"] == 0:
        reason = "no quantizer has a static form" if report["skipped"] else "no quantized layer"
        return denoiser, {"sampling_engine": "eager", "sampling_engine_reason": reason, **facts}
    x, cond = first_images(model, seed, CHECK_IMAGES, device)
    ref, got = _outputs(denoiser, x, cond, schedule, device), _outputs(fast, x, cond, schedule, device)
    if all(torch.equal(a, b) for a, b in zip(ref, got)):
        return fast, {"sampling_engine": "fast", **facts}
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    return denoiser, {"sampling_engine": "eager", **facts,
                      "sampling_engine_reason": f"fast form differs from eager by up to {diff:.3g}"}
