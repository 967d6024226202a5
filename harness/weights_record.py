"""Which weights a run directory was drawn from, so a rerun never resumes samples of other weights.

A run directory is named by its spec, and a local pipeline (``--model-path DIR``, or an embedded
asset) is named by its path. Weights replaced in place at that path (a longer-trained snapshot
copied over the old one) would otherwise be resumed: the new attempt would reuse the old samples
and quantized state and score them as the new model's.

Each run directory whose model has local weights records ``weights.json`` (the directory and the
sha256 of its ``*.safetensors`` files) when the run starts; :func:`stale_run` compares it with the
weights there now. ``bench run`` refuses (exit 2, before any model is loaded) a sweep with a stale
run. Hub checkpoints (immutable revisions) and random-init models have no local weights to record.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from harness.spec import RunSpec

RECORD = "weights.json"


def weights_dir(spec: RunSpec) -> Path | None:
    """The local pipeline directory the spec's weights load from, or ``None`` (hub or random-init)."""
    if spec.model_path:
        return Path(spec.model_path).resolve()
    from models.loading import pipeline_dir
    from models.registry import get_model

    model = get_model(spec.model)
    return Path(pipeline_dir(model, None)).resolve() if model.source == "embedded" else None


def weights_digest(directory: Path) -> str:
    """sha256 over every ``*.safetensors`` file under ``directory`` (relative path and bytes, sorted by path)."""
    files = sorted(p for p in Path(directory).rglob("*.safetensors") if p.is_file())
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _digest(str(directory), stats)


@lru_cache(maxsize=32)
def _digest(directory: str, stats: tuple) -> str:  # keyed by size and mtime: a sweep hashes each file once
    h = hashlib.sha256()
    for path, _, _ in stats:
        h.update(str(Path(path).relative_to(directory)).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def record_weights(spec: RunSpec, rdir: Path) -> None:
    """Write ``rdir/weights.json`` unless it exists (the first attempt's weights are the run's)."""
    from harness.tracking import write_json_atomic

    src = weights_dir(spec)
    if src is None or (Path(rdir) / RECORD).exists():
        return
    write_json_atomic(Path(rdir) / RECORD, {"directory": str(src), "weights_sha256": weights_digest(src)})


def stale_run(spec: RunSpec, rdir: Path) -> str | None:
    """Why ``rdir`` cannot be resumed with the weights now at the spec's directory, or ``None``."""
    src = weights_dir(spec)
    path = Path(rdir) / RECORD
    if src is None or not path.is_file():
        return None
    try:
        then = json.loads(path.read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} is unreadable"
    now = weights_digest(src)
    if then == now:
        return None
    return f"{rdir} was drawn from other weights at {src} (sha256 {then[:12]} then, {now[:12]} now)"
