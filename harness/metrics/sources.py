"""Reference image sources for ``bench ref build``: folders, ADM ``.npz`` batches, tar archives, CIFAR-10 pickles.

Every source yields uint8 ``[n, 3, R, R]`` chunks in a fixed order, each image brought to R x R by
one rule (:func:`center_crop_resize`, a no-op on an R x R image); R is ``resolution`` or, when not
given, the first image's size (which must then be square). Nothing in a user file is executed:
``.npz`` files are read with ``allow_pickle=False`` and CIFAR-10 pickles with
:class:`RestrictedUnpickler` (numpy array reconstruction only).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.metrics.errors import MetricSetupError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR_DIRNAME = "cifar-10-batches-py"
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
PREPROCESSING = (
    "RGB; center crop to {r}x{r}: halve with a box filter while the short side is >= {r2}, bicubic resize of "
    "the short side to {r}, central square (no-op on {r}x{r} images)"
)


def center_crop_resize(img, resolution: int) -> np.ndarray:
    """HWC uint8 RGB array of PIL image ``img`` brought to ``resolution`` x ``resolution``.

    The rule of the ADM (guided-diffusion) data loader, which made its reference batches: repeated
    2x box-filter downsampling while the short side is at least twice the target, one bicubic resize
    taking the short side to the target, then the central square.
    """
    from PIL import Image

    img = img.convert("RGB")
    r = int(resolution)
    if img.size == (r, r):
        return np.asarray(img, dtype=np.uint8)
    while min(img.size) >= 2 * r:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = r / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    a = np.asarray(img, dtype=np.uint8)
    top, left = (a.shape[0] - r) // 2, (a.shape[1] - r) // 2
    return a[top : top + r, left : left + r]


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 python batches: dicts, lists, strings, numbers and numpy arrays only.

    ``find_class`` resolves only numpy's array/dtype reconstruction functions (and latin-1 string
    encoding, which Python 3 protocol-2 pickles use for bytes); any other global
    (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError`` before anything runs.
    """

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a CIFAR-10 pickle")


def _allowed_globals() -> dict:
    try:
        from numpy._core import multiarray as ma
        from numpy._core import numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray as ma
        from numpy.core import numeric
    out = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = ma._reconstruct
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        out[(mod, "_frombuffer")] = numeric._frombuffer
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    out[("_codecs", "encode")] = _latin1_encode  # Python 3 writes bytes this way in protocol 2
    return out


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r} in a CIFAR-10 pickle")
    return text.encode("latin1")


def load_cifar_batch(data: bytes) -> np.ndarray:
    """uint8 ``[N, 3, 32, 32]`` images of one CIFAR-10 python batch (the bytes of the pickle file)."""
    batch = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(batch, dict):
        raise MetricSetupError(f"CIFAR-10 batch is a {type(batch).__name__}, expected a dict")
    x = batch.get("data", batch.get(b"data"))
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise MetricSetupError(f"CIFAR-10 batch has no uint8 [N, 3072] 'data' array (got {type(x).__name__})")
    return x.reshape(-1, 3, 32, 32)


@dataclass
class ImageSource:
    """An ordered reference image set; :meth:`chunks` yields it as uint8 ``[n, 3, R, R]``."""

    kind: str  # "folder" | "adm-npz" | "tar" | "cifar10-pickles"
    path: Path
    count: int
    resolution: int
    items: list = field(default_factory=list, repr=False)
    sha256: str | None = None  # of the source bytes; for a folder, set once chunks() has run

    @property
    def preprocessing(self) -> str:
        if self.kind == "cifar10-pickles":
            return "none: the 32x32 CIFAR-10 images as stored"
        return PREPROCESSING.format(r=self.resolution, r2=2 * self.resolution)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "sha256": self.sha256,
            "num_images": self.count,
            "resolution": self.resolution,
            "preprocessing": self.preprocessing,
        }

    def chunks(self, size: int = 256) -> Iterator[np.ndarray]:
        it = {
            "folder": self._folder,
            "tar": self._tar,
            "adm-npz": self._npz,
            "cifar10-pickles": self._cifar,
        }[self.kind]()
        buf: list[np.ndarray] = []
        for img in it:
            buf.append(img)
            if len(buf) == size:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)

    def _decode(self, data: bytes, what: str) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                return center_crop_resize(im, self.resolution).transpose(2, 0, 1)
        except Exception as e:  # noqa: BLE001 - a corrupt image names itself
            raise MetricSetupError(f"cannot decode image {what}: {type(e).__name__}: {e}") from None

    def _folder(self) -> Iterator[np.ndarray]:
        h = hashlib.sha256()
        for rel in self.items:
            data = (self.path / rel).read_bytes()
            h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
            yield self._decode(data, str(self.path / rel))
        self.sha256 = h.hexdigest()

    def _tar(self) -> Iterator[np.ndarray]:
        wanted = set(self.items)
        with tarfile.open(self.path, "r:*") as tf:
            for m in tf:
                if m.isfile() and m.name in wanted:
                    f = tf.extractfile(m)
                    yield self._decode(f.read(), f"{self.path}:{m.name}")

    def _npz(self) -> Iterator[np.ndarray]:
        with np.load(self.path, allow_pickle=False) as z:
            arr = z["arr_0"]
        for im in arr:
            if im.shape[:2] == (self.resolution, self.resolution):
                yield np.ascontiguousarray(im.transpose(2, 0, 1))
            else:
                from PIL import Image

                yield center_crop_resize(Image.fromarray(im), self.resolution).transpose(2, 0, 1)

    def _cifar(self) -> Iterator[np.ndarray]:
        for p in self.items:
            yield from load_cifar_batch(Path(p).read_bytes())


