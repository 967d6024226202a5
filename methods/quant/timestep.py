"""The timestep context: the sampler owns the timestep, quantizers read it.

Before each denoiser call the sampler enters ``timestep_context(step_index, t, num_steps)``.
Quantizers that hold per-step parameters (ADP-DM's group ranges, TDQ's step sizes) look
up ``current_step()`` instead of receiving the timestep through the model's forward,
so no method ever patches a sampler, and classifier-free-guidance batches (cond and
uncond in one call) share the same context automatically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TimestepState:
    step_index: int  # position in the sampler's (respaced) schedule, 0 = first (noisiest) step
    t: int  # the training-schedule timestep fed to the denoiser
    num_steps: int  # length of the sampler's schedule


_STACK: list[TimestepState] = []


@contextlib.contextmanager
def timestep_context(step_index: int, t: int, num_steps: int) -> Iterator[TimestepState]:
    """Make (step_index, t) visible to every quantizer for the duration of one denoiser call."""
    state = TimestepState(int(step_index), int(t), int(num_steps))
    _STACK.append(state)
    try:
        yield state
    finally:
        _STACK.pop()


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
