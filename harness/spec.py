"""Run specs: what one benchmark run is, how a sweep expands, and how it is validated.

A :class:`RunSpec` is everything that determines a run's samples and scores (never
the batch size or device count: those do not change the samples). Its hash names the
run's directory, keys resume, and tags its MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import methods
from harness import method_args as method_args_mod
from harness.results import method_label
from methods.base import PRESETS, BitConfig
from methods.registry import UnknownMethodError
from models.registry import ModelSpec, at_path, get_model, local_model

SPEC_VERSION = 1
# Omitted from to_dict (and the hash) when None, so specs from before a field existed keep their hash.
OPTIONAL_FIELDS = ("captions", "captions_sha256", "variant", "clip_sample")
CAPTIONS_ENV = "DMQBENCH_CAPTIONS"  # models.latent.CAPTIONS_ENV: the caption file when --captions is not given
FP_BITS = "fp"
DEFAULT_BITS = ("w8a8", "w4a8")


@dataclass(frozen=True)
class Protocol:
    """A named evaluation protocol. ``None`` fields fall back to the model's published value."""

    name: str
    preset: str
    num_samples: int | None = None
    steps: int | None = None
    description: str = ""


PROTOCOLS = {
    # 64 x 10: chosen from measurement (results/README.md, "Choosing the smoke protocol"): every method x
    # {w8a8, w4a8} within 4 minutes on 2 CPU cores, and RTN W4A8 still apart from FP, beyond the intervals,
    # on fid_fp/cifarnet and paired/psnr.
    "smoke": Protocol("smoke", "fast", num_samples=64, steps=10,
                      description="CPU smoke: 64 samples, 10 steps, fast presets; relative comparisons only"),
    "paper": Protocol("paper", "paper",
                      description="the model's published protocol (steps, eta, spacing, 50k samples)"),
}


@dataclass(frozen=True)
class RunSpec:
    method: str
    model: str
    bits: str
    seed: int
    protocol: str
    preset: str
    scope: str
    num_samples: int
    steps: int
    spacing: str
    eta: float
    sampler: str
    extractor: str
    model_path: str | None = None
    reference: str | None = None  # reference statistics the metrics compare with (name or .npz path)
    method_config: dict = field(default_factory=dict, hash=False, compare=False)
    version: int = SPEC_VERSION
    # Text-conditional models only: the caption file (absolute path) and its sha256, so the hash
    # names the prompts. Left out of to_dict (and the hash) when None: other specs keep their hash.
    captions: str | None = None
    captions_sha256: str | None = None
    # --method-args overrides as canonical "key=value,..." (harness/method_args.py); the values themselves
    # are in method_config. None (left out of the hash) for a method's preset as it is.
    variant: str | None = None
    # Whether the sampler clips its x0 prediction to [-1, 1] (the protocol's, models/registry.py
    # ModelSpec.clip_sample). None only for a local directory without a readable scheduler config:
    # the loaded scheduler's value then applies.
    clip_sample: bool | None = None

    @property
    def label(self) -> str:
        """The method as tables show it: ``adpdm``, or ``adpdm[lr=0.0]`` for a variant."""
        return method_label(self.to_dict())

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in OPTIONAL_FIELDS:
            if d[key] is None:
                del d[key]
        return d

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def run_name(self) -> str:
        return f"{self.model}/{self.method}-{self.bits}-s{self.seed}-{self.config_hash[:8]}"

    def fp_reference(self) -> RunSpec:
        """The FP run this run's paired metrics compare against (same model, protocol, seeds)."""
        return replace(self, method="fp", bits=FP_BITS, scope="uniform", method_config={}, variant=None)

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        return cls(**d)


class SpecError(ValueError):
    """Bad sweep input; the message names the problem and the fix."""


def _split(text: str) -> list[str]:
    """A comma list, blanks dropped and repeats removed (first occurrence kept): ``w8a8,w8a8`` is one entry."""
    return list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))


