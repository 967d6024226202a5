"""The method interface every PTQ method implements.

A method is a :class:`QuantMethod` registered with ``@register_method("name")``, with a
``@dataclass`` config (a :class:`MethodConfig`: JSON-serialisable, versioned, its presets
as data). It says *where* quantizers go (:meth:`QuantMethod.layer`, :meth:`QuantMethod.extend`)
and *how* they are calibrated (:meth:`QuantMethod.calibrate`); the harness envelope
(:mod:`methods.envelope`) does the rest: traversal and scope, timing, freezing, the
coverage report and persistence. Methods never touch the sampler: timestep-aware
quantizers read the timestep context (:mod:`methods.quant.timestep`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from methods.quant.layers import QuantLayer
from methods.quant.quantizer import OFF_BITS
from methods.quant.surgery import UNIFORM, QuantSummary, Scope
from models.denoiser import Denoiser

_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")
PRESETS = ("paper", "fast")  # the presets every method defines


@dataclass(frozen=True)
class BitConfig:
    """``w4a8``: 4-bit weights, 8-bit activations. 16 (or more) means full precision."""

    w: int
    a: int

    @classmethod
    def parse(cls, text: str) -> BitConfig:
        m = _BITS_RE.match(text.strip().lower())
        if not m:
            raise ValueError(f"malformed bit config {text!r}: write wXaY with X, Y in 2..8 or 16, e.g. w4a8")
        w, a = int(m.group(1)), int(m.group(2))
        for b in (w, a):
            if not (2 <= b <= 8 or b == OFF_BITS):
                raise ValueError(f"bit width {b} in {text!r} is out of range: use 2..8, or 16 for full precision")
        return cls(w, a)

    def __str__(self) -> str:
        return f"w{self.w}a{self.a}"


@dataclass
class Trajectories:
    """FP sampling trajectories: ``x[n, s]`` is the denoiser input of image n at step s."""

    x: torch.Tensor  # [N, S, C, H, W]
    timesteps: list[int]  # [S], descending, the sampler's schedule
    cond: torch.Tensor | None = None  # [N] class ids or [N, L, D] text embeddings
    eps: torch.Tensor | None = None  # [N, S, C, H, W] FP noise predictions, when recorded

    @property
    def num_images(self) -> int:
        return self.x.shape[0]

    @property
    def num_steps(self) -> int:
        return self.x.shape[1]

    def at(self, image_idx: torch.Tensor, step_idx: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Gather samples (x_t, t, step index, cond) for paired image/step indices."""
        t = torch.tensor(self.timesteps, dtype=torch.long)[step_idx]
        cond = self.cond[image_idx] if self.cond is not None else None
        return {"x": self.x[image_idx, step_idx].float(), "t": t, "step": step_idx, "cond": cond}

    def at_steps(self, steps: list[int], per_step: int | None = None) -> dict[str, torch.Tensor | None]:
        """All (or the first ``per_step``) images at each of the given step indices."""
        n = self.num_images if per_step is None else min(per_step, self.num_images)
        image_idx = torch.arange(n).repeat(len(steps))
        step_idx = torch.tensor(steps, dtype=torch.long).repeat_interleave(n)
        return self.at(image_idx, step_idx)


class CalibrationSource(Protocol):
    """What the harness hands a method for calibration (implemented in harness/calibration.py)."""

    denoiser: Denoiser  # full precision, never modified by a method
    model_name: str  # the model spec's name (a method may resolve per-family settings from it)
    timesteps: list[int]  # the sampler's schedule, descending
    alphas_cumprod: torch.Tensor  # training schedule, for re-noising losses
    device: torch.device

    def trajectories(self, n: int) -> Trajectories:
        """FP trajectories of ``n`` calibration seeds (disjoint from evaluation seeds), cached on disk."""

    def generate(self, n: int, round_index: int) -> Trajectories:
        """A fresh batch of ``n`` FP trajectories for round ``round_index`` (ADP-DM's rounds)."""


@dataclass
class MethodConfig:
    """Base of every method config: JSON round-trip with a schema version, presets as data.

    ``PRESETS`` maps a preset name to the field values that differ from the dataclass defaults
    (``paper``: the published hyperparameters; ``fast``: documented CPU-smoke reductions).
    """

    VERSION: ClassVar[int] = 1
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "fast": {}}
    preset: str = "fast"

    @classmethod
    def from_preset(cls, preset: str) -> MethodConfig:
        if preset not in cls.PRESETS:
            raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(cls.PRESETS)}")
        return cls(preset=preset, **cls.PRESETS[preset])

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        data = dict(data)
        version = data.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise ValueError(f"{cls.__name__} version {version} cannot be read by version {cls.VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
        return cls(**data)


@dataclass
class QuantResult:
    denoiser: Denoiser
    facts: dict[str, Any] = field(default_factory=dict)  # calib_seconds, layers_quantized, coverage, ...
    artifacts: dict[str, Path] = field(default_factory=dict)  # name -> file written under the run's artifact dir
    structure: dict[str, Any] = field(default_factory=dict)  # what rebuilds the quantized module tree


class QuantMethod:
    """A PTQ method: where quantizers go, and how they are calibrated.

    The harness (:func:`methods.envelope.quantize_`) owns everything around that: it asks
    :meth:`structure` for the facts the layout depends on, swaps every conv/linear the scope
    selects for :meth:`layer`, lets :meth:`extend` add what is not a layer (attention
    quantizers, a denoiser wrapper), times :meth:`calibrate`, freezes, switches gradients off,
    writes the coverage report, and persists the result so a resumed run rebuilds the same
    tree and loads its state. :meth:`calibrate` may swap in training-time quantizers but must
    leave the module classes that :meth:`layer`/:meth:`extend` built (export back into them).
    """

    name: ClassVar[str] = ""
    # What a reader must see next to the name wherever a row appears (e.g. "TDQ-style PTQ (our recipe)").
    label: ClassVar[str | None] = None
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    # Methods without quantization (the FP reference) run once per model, not per bit-width.
    quantizes: ClassVar[bool] = True

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.config_cls()

    def paper_scope(self) -> Scope:
        """The layers the method's paper quantizes (``--scope paper``); default: the uniform scope."""
        return dataclasses.replace(UNIFORM, name="paper")

    def structure(self, denoiser: Denoiser, calib: CalibrationSource) -> dict[str, Any]:
        """JSON facts the module layout depends on (e.g. shortcut splits), found once on the FP model."""
        return {}

    def layer(self, name: str, module: nn.Module, w_bits: int, a_bits: int, structure: dict[str, Any]) -> nn.Module:
        """The quantized replacement of one conv/linear (the inference structure)."""
        return QuantLayer(module, w_bits, a_bits)

    def extend(self, denoiser: Denoiser, bits: BitConfig, scope: Scope, summary: QuantSummary,
               structure: dict[str, Any]) -> Denoiser:
        """Quantizers that are not layers, or a wrapper around the denoiser; default: none."""
        return denoiser

    def calibrate(self, denoiser: Denoiser, calib: CalibrationSource, bits: BitConfig,
                  artifact_dir: Path) -> dict[str, Any]:
        """Fill the quantizers' parameters; return method-specific facts (artifacts go to ``artifact_dir``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement calibrate()")

    def quantize(
        self, denoiser: Denoiser, calib: CalibrationSource, bits: BitConfig, scope: Scope, artifact_dir: Path
    ) -> QuantResult:
        """Quantize a (copy of the) FP denoiser inside the harness envelope."""
        from methods.envelope import quantize_

        return quantize_(self, denoiser, calib, bits, scope, artifact_dir)
