"""CIFAR-10 loading from whatever copy is at hand, offline first.

Sources, tried in this order by :func:`load_cifar10`:

* a folder ``<root>/<split>/<class>/*.jpg|png`` (class sub-folders),
* a ``.tar.gz`` of such a folder (e.g. ``shared/data/cifar10-jpeg.tar.gz``),
* the standard pickled batches (``cifar-10-batches-py``),
* torchvision's download (only when ``download=True`` and online).

Every load returns the images as a ``uint8`` tensor ``[N, 3, 32, 32]``, the labels, and
a :class:`DataSource` record (kind, path, sha256) that training cards and results carry,
so a number can always be traced to the exact bytes it came from.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_IMAGE_EXT = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class DataSource:
    """Where a split came from: enough to find and verify the same bytes again."""

    kind: str  # "folder" | "tar" | "pickle" | "torchvision"
    path: str
    sha256: str
    split: str
    num_images: int

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)


def _class_index(name: str) -> int:
    if name not in CLASSES:
        raise ValueError(f"unknown CIFAR-10 class folder {name!r}; expected one of {', '.join(CLASSES)}")
    return CLASSES.index(name)


def _stack(images: list[np.ndarray], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long)


def _from_folder(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    split_dir = root / split
    entries = sorted(p for p in split_dir.rglob("*") if p.suffix.lower() in _IMAGE_EXT)
    images = [_decode(p.read_bytes()) for p in entries]
    labels = [_class_index(p.parent.name) for p in entries]
    # Hash the sorted (relative path, bytes) stream: independent of filesystem order.
    h = hashlib.sha256()
    for p in entries:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    x, y = _stack(images, labels)
    return x, y, h.hexdigest()


def _from_tar(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    members: list[tuple[str, bytes]] = []
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or Path(m.name).suffix.lower() not in _IMAGE_EXT:
                continue
            # Accept "<split>/<class>/<file>" with or without a leading top folder.
            if split not in parts[:-2]:
                continue
            members.append((m.name, tar.extractfile(m).read()))
    members.sort()  # deterministic order whatever the archive order
    images = [_decode(data) for _, data in members]
    labels = [_class_index(Path(name).parent.name) for name, _ in members]
    return _stack(images, labels)


def _from_pickles(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        with open(root / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(batch["labels"])
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.long)


def load_cifar10(
    source: str | Path, split: str = "train", cache_dir: str | Path | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor, DataSource]:
    """Load one CIFAR-10 split (``train`` or ``test``) as uint8 ``[N,3,32,32]`` plus labels.

    ``cache_dir`` keeps a decoded ``.npz`` keyed by the source hash, so the JPEG decode
    (about 20 s for 50k images) happens once.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    src = Path(source)
    if src.is_dir() and (src / split).is_dir():
        x, y, digest = _from_folder(src, split)
        return x, y, DataSource("folder", str(src), digest, split, len(y))
    if src.is_dir() and (src / "data_batch_1").exists():
        x, y = _from_pickles(src, split)
        digest = hashlib.sha256(x.numpy().tobytes()).hexdigest()
        return x, y, DataSource("pickle", str(src), digest, split, len(y))
    if src.is_file() and tarfile.is_tarfile(src):
        digest = sha256_file(src)
        cached = Path(cache_dir) / f"cifar10-{split}-{digest[:16]}.npz" if cache_dir else None
        if cached is not None and cached.exists():
            data = np.load(cached)
            x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
        else:
            x, y = _from_tar(src, split)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cached, x=x.numpy(), y=y.numpy())
        return x, y, DataSource("tar", str(src), digest, split, len(y))
    if download:
        import torchvision

        ds = torchvision.datasets.CIFAR10(str(src), train=split == "train", download=True)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor(ds.targets, dtype=torch.long)
        digest = hashlib.sha256(x.numpy().tobytes()).hexdigest()
        return x, y, DataSource("torchvision", str(src), digest, split, len(y))
    raise FileNotFoundError(
        f"no CIFAR-10 found at {src}: give a folder with {split}/<class>/ images, a .tar.gz of one, "
        "a cifar-10-batches-py folder, or pass --download when online"
    )