def _file_sha256(path: Path) -> str:
    from harness.metrics.extractors import file_sha256

    return file_sha256(path)


def _first_size(data: bytes, what: str) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    if w != h:
        raise MetricSetupError(f"{what} is {w}x{h}, not square: pass --resolution N (images are center-cropped to NxN)")
    return w


def _cifar_dir(path: Path) -> Path | None:
    for d in (path, path / CIFAR_DIRNAME):
        if (d / "test_batch").is_file() or (d / "data_batch_1").is_file():
            return d
    return None


def open_source(path: str | Path, resolution: int | None = None, split: str = "train") -> ImageSource:
    """The reference image source at ``path`` (see the module docstring); one-line errors for bad input."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MetricSetupError(f"--images {p}: no such file or directory")
    if resolution is not None and int(resolution) < 1:
        raise MetricSetupError(f"--resolution must be positive, got {resolution}")
    if p.is_dir():
        cdir = _cifar_dir(p)
        if cdir is not None:
            if split not in CIFAR_BATCHES:
                raise MetricSetupError(f"--split must be one of {sorted(CIFAR_BATCHES)} for CIFAR-10 pickles")
            files = [cdir / b for b in CIFAR_BATCHES[split]]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise MetricSetupError(f"{cdir}: CIFAR-10 {split} batches missing: {missing}")
            if resolution not in (None, 32):
                raise MetricSetupError("CIFAR-10 images are 32x32: drop --resolution or pass 32")
            h = hashlib.sha256()
            count = 0
            for f in files:
                data = f.read_bytes()
                h.update(data)
                count += len(load_cifar_batch(data))
            return ImageSource("cifar10-pickles", cdir, count, 32, [str(f) for f in files], h.hexdigest())
        rels = sorted(
            str(f.relative_to(p)) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if not rels:
            raise MetricSetupError(f"--images {p}: no .png/.jpg/.jpeg files (searched recursively)")
        res = resolution or _first_size((p / rels[0]).read_bytes(), str(p / rels[0]))
        return ImageSource("folder", p, len(rels), int(res), rels)
    name = p.name.lower()
    if name.endswith(".npz"):
        with np.load(p, allow_pickle=False) as z:
            if "arr_0" not in z.files:
                raise MetricSetupError(
                    f"{p} has no arr_0 image array (keys {sorted(z.files)}); for precomputed statistics use "
                    f"`bench ref import NAME --npz {p}`"
                )
            arr = z["arr_0"]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
            raise MetricSetupError(
                f"{p}: arr_0 must be uint8 [N, H, W, 3] (ADM batch format); got {arr.dtype} {arr.shape}"
            )
        if resolution is None and arr.shape[1] != arr.shape[2]:
            raise MetricSetupError(f"{p}: arr_0 images are {arr.shape[1]}x{arr.shape[2]}: pass --resolution N")
        return ImageSource("adm-npz", p, len(arr), int(resolution or arr.shape[1]), [], _file_sha256(p))
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        try:
            with tarfile.open(p, "r:*") as tf:
                members = [m.name for m in tf if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
                if not members:
                    raise MetricSetupError(f"{p}: no .png/.jpg/.jpeg members")
                res = resolution
                if res is None:
                    res = _first_size(tf.extractfile(members[0]).read(), f"{p}:{members[0]}")
        except tarfile.TarError as e:
            raise MetricSetupError(f"{p}: not a readable tar archive ({e})") from None
        return ImageSource("tar", p, len(members), int(res), members, _file_sha256(p))
    raise MetricSetupError(
        f"--images {p}: expected a folder of PNG/JPEG images, an ADM .npz batch (arr_0), a .tar/.tar.gz of images, "
        f"or a CIFAR-10 python directory ({CIFAR_DIRNAME})"
    )
