"""The timestep context: the sampler owns the timestep, quantizers read it.

Before each denoiser call the sampler enters ``timestep_context(step_index, t, num_steps)``.
Quantizers that hold per-step parameters (ADP-DM's group ranges, TDQ's step sizes) look
up ``current_step()`` instead of receiving the timestep through the model's forward,
so no method ever patches a sampler, and classifier-free-guidance batches (cond and
uncond in one call) share the same context automatically.

This module is the one place the current step lives. Compiled sampling
(:mod:`methods.quant.fast`) reads it as a device tensor (:func:`step_tensor`), so graphs do
not depend on the step's value and the lookup costs no host work per layer; those tensors
are mirrors that entering and leaving a context keep equal to the innermost step index.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TimestepState:
    step_index: int  # position in the sampler's (respaced) schedule, 0 = first (noisiest) step
    t: int  # the training-schedule timestep fed to the denoiser
    num_steps: int  # length of the sampler's schedule


_STACK: list[TimestepState] = []
_DEVICE_STEP: dict[str, torch.Tensor] = {}  # device -> [1] long tensor mirroring _STACK[-1].step_index


def _mirror(state: TimestepState | None) -> None:
    if state is not None:
        for t in _DEVICE_STEP.values():
            t.fill_(state.step_index)


@contextlib.contextmanager
def timestep_context(step_index: int, t: int, num_steps: int) -> Iterator[TimestepState]:
    """Make (step_index, t) visible to every quantizer for the duration of one denoiser call."""
    state = TimestepState(int(step_index), int(t), int(num_steps))
    _STACK.append(state)
    _mirror(state)
    try:
        yield state
    finally:
        _STACK.pop()
        _mirror(current_step())


def current_step() -> TimestepState | None:
    """The innermost active timestep, or None outside any sampler call."""
    return _STACK[-1] if _STACK else None


def require_step() -> TimestepState:
    state = current_step()
    if state is None:
        raise RuntimeError(
            "a timestep-aware quantizer ran outside a timestep context: call the denoiser through "
            "harness.sampling (or wrap the call in methods.quant.timestep.timestep_context)"
        )
    return state


def step_tensor(device: torch.device | str) -> torch.Tensor:
    """The current step index as a ``[1]`` long tensor on ``device`` (one shared tensor per device)."""
    key = str(torch.device(device))
    t = _DEVICE_STEP.get(key)
    if t is None:
        state = current_step()
        t = _DEVICE_STEP[key] = torch.full((1,), state.step_index if state else 0, dtype=torch.long, device=device)
    return t
