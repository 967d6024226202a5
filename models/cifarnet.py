"""CifarNet: a small airbench-style CIFAR-10 classifier used as a metric feature extractor.

Layout (after Keller Jordan's airbench, re-implemented here):

* a fixed 2x2-patch **whitening** conv (3 -> 2k channels, no padding, 32 -> 31): its filters are
  the eigenvectors of the training-patch covariance scaled by ``1/sqrt(eigenvalue + eps)``,
  stacked with their negatives so the following GELU sees both signs;
* three conv groups, each ``conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU``
  (airbench's ordering: the pool sits after the first conv so the second conv runs at half
  resolution, which is what makes the net cheap enough to train on a CPU); 31 -> 15 -> 7 -> 3;
* a global max pool over the final 3x3 map, and a bias-free linear head.

Feature taps for the metric layer (:meth:`CifarNet.features`):

* ``pool``: the globally max-pooled penultimate activations, ``[B, widths[2]]``;
* ``logits``: head output divided by the fitted softmax temperature (buffer ``temperature``);
* ``spatial``: the first ``spatial_channels`` channels of the second group's 7x7 output map,
  flattened, in the spirit of ADM's sFID (first 7 channels of Inception's Mixed_6d 17x17 map).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

# CIFAR-10 training-set channel statistics (on [0, 1] pixels); used by :meth:`CifarNet.normalize`.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

DEFAULT_ASSET_DIR = Path(__file__).resolve().parent / "assets" / "cifarnet"

DEFAULT_CONFIG: dict = {
    "widths": [64, 256, 256],
    "whiten_kernel": 2,
    "whiten_eps": 5e-4,
    "spatial_channels": 20,
    "num_classes": 10,
    "bn_momentum": 0.2,
}


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int, bn_momentum: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class CifarNet(nn.Module):
    """Airbench-style CIFAR-10 classifier; see the module docstring for the layout."""

    def __init__(
        self,
        widths: list[int] | tuple[int, int, int] = (64, 256, 256),
        whiten_kernel: int = 2,
        whiten_eps: float = 5e-4,
        spatial_channels: int = 20,
        num_classes: int = 10,
        bn_momentum: float = 0.2,
    ):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 3:
            raise ValueError(f"CifarNet needs 3 group widths, got {widths}")
        if not 0 < spatial_channels <= widths[1]:
            raise ValueError(f"spatial_channels must be in 1..{widths[1]}, got {spatial_channels}")
        self.config = {
            "widths": widths,
            "whiten_kernel": int(whiten_kernel),
            "whiten_eps": float(whiten_eps),
            "spatial_channels": int(spatial_channels),
            "num_classes": int(num_classes),
            "bn_momentum": float(bn_momentum),
        }
        k = whiten_kernel
        self.whiten_channels = 2 * 3 * k * k
        # Fixed (never trained) whitening filters; set from data by :meth:`init_whitening`.
        self.whiten = nn.Conv2d(3, self.whiten_channels, k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.groups = nn.ModuleList(
            [
                ConvGroup(self.whiten_channels, widths[0], bn_momentum),
                ConvGroup(widths[0], widths[1], bn_momentum),
                ConvGroup(widths[1], widths[2], bn_momentum),
            ]
        )
        self.act = nn.GELU()
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.ones(()))

    # ------------------------------------------------------------------ dimensions
    @property
    def pool_dim(self) -> int:
        return self.config["widths"][2]

    @property
    def spatial_hw(self) -> int:
        # 32 -> (32 - k + 1) after whitening, then two floor-halvings by groups 1 and 2.
        s = 32 - self.config["whiten_kernel"] + 1
        return (s // 2) // 2

    @property
    def spatial_dim(self) -> int:
        return self.config["spatial_channels"] * self.spatial_hw**2

    # ------------------------------------------------------------------ whitening
    @torch.no_grad()
    def init_whitening(self, x_uint8: torch.Tensor) -> None:
        """Set the whitening filters from training images (uint8 ``[N,3,32,32]``)."""
        x = self.normalize(x_uint8.to(self.mean.device))
        k = self.config["whiten_kernel"]
        c = x.shape[1]
        patches = x.unfold(2, k, 1).unfold(3, k, 1)  # N,C,H',W',k,k
        patches = patches.transpose(1, 3).reshape(-1, c * k * k).double()
        patches = patches - patches.mean(0, keepdim=True)
        cov = patches.T @ patches / patches.shape[0]
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals, eigvecs = eigvals.flip(0), eigvecs.T.flip(0)  # descending
        filters = eigvecs.view(c * k * k, c, k, k) / torch.sqrt(eigvals + self.config["whiten_eps"]).view(-1, 1, 1, 1)
        w = torch.cat([filters, -filters]).float()
        self.whiten.weight.copy_(w)
        self.whiten.bias.zero_()

    # ------------------------------------------------------------------ forward
    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0,255] float) ``[B,3,32,32]`` -> channel-normalised float."""
        if x_uint8.shape[-3:] != (3, 32, 32):
            raise ValueError(f"CifarNet expects [B,3,32,32] images, got {tuple(x_uint8.shape)}")
        x = x_uint8.to(self.mean.device, torch.float32) / 255.0
        return (x - self.mean) / self.std

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.whiten(x)
        x = self.groups[0](x)
        x2 = self.groups[1](x)
        x3 = self.groups[2](x2)
        return x2, x3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float ``[B,3,32,32]`` -> raw logits (no temperature)."""
        _, x3 = self._trunk(x)
        return self.head(torch.amax(x3, dim=(2, 3)))

    def features(self, x_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 ``[B,3,32,32]`` -> ``{"pool": [B,D], "logits": [B,10] / T, "spatial": [B,D_s]}``."""
        x2, x3 = self._trunk(self.normalize(x_uint8))
        pool = torch.amax(x3, dim=(2, 3))
        logits = self.head(pool) / self.temperature
        spatial = x2[:, : self.config["spatial_channels"]].flatten(1)
        return {"pool": pool, "logits": logits, "spatial": spatial}


def num_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_cifarnet(path: str | Path | None = None, device: str | torch.device = "cpu") -> CifarNet:
    """Load the shipped CifarNet (``model.safetensors`` + ``config.json`` in ``path``), in eval mode."""
    from safetensors.torch import load_file

    d = Path(path) if path is not None else DEFAULT_ASSET_DIR
    weights, config = d / "model.safetensors", d / "config.json"
    missing = [str(p) for p in (weights, config) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"CifarNet weights not found: missing {', '.join(missing)}. "
            "Train them with `bench train extractor cifarnet --data PATH --minutes M` "
            "(or models.train_cifarnet.train_cifarnet), or pass the folder that holds them."
        )
    cfg = json.loads(config.read_text())
    arch = {k: cfg[k] for k in DEFAULT_CONFIG if k in cfg}
    model = CifarNet(**arch)
    state = load_file(str(weights), device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