def resolve_methods(text: str) -> list[str]:
    known = methods.names()
    if text.strip() == "all":
        return known
    names = _split(text)
    for n in names:
        try:
            methods.get(n)
        except UnknownMethodError as e:
            raise SpecError(str(e)) from None
    return names


def resolve_models(text: str | None, model_path: str | None) -> list[ModelSpec]:
    """Zoo specs by name; with ``--model-path`` a local directory, under the named model's protocol if given."""
    if model_path:
        if not text:
            return [local_model(model_path)]
        names = _split(text)
        if len(names) != 1:
            raise SpecError("--model-path takes one model: name the zoo entry whose protocol applies, or none")
        try:
            return [at_path(get_model(names[0]), model_path)]
        except KeyError as e:
            raise SpecError(e.args[0]) from None
    out = []
    for n in _split(text):
        try:
            out.append(get_model(n))
        except KeyError as e:
            raise SpecError(e.args[0]) from None
    return out


def resolve_bits(text: str) -> list[str]:
    bits = []
    for b in _split(text):
        try:
            bits.append(str(BitConfig.parse(b)))
        except ValueError as e:
            raise SpecError(str(e)) from None
    return list(dict.fromkeys(bits))  # W8A8 and w8a8 are one bit-width


def file_sha256(path: str | Path) -> str | None:
    """sha256 of a file's bytes, or ``None`` when it cannot be read (the plan-time checks say why)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def resolve_clip_sample(model: ModelSpec) -> bool | None:
    """The protocol's x0 clipping: the zoo's value, else a local directory's ``scheduler_config.json``."""
    if model.clip_sample is not None:
        return model.clip_sample
    if model.source != "local" or not model.location:
        return None
    try:
        cfg = json.loads((Path(model.location) / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("clip_sample", True) if isinstance(cfg, dict) else None  # diffusers' DDIM/DDPM default
    return value if isinstance(value, bool) else None


def is_text_conditional(model: ModelSpec) -> bool:
    """A text-to-image model: the zoo says so, or its local pipeline directory has a text encoder."""
    if model.conditioning == "text":
        return True
    if model.source != "local" or not model.location:
        return False
    try:
        return "text_encoder" in json.loads((Path(model.location) / "model_index.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def resolve_captions(model: ModelSpec, captions: str | None) -> tuple[str | None, str | None]:
    """``(path, sha256)`` of the caption file a text-conditional model samples from, else ``(None, None)``.

    ``captions`` (``--captions FILE``), else ``$DMQBENCH_CAPTIONS``, else the protocol's default file
    (``models.zoo.EXTRAS[name]["captions"]``, relative to the working directory). A miniature without
    either uses its built-in prompts (``None``). A missing file keeps its path with no sha256; the
    plan-time check (harness/preflight.py ``check_captions``) reports it.
    """
    if not is_text_conditional(model):
        return None, None
    path = captions or os.environ.get(CAPTIONS_ENV)
    if not path and model.source != "miniature":
        from models.zoo import EXTRAS

        path = EXTRAS.get(model.name, {}).get("captions")
    if not path:
        return None, None
    p = Path(path).expanduser().absolute()
    return str(p), file_sha256(p) if p.is_file() else None


def expand(
    method_text: str = "all",
    model_text: str | None = None,
    bits_text: str = ",".join(DEFAULT_BITS),
    seeds: list[int] | None = None,
    protocol: str = "smoke",
    preset: str | None = None,
    scope: str = "uniform",
    num_samples: int | None = None,
    steps: int | None = None,
    model_path: str | None = None,
    reference: str | None = None,
    captions: str | None = None,
    method_args: list[str] | tuple[str, ...] | None = None,
) -> list[RunSpec]:
    """Expand a sweep into run specs; raise :class:`SpecError` before anything runs on bad input.

    ``reference`` (a reference-statistics name or ``.npz`` path) overrides each model's own.
    ``captions`` (a caption file, one per line) applies to text-conditional models only (see
    :func:`resolve_captions`); their specs record its path and sha256.
    The FP reference of every (model, seed) is always included and comes first, since
    the paired metrics of every quantized run compare against its samples. Repeated entries
    (``--bits w8a8,w8a8``, ``--seeds 0,0``) are one run: the list has no two specs with one hash.
    ``num_samples``/``steps`` of ``None`` take the protocol's (or the model's) value; 0 or less is an error.
    ``method_args`` (``--method-args METHOD:key=value,...`` entries) override config fields of the methods
    they name, validated here against each config dataclass; those specs carry the ``variant`` label.
    """
    for flag, value in (("--num-samples", num_samples), ("--steps", steps)):
        if value is not None and value < 1:
            raise SpecError(f"{flag} must be at least 1 (got {value}): pass a positive count, "
                            f"or leave {flag} out for the protocol's")
    if protocol not in PROTOCOLS:
        raise SpecError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if preset is not None and preset not in PRESETS:
        raise SpecError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    if scope not in ("uniform", "paper"):
        raise SpecError(f"unknown scope {scope!r}: use 'uniform' or 'paper'")
    proto = PROTOCOLS[protocol]
    method_names = resolve_methods(method_text)
    models = resolve_models(model_text if model_text or model_path else "tiny-cifar10", model_path)
    bit_list = resolve_bits(bits_text)
    try:
        overrides = method_args_mod.parse(method_args)
    except method_args_mod.MethodArgsError as e:
        raise SpecError(str(e)) from None
    for name in overrides:
        if name not in method_names or not methods.get(name).quantizes:
            raise SpecError(f"--method-args names {name!r}, which this sweep does not quantize with: "
                            f"add it to --methods ({', '.join(method_names)}) or drop its entry")
    if not bit_list:
        raise SpecError("no bit-widths given: pass e.g. --bits w8a8,w4a8")
    seeds = list(dict.fromkeys(seeds)) if seeds else [0]
    if any(seed < 0 for seed in seeds):
        raise SpecError(f"--seeds must be non-negative integers (got {min(seeds)}): pass e.g. --seeds 0,1,2")
    specs: list[RunSpec] = []
    for model in models:
        n = num_samples if num_samples is not None else proto.num_samples or model.num_samples
        s = steps if steps is not None else proto.steps or model.steps
        if n < 1 or s < 1:
            raise SpecError(f"--num-samples and --steps must be positive (got {n}, {s})")
        caption_path, caption_sha = resolve_captions(model, captions)
        for seed in seeds:
            common = dict(model=model.name, seed=seed, protocol=protocol, preset=preset or proto.preset,
                          num_samples=n, steps=s, spacing=model.spacing, eta=model.eta, sampler=model.sampler,
                          extractor=model.extractor, model_path=model.location if model.source == "local" else None,
                          reference=reference or model.reference, captions=caption_path,
                          captions_sha256=caption_sha, clip_sample=resolve_clip_sample(model))
            fp = RunSpec(method="fp", bits=FP_BITS, scope="uniform", **common)
            specs.append(fp)
            for name in method_names:
                cls = methods.get(name)
                if not cls.quantizes:
                    continue
                for bits in bit_list:
                    cfg, variant = cls.config_cls.from_preset(common["preset"]).to_dict(), None
                    if name in overrides:
                        try:
                            cfg, variant = method_args_mod.apply(name, cls.config_cls, cfg, overrides[name])
                        except method_args_mod.MethodArgsError as e:
                            raise SpecError(str(e)) from None
                    specs.append(RunSpec(method=name, bits=bits, scope=scope, method_config=cfg, variant=variant,
                                         **common))
    unique: dict[str, RunSpec] = {}
    for spec in specs:  # e.g. one local model named twice: first occurrence wins
        unique.setdefault(spec.config_hash, spec)
    return list(unique.values())
