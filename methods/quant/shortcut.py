"""Where the skip concatenations of a diffusers UNet split (Q-Diffusion's shortcut splitting, Sec. 4.2).

In every diffusers up block, resnet ``j`` receives ``cat([hidden_states, res_hidden_states_tuple[-1 - j]], 1)``:
the deep features first, then the skip from the down path. Q-Diffusion quantizes the
two parts (and the matching input-channel halves of the consuming conv's weight)
separately because their ranges differ widely.

:func:`find_denoiser_splits` runs one probe forward with a pre-hook on each up block
that reads the channel count of the skips it is handed, and returns
``{layer name: split}`` for each up-block resnet's ``conv1`` and ``conv_shortcut``:
``split`` is the number of deep channels. ``conv1`` sees the concatenation through
GroupNorm and SiLU, which keep channel order, so the same index is valid there.
"""

from __future__ import annotations

import torch


def find_denoiser_splits(
    denoiser, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None
) -> dict[str, int]:
    """``{"up_blocks.i.resnets.j.conv1": split, "...conv_shortcut": split}`` from a probe call of ``denoiser``."""
    up_blocks = getattr(denoiser.unet, "up_blocks", None)
    if up_blocks is None:
        return {}
    splits: dict[str, int] = {}

    def hook(block_idx: int):
        def pre(module, args, kwargs):
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if res is None:
                return
            for j, resnet in enumerate(getattr(module, "resnets", [])):
                split = resnet.conv1.in_channels - res[-1 - j].shape[1]
                if split <= 0:
                    continue
                base = f"up_blocks.{block_idx}.resnets.{j}"
                splits[f"{base}.conv1"] = split
                if getattr(resnet, "conv_shortcut", None) is not None:
                    splits[f"{base}.conv_shortcut"] = split

        return pre

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(up_blocks)]
    try:
        with torch.no_grad():
            denoiser(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return splits

