"""Feature extractors registered with torch-fidelity, and the safe loading of Inception weights.

* ``cifarnet``: the shipped CifarNet (:mod:`models.cifarnet`), uint8 32x32 in; layers ``pool``,
  ``logits``, ``spatial``.
* ``inception``: torch-fidelity's InceptionV3 (any square uint8 input, resized to 299 inside)
  plus ``spatial``, the sFID map of the ADM evaluator: ``Mixed_6d.branch1x1``, first 7 channels
  at 17x17, flattened channel-major (2023 dims).
* ``clean-fid-inception``: clean-fid's TorchScript Inception through clean-fid's own PNG pipeline.

Inception weights are never unpickled by torch-fidelity: :func:`load_inception_state_dict`
reads the file with ``torch.load(..., weights_only=True)`` (tensors and plain containers only),
refuses anything but a ``{str: Tensor}`` dict, and the state dict is loaded into the module
(torch-fidelity's constructor gets an in-memory empty checkpoint, so it neither reads the file
nor downloads). The file's sha256 is compared with the published torch-fidelity file.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.metrics.errors import MetricSetupError
from methods.registry import Registry

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILENAME
# sha256 of INCEPTION_FILENAME as published by torch-fidelity (95,628,359 bytes); torch.hub's file
# naming convention puts its first 8 hex digits, 6726825d, in the file name.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
CLEANFID_TORCHSCRIPT = Path("/tmp") / "inception-2015-12-05.pt"
SFID_CHANNELS = 7  # ADM: first 7 channels of mixed_6/conv (Mixed_6d.branch1x1), 17x17 -> 2023 dims
SFID_HW = 17
TF_CIFARNET = "cifarnet"
TF_INCEPTION = "inception-v3-sfid"



@dataclass(frozen=True)
class Extractor:
    """A feature network the metrics can use: its torch-fidelity name, its layers, which layer feeds
    which metric, and the image sizes it takes (``None``: any square size, resized as its evaluator does)."""

    name: str
    tf_name: str
    layers: tuple[str, ...]  # every layer it provides; one cached instance computes them all
    metric_layers: dict[str, str]  # metric family -> layer
    size: int | None
    needs_weights: bool  # a weights file the user supplies (Inception) vs shipped with the project


EXTRACTORS: Registry[Extractor] = Registry("extractor", "dmqbench.extractors")
EXTRACTORS.register("cifarnet", Extractor("cifarnet", TF_CIFARNET, ("pool", "logits", "spatial"),
                                          {"fid": "pool", "kid": "pool", "isc": "logits", "sfid": "spatial"},
                                          size=32, needs_weights=False))
EXTRACTORS.register("inception", Extractor("inception", TF_INCEPTION, ("2048", "logits_unbiased", "spatial"),
                                           {"fid": "2048", "kid": "2048", "isc": "logits_unbiased", "sfid": "spatial"},
                                           size=None, needs_weights=True))

# Views of the registry by extractor name (and clean-fid's Inception, which only feeds FID/KID).
ALL_LAYERS = {name: e.layers for name, e in EXTRACTORS.items()}
LAYERS: dict[str, dict[str, str]] = {**{name: dict(e.metric_layers) for name, e in EXTRACTORS.items()},
                                     "clean-fid-inception": {"fid": "pool", "kid": "pool"}}

_EXTRACTOR_CACHE: dict[tuple, torch.nn.Module] = {}
_SHA_CACHE: dict[tuple, str] = {}
_CHECKED: dict[tuple, None] = {}


# --------------------------------------------------------------------------- hashing
def file_sha256(path) -> str:
    """sha256 of a file (cached per path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def extractor_weights_sha256(extractor: str, inception_weights: str | None = None) -> str:
    """sha256 of the weights file ``extractor`` runs with."""
    if extractor == "cifarnet":
        from models.cifarnet import DEFAULT_ASSET_DIR

        return file_sha256(DEFAULT_ASSET_DIR / "model.safetensors")
    if extractor == "inception":
        return file_sha256(resolve_inception_weights(inception_weights))
    if extractor == "clean-fid-inception":
        return file_sha256(CLEANFID_TORCHSCRIPT)
    raise MetricSetupError(f"unknown extractor {extractor!r}; expected one of {sorted(LAYERS)}")


# --------------------------------------------------------------------------- Inception weights
def hub_inception_path() -> Path:
    """Where torch-fidelity looks for (and downloads) its Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _fix() -> str:
    return f"download {INCEPTION_FILENAME} from {INCEPTION_URL}, or drop the option to report only */cifarnet metrics"


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``{name: Tensor}`` state dict in ``path``, read with ``torch.load(weights_only=True)``.

    Anything else (a pickled object, a non-tensor value, an empty dict, an unreadable file) is a
    one-line :class:`MetricSetupError`; no code from the file runs.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise MetricSetupError(f"Inception weights file not found: {p}; {_fix()}")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler's refusal, or a corrupt file
        msg = " ".join(str(e).split())[:160]
        raise MetricSetupError(
            f"Inception weights {p} could not be loaded: not a plain state dict of tensors "
            f"(torch.load weights_only=True: {type(e).__name__}: {msg}); {_fix()}"
        ) from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise MetricSetupError(
            f"Inception weights {p} could not be loaded: expected a non-empty {{name: Tensor}} state dict, "
            f"got {type(sd).__name__}; {_fix()}"
        )
    return dict(sd)


def inception_weights_info(path: str | os.PathLike) -> dict:
    """``{"path", "sha256", "published_sha256", "matches_published"}`` of an Inception weights file."""
    sha = file_sha256(path)
    return {
        "path": str(Path(path).expanduser().resolve()),
        "sha256": sha,
        "published_sha256": INCEPTION_SHA256,
        "matches_published": sha == INCEPTION_SHA256,
    }


def check_inception_weights(path: str | os.PathLike) -> Path:
    """Fast check that ``path`` is a readable state dict of tensors (no network built); cached per file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MetricSetupError(f"Inception weights file not found: {p}; {_fix()}")
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CHECKED:
        load_inception_state_dict(p)
        _CHECKED[key] = None
    return p


def validate_inception_weights(path: str | os.PathLike) -> Path:
    """Check that ``path`` loads into torch-fidelity's InceptionV3; raise a one-line ``MetricSetupError`` if not.

    Builds the extractor (the instance is cached for the metric run). When the file's sha256
    differs from the published torch-fidelity file, a warning says so: its numbers are then not
    comparable with published FIDs.
    """
    p = check_inception_weights(path)
    try:
        get_extractor("inception", "cpu", str(p))
    except MetricSetupError:
        raise
    except Exception as e:  # noqa: BLE001 - any load failure becomes one clean message
        msg = " ".join(str(e).split())[:200]
        raise MetricSetupError(
            f"Inception weights {p} could not be loaded ({type(e).__name__}: {msg}); {_fix()}"
        ) from e
    return p


def resolve_inception_weights(inception_weights: str | None) -> str:
    """The given weights file (checked), else torch-fidelity's hub cache file; else a one-line error."""
    if inception_weights is not None:
        return str(check_inception_weights(inception_weights))
    hub = hub_inception_path()
    if hub.is_file():
        return str(check_inception_weights(hub))
    raise MetricSetupError(
        f"no Inception weights: pass --inception-weights W (inception_weights=) or place {INCEPTION_FILENAME} at {hub}"
    )


def optional_inception_weights(inception_weights: str | None) -> str | None:
    """Validated Inception weights: the given file, else torch-fidelity's hub cache file, else ``None``."""
    if inception_weights is not None:
        return str(validate_inception_weights(inception_weights))
    if hub_inception_path().is_file():
        return str(validate_inception_weights(hub_inception_path()))
    return None


def check_extractor(extractor: str, inception_weights: str | None, image_size) -> None:
    """Plan-time check (no network is built; well under a second once the weights file is cached).

    Raises a one-line :class:`MetricSetupError` when ``extractor`` is unknown, cannot take
    ``image_size`` (an int or ``(H, W)``: CifarNet 32x32 only; Inception any square size), or is
    ``"inception"`` and the weights (given or in torch-fidelity's hub cache) are missing or are not
    a plain state dict of tensors.
    """
    from harness.metrics.images import check_image_size

    if extractor not in EXTRACTORS:
        raise MetricSetupError(f"unknown extractor {extractor!r}; expected one of {EXTRACTORS.names()}")
    check_image_size(extractor, image_size, "model images")
    if extractor == "inception":
        resolve_inception_weights(inception_weights)
    elif inception_weights is not None:
        check_inception_weights(inception_weights)


# --------------------------------------------------------------------------- torch-fidelity registration
def _empty_checkpoint() -> io.BytesIO:
    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    return buf


def _register() -> None:
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if TF_CIFARNET in FEATURE_EXTRACTORS_REGISTRY and TF_INCEPTION in FEATURE_EXTRACTORS_REGISTRY:
        return

    class CifarNetFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity wrapper of :class:`models.cifarnet.CifarNet` (uint8 32x32 in)."""

        def __init__(self, name, features_list, cifarnet_path=None, **kwargs):
            super().__init__(name, features_list)
            from models.cifarnet import load_cifarnet

            self.net = load_cifarnet(cifarnet_path)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return "pool", "logits", "spatial"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros((1, 3, 32, 32), dtype=torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
                raise ValueError(f"cifarnet extractor expects uint8 Bx3x32x32, got {getattr(x, 'shape', x)}")
            feats = self.net.features(x)
            return tuple(feats[k].float() for k in self.features_list)

    class InceptionV3SFID(FeatureExtractorInceptionV3):
        """torch-fidelity's InceptionV3 plus ``spatial``: Mixed_6d.branch1x1, first 7 channels, 17x17 (2023-d).

        ``inception_state_dict`` (from :func:`load_inception_state_dict`) is loaded strictly after
        torch-fidelity's constructor, which is handed an in-memory empty checkpoint instead of a path.
        """

        def __init__(self, name, features_list, inception_state_dict=None, **kwargs):
            if inception_state_dict is None:
                raise ValueError("InceptionV3SFID needs inception_state_dict= (see load_inception_state_dict)")
            kwargs["feature_extractor_weights_path"] = _empty_checkpoint()
            object.__setattr__(self, "_defer_load", True)
            super().__init__(name, features_list, **kwargs)
            self._defer_load = False
            torch.nn.Module.load_state_dict(self, inception_state_dict, strict=True)
            self._tap = None
            self.Mixed_6d.branch1x1.register_forward_hook(self._hook)

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if getattr(self, "_defer_load", False):  # torch-fidelity's constructor: the weights come after
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

        def _hook(self, module, inputs, output):
            self._tap = output[:, :SFID_CHANNELS].flatten(1).to(torch.float32)

        @staticmethod
        def get_provided_features_list():
            return (*FeatureExtractorInceptionV3.get_provided_features_list(), "spatial")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(metric)

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):
            requested = list(self.features_list)
            inner = [f for f in requested if f != "spatial"] or ["768"]  # "768" runs past Mixed_6d
            saved = self.features_list
            self.features_list = inner
            try:
                out = dict(zip(inner, super().forward(x)))
            finally:
                self.features_list = saved
            out["spatial"] = self._tap
            self._tap = None
            return tuple(out[f] for f in requested)

    for name, cls in ((TF_CIFARNET, CifarNetFeatureExtractor), (TF_INCEPTION, InceptionV3SFID)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(name, cls)


def _tf_name(extractor: str) -> str:
    return EXTRACTORS.get(extractor).tf_name


def get_extractor(extractor: str, device: str = "cpu", inception_weights: str | None = None):
    """The registered torch-fidelity extractor instance for ``extractor`` (cached per weights file and device)."""
    import torch_fidelity  # noqa: F401  (imports torchvision; keep it lazy)
    from torch_fidelity.utils import create_feature_extractor

    _register()
    layers = ALL_LAYERS[extractor]
    kwargs = {"verbose": False, "feature_extractor_compile": False}
    if extractor == "inception":
        path = resolve_inception_weights(inception_weights)
        key = (extractor, layers, file_sha256(path), str(device))
    else:
        key = (extractor, layers, None, str(device))
    if key not in _EXTRACTOR_CACHE:
        if extractor == "inception":
            info = inception_weights_info(path)
            if not info["matches_published"]:
                warnings.warn(
                    f"Inception weights {path}: sha256 {info['sha256'][:12]} differs from the published "
                    f"{INCEPTION_FILENAME} ({INCEPTION_SHA256[:12]}); */inception numbers are not comparable "
                    "with published ones",
                    stacklevel=2,
                )
            kwargs["inception_state_dict"] = load_inception_state_dict(path)
        fe = create_feature_extractor(_tf_name(extractor), list(layers), cuda=False, **kwargs)
        _EXTRACTOR_CACHE[key] = fe.to(device)
    return _EXTRACTOR_CACHE[key]


class _UInt8Images(torch.utils.data.Dataset):
    """Dataset yielding uint8 CHW tensors, torch-fidelity's input contract."""

    def __init__(self, images: np.ndarray):
        self.x = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def extract_features(
    images: np.ndarray,
    extractor: str,
    layers,
    device: str = "cpu",
    batch_size: int = 256,
    inception_weights: str | None = None,
) -> dict[str, np.ndarray]:
    """Features ``{layer: float32 [N, D]}`` of uint8 ``images`` through torch-fidelity's machinery."""
    if extractor == "clean-fid-inception":
        return {"pool": cleanfid_features(images, cleanfid_inception(device), device, batch_size, resize=True)}
    from torch_fidelity.utils import get_featuresdict_from_dataset

    if extractor not in ALL_LAYERS:
        raise MetricSetupError(f"unknown extractor {extractor!r}; expected one of {sorted(LAYERS)}")
    unknown = set(layers) - set(ALL_LAYERS[extractor])
    if unknown:
        raise ValueError(f"extractor {extractor!r} has no layers {sorted(unknown)}; it has {ALL_LAYERS[extractor]}")
    fe = get_extractor(extractor, device, inception_weights if extractor == "inception" else None)
    cuda = str(device).startswith("cuda")
    with torch.no_grad():
        feats = get_featuresdict_from_dataset(
            _UInt8Images(images), fe, batch_size, cuda=cuda, save_cpu_ram=True, verbose=False
        )
    return {k: feats[k].float().cpu().numpy() for k in layers}


# --------------------------------------------------------------------------- clean-fid
def cleanfid_features(images: np.ndarray, model_fn, device: str, batch_size: int, resize: bool) -> np.ndarray:
    """Run clean-fid's own folder pipeline on lossless PNGs with ``model_fn``.

    ``resize=False`` replaces clean-fid's 299x299 resize by the identity (small-input extractors).
    """
    from cleanfid import fid as cfid
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="dmq-cleanfid-") as d:
        for i, im in enumerate(images):
            Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0))).save(os.path.join(d, f"{i:06d}.png"))
        feats = cfid.get_folder_features(
            d,
            model=model_fn,
            num_workers=0,
            batch_size=batch_size,
            device=torch.device(device),
            mode="clean",
            custom_fn_resize=None if resize else (lambda x: x),
            verbose=False,
        )
    return np.asarray(feats, dtype=np.float32)


def cifarnet_cleanfid_fn(device: str):
    fe = get_extractor("cifarnet", device)

    def fn(x: torch.Tensor) -> torch.Tensor:  # float [0,255] Bx3x32x32 from clean-fid
        return fe.net.features(x.round().clamp(0, 255).to(torch.uint8))["pool"]

    return fn


def cleanfid_inception(device: str):
    if not CLEANFID_TORCHSCRIPT.is_file():
        raise FileNotFoundError(f"clean-fid TorchScript Inception not found at {CLEANFID_TORCHSCRIPT}")
    from cleanfid.features import build_feature_extractor

    return build_feature_extractor("clean", device=torch.device(device), use_dataparallel=False)
