"""The model zoo: one :class:`ModelSpec` per model, with its published sampling protocol.

A spec says where the weights come from (a Hugging Face repo id, a local diffusers
directory, the project's embedded assets, or a random-init miniature built from a real
config), what kind of pipeline it is, and how the papers sample it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from methods.registry import Registry

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # "hub" | "local" | "embedded" | "random"
    location: str = ""  # repo id, directory, or asset folder name
    pipeline: str = "pixel"  # "pixel" | "latent"
    conditioning: str = "none"  # "none" | "class" | "text"
    sampler: str = "ddim"  # "ddim" | "ddpm" | "plms"
    steps: int = 100
    eta: float = 0.0
    spacing: str = "quad"  # "quad" | "uniform" | "linspace"
    guidance_scale: float = 1.0
    resolution: int = 32
    reference: str = "cifar10-test"  # reference statistics for the metrics
    extractor: str = "cifarnet"
    num_samples: int = 50_000  # the paper protocol's sample count
    # DDIM/DDPM clip the predicted x0 to [-1, 1]: the papers' samplers decide, not the scheduler file
    # (Q-Diffusion's and APQ-DM's generalized_steps do not clip). None: the scheduler config's clip_sample.
    clip_sample: bool | None = None
    description: str = ""
    random_init: bool = False  # True: weights are random; numbers only test plumbing
    random_config: dict = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)


# A miniature of google/ddpm-cifar10-32's UNet2DModel: same block types, tiny widths.
TINY_RANDOM_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=None,
)

# The embedded tiny-cifar10 DDPM: 1.53 M parameters (the embedded-benchmark issue's planning figure).
TINY_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    attention_head_dim=None,
    dropout=0.0,
)

# Built-ins: the entries below plus the paper zoo (models/zoo.py, imported on first lookup).
MODELS: Registry[ModelSpec] = Registry("model", "dmqbench.models", builtins=("models.zoo",))
ZOO = MODELS


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add (or, for a zoo entry refining an earlier one with the same name, replace) a model spec."""
    MODELS.unregister(spec.name)
    return MODELS.register(spec.name, spec)


register_model(ModelSpec(
    "tiny-cifar10", "embedded", "tiny-cifar10", steps=100, spacing="quad", clip_sample=True,
    description="Embedded 1.5M-param DDPM trained by this project on CIFAR-10 (models/assets/tiny-cifar10/README.md)",
))
register_model(ModelSpec(
    "tiny-random", "random", steps=10, spacing="uniform", resolution=32, num_samples=64, clip_sample=True,
    description="RANDOM-INIT miniature UNet2DModel (ddpm-cifar10-32 block types); for tests only",
    random_init=True, random_config=TINY_RANDOM_UNET,
))
register_model(ModelSpec(
    "tiny-cifar10-random", "random", steps=100, spacing="quad", clip_sample=True,
    description="RANDOM-INIT tiny-cifar10 architecture: the untrained baseline its FP scores are compared with",
    random_init=True, random_config=TINY_UNET_CONFIG,
))
register_model(ModelSpec(
    "ddpm-cifar10", "hub", "google/ddpm-cifar10-32", steps=100, eta=0.0, spacing="quad", clip_sample=False,
    description="DDPM CIFAR-10 (Ho et al. 2020) via diffusers; DDIM 100, eta 0, quad (Q-Diffusion, APQ-DM)",
))


def get_model(name: str) -> ModelSpec:
    return MODELS.get(name)


def local_model(path: str | Path) -> ModelSpec:
    """A spec for any local diffusers pipeline directory (``model_index.json``, ``unet/``, ``scheduler/``)."""
    p = Path(path).resolve()
    return ModelSpec(f"local-{p.name}", "local", str(p), steps=100, spacing="quad",
                     description=f"local diffusers directory {p}")


def at_path(spec: ModelSpec, path: str | Path) -> ModelSpec:
    """A zoo entry's protocol with its weights from a local diffusers directory (``--model-path``)."""
    return replace(spec, source="local", location=str(Path(path).resolve()))


