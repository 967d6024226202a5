"""One call signature for every UNet: ``denoiser(x, t, cond) -> eps``.

Samplers, calibration and methods call denoisers only through this, so conditioning
kinds (none, class labels, text embeddings) and classifier-free guidance live in one
place. With guidance the conditional and unconditional halves go through the UNet as
one batch, inside the one timestep context the sampler set: both halves see the same
per-step quantizer parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Denoiser:
    unet: nn.Module
    conditioning: str = "none"  # "none" | "class" | "text"
    guidance_scale: float = 1.0
    uncond: torch.Tensor | None = None  # null class id ([1]) or empty-prompt embedding ([1, L, D])
    out_channels: int | None = None  # keep the first C channels (learned-sigma UNets predict 2C)

    def unet_call(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if self.conditioning == "class":
            out = self.unet(x, t, class_labels=cond).sample
        elif self.conditioning == "text":
            out = self.unet(x, t, encoder_hidden_states=cond).sample
        else:
            out = self.unet(x, t).sample
        return out[:, : self.out_channels or x.shape[1]]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.guidance_scale == 1.0 or self.uncond is None or self.conditioning == "none":
            return self.unet_call(x, t, cond)
        uncond = self.uncond.to(x.device).expand(x.shape[0], *self.uncond.shape[1:])
        eps_u, eps_c = self.unet_call(
            torch.cat([x, x]), torch.cat([t.expand(x.shape[0])] * 2), torch.cat([uncond, cond])
        ).chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)

    def with_unet(self, unet: nn.Module) -> Denoiser:
        return Denoiser(unet, self.conditioning, self.guidance_scale, self.uncond, self.out_channels)
