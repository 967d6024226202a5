"""Plan-time checks: everything a sweep needs, checked before a model is loaded or a file is written.

:func:`preflight` runs every function of :data:`CHECKS` on the planned specs; the first problem
raises :class:`PreflightError`, whose message is one line naming the problem and the flag that
fixes it (``bench run`` prints it and exits 2). The checks only read: they create no directory,
no database and no probe file.

To add a check (models, extractors, reference statistics, captions...), write ``check_x(specs, options)``
that raises :class:`PreflightError` and append it to :data:`CHECKS`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from harness.spec import RunSpec

# Filesystems that hold no files of ours (kernel views, not storage).
PSEUDO_FS = {"proc", "sysfs", "devpts", "devtmpfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
             "configfs", "pstore", "bpf", "mqueue", "fusectl", "binfmt_misc", "autofs", "efivarfs", "hugetlbfs"}
RUN_MARGIN_BYTES = 16 * 2**20  # per run: grid, results, calibration facts, trajectory cache share
STORE_MARGIN_BYTES = 64 * 2**20  # the MLflow store and its migration
HTTP_TIMEOUT_S = 3.0


class PreflightError(ValueError):
    """A sweep that cannot run as given; ``str(e)`` is one line: the problem, then the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the parts held


@dataclass
class PreflightOptions:
    out: Path
    device: str = "auto"
    tracking_uri: str | None = None  # None: sqlite:///OUT/mlflow.db
    executor: str = "local"
    batch_size: int = 64
    inception_weights: str | None = None
    clip_model: str | None = None  # --clip-model DIR: clip_score/<DIR name> for text-to-image runs


# ------------------------------------------------------------------------------------------ checks


def check_counts(specs: list[RunSpec], options: PreflightOptions) -> None:
    if not specs:
        raise PreflightError("the sweep plans no runs: pass at least one --methods, --models and --bits entry")
    if options.batch_size < 1:
        raise PreflightError(f"--batch-size must be at least 1 (got {options.batch_size})")
    for s in specs:
        if s.num_samples < 1 or s.steps < 1:
            raise PreflightError(f"{s.run_name}: --num-samples and --steps must be at least 1 "
                                 f"(got {s.num_samples}, {s.steps})")
    hashes = [s.config_hash for s in specs]
    if len(set(hashes)) != len(hashes):
        raise PreflightError("the sweep lists one run twice: remove the repeated --methods/--bits/--seeds entries")


def parse_device(device: str) -> tuple[str, int | None]:
    """``("cuda", 1)`` for ``cuda:1``; raises :class:`PreflightError` on anything but auto/cpu/cuda[:N]/mps."""
    text = str(device).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise PreflightError(f"--device {device!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return kind, int(index) if index else None


def check_device(specs: list[RunSpec], options: PreflightOptions) -> None:
    kind, index = parse_device(options.device)
    if kind in ("auto", "cpu") or options.executor == "slurm":  # slurm: the device is the compute node's
        return
    import torch

    if kind == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise PreflightError("--device mps: this machine has no MPS device: use --device cpu or auto")
        return
    if not torch.cuda.is_available():
        raise PreflightError(f"--device {options.device}: no CUDA GPU is visible on this machine: "
                             "use --device cpu (or auto), or --executor slurm to run on a cluster")
    if index is not None and index >= torch.cuda.device_count():
        raise PreflightError(f"--device {options.device}: only {torch.cuda.device_count()} CUDA device(s) visible "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1}): pick one of those")


def _known_schemes() -> set[str]:
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return set(_tracking_store_registry._registry)
    except Exception:  # private API moved: the schemes MLflow has shipped for years
        return {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc"}


def check_tracking_uri(specs: list[RunSpec], options: PreflightOptions) -> None:
    uri = options.tracking_uri
    if uri is None:
        return  # sqlite:///OUT/mlflow.db: covered by check_out_dir
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0].lower()  # postgresql+psycopg2 -> postgresql
    if len(scheme) == 1:  # a Windows drive letter
        scheme = ""
    known = _known_schemes()
    if scheme not in known:
        raise PreflightError(f"--tracking-uri {uri!r}: MLflow has no store for scheme {scheme!r}: use one of "
                             f"{', '.join(sorted(s + '://' for s in known if s))} or a local path "
                             "(or leave it out for sqlite:///OUT/mlflow.db)")
    if scheme in ("http", "https"):
        host = parsed.hostname
        if not host:
            raise PreflightError(f"--tracking-uri {uri!r} names no host: use e.g. http://HOST:5000")
        port = parsed.port or (443 if scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=HTTP_TIMEOUT_S).close()
        except OSError as e:
            raise PreflightError(f"--tracking-uri {uri}: no MLflow server answers at {host}:{port} ({e}): "
                                 "start it (mlflow server) or leave --tracking-uri out for a local store") from None
    elif scheme == "sqlite":
        rest = uri.split("://", 1)[1] if "://" in uri else ""
        path = rest[1:] if rest.startswith("/") else rest  # sqlite:////abs.db -> /abs.db, sqlite:///rel.db -> rel.db
        if path not in ("", ":memory:"):  # "" and :memory: are in-memory stores
            _writable_target(Path(path), f"--tracking-uri {uri}", file_ok=True)
    elif scheme in ("", "file"):
        path = parsed.path if scheme == "file" else uri
        _writable_target(Path(path), f"--tracking-uri {uri}", file_ok=False)


def check_out_dir(specs: list[RunSpec], options: PreflightOptions) -> None:
    _writable_target(Path(options.out), f"--out {options.out}", file_ok=False)


def check_same_weights(specs: list[RunSpec], options: PreflightOptions) -> None:
    """A run directory drawn from other weights than those now at its model's path is not resumed."""
    from harness.weights_record import stale_run

    for s in specs:
        why = stale_run(s, Path(options.out) / "runs" / s.run_name)
        if why:
            raise PreflightError(f"{why}: pass a fresh --out, or delete that run directory to redo it")


def check_free_space(specs: list[RunSpec], options: PreflightOptions) -> None:
    """Refuse a sweep whose sample shards cannot fit: num_samples × H × W × 3 bytes per pending run, plus margins."""
    out = Path(options.out)
    pending = [s for s in specs if not _is_complete(s, out)]
    if not pending:
        return
    need = STORE_MARGIN_BYTES + sum(planned_bytes(s) for s in pending)
    anchor = _existing_ancestor(out.absolute())
    st = os.statvfs(anchor)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise PreflightError(f"--out {out}: {len(pending)} pending runs need about {_mb(need)} of sample shards "
                             f"and working files but {anchor} has {_mb(free)} free: free space there, pass another "
                             "--out, or lower --num-samples")


def check_metrics(specs: list[RunSpec], options: PreflightOptions) -> None:
    """Each run's feature networks take its images, their weights load, its reference statistics exist."""
    for problem in metric_problems(specs, options.inception_weights):
        raise PreflightError(problem)


def scoring_networks(spec: RunSpec, inception_weights: str | None) -> list[str]:
    """The feature networks a run is scored with: its spec's, plus Inception whenever weights are given."""
    return [spec.extractor] + (["inception"] if inception_weights and spec.extractor != "inception" else [])


def metric_problems(specs: list[RunSpec], inception_weights: str | None) -> list[str]:
    """One line per (model, extractor, reference) a run could not be scored with; no features are computed.

    Also called by a worker before it samples (the same checks on the machine that scores)."""
    from harness.metrics import MetricSetupError, check_extractor, check_reference

    problems, seen = [], set()
    for spec in specs:
        nets = scoring_networks(spec, inception_weights)
        for net in nets:
            key = (net, spec.reference, resolution(spec), spec.model)
            if key in seen:
                continue
            seen.add(key)
            try:
                check_extractor(net, inception_weights, resolution(spec))
                check_reference(spec.reference or "cifar10-test", net, inception_weights)
            except MetricSetupError as e:
                problems.append(f"{spec.model}: {e}")
    return problems


def check_captions(specs: list[RunSpec], options: PreflightOptions) -> None:
    """Each text-to-image run's caption file exists, is UTF-8 text with at least one caption, and is the
    file the spec recorded (same sha256)."""
    for problem in caption_problems(specs):
        raise PreflightError(problem)


def caption_problems(specs: list[RunSpec]) -> list[str]:
    """One line per caption file a run could not read; also called by a worker before it loads the model."""
    from harness.spec import file_sha256

    problems, seen = [], set()
    for spec in specs:
        if spec.captions is None or (spec.model, spec.captions) in seen:
            continue
        seen.add((spec.model, spec.captions))
        p = Path(spec.captions)
        fix = ("pass --captions FILE (one caption per line; image i uses line i mod N; the protocol's file is "
               "described in docs/zoo.md)")
        if not p.is_file():
            problems.append(f"{spec.model}: caption file {p} not found: {fix}")
            continue
        try:
            n = sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{spec.model}: caption file {p} cannot be read as UTF-8 text ({type(e).__name__}): {fix}")
            continue
        if n == 0:
            problems.append(f"{spec.model}: caption file {p} has no captions: {fix}")
        elif spec.captions_sha256 and file_sha256(p) != spec.captions_sha256:
            problems.append(f"{spec.model}: caption file {p} changed since the sweep was planned "
                            f"(sha256 {spec.captions_sha256[:12]} expected): restore it, or rerun bench run "
                            "with --captions FILE to plan runs for the new prompts")
    return problems


def check_clip_model(specs: list[RunSpec], options: PreflightOptions) -> None:
    """``--clip-model DIR`` loads offline (config, weights file, tokenizer, image processor) and some planned
    run is text-to-image."""
    if not options.clip_model:
        return
    from harness.metrics import MetricSetupError
    from harness.metrics.clip import check_clip_model as check_dir

    if not any(is_text_run(s) for s in specs):
        raise PreflightError(f"--clip-model {options.clip_model}: CLIP score compares text-to-image samples with "
                             "their captions, and no planned model is text-conditional: drop --clip-model or "
                             "add a text-to-image model (e.g. --models sd-v1-4)")
    try:
        check_dir(options.clip_model)
    except MetricSetupError as e:
        raise PreflightError(str(e)) from None


CHECKS: list[Callable[[list[RunSpec], PreflightOptions], None]] = [
    check_counts, check_device, check_tracking_uri, check_out_dir, check_same_weights, check_free_space, check_metrics,
    check_captions, check_clip_model,
]


def preflight(specs: list[RunSpec], options: PreflightOptions) -> None:
    """Run every check of :data:`CHECKS`; raise :class:`PreflightError` (one line) at the first problem."""
    for check in CHECKS:
        check(specs, options)


# ----------------------------------------------------------------------------------------- helpers


def is_text_run(spec: RunSpec) -> bool:
    """The run samples from captions (a text-conditional zoo entry, its miniature, or a local text pipeline)."""
    from harness.spec import is_text_conditional
    from models.registry import ZOO, at_path, local_model

    if spec.captions is not None:
        return True
    if spec.model_path is None:
        return spec.model in ZOO and ZOO[spec.model].conditioning == "text"
    model = at_path(ZOO[spec.model], spec.model_path) if spec.model in ZOO else local_model(spec.model_path)
    return is_text_conditional(model)


def decoder_factor(pipeline_dir: str | Path) -> int:
    """How many pixels a latent pipeline decodes per latent pixel (1 for a pixel-space pipeline).

    Read from the autoencoder's config (``vae/`` or ``vqvae/``): diffusers' ``Encoder`` halves the
    side once per down block but the last, so the factor is ``2 ** (len(block_out_channels) - 1)``
    (KL-f8: 4 levels, 8; VQ-f4: 3 levels, 4). Raises ``OSError``/``ValueError`` on an unreadable config."""
    import json

    for sub in ("vae", "vqvae"):
        cfg_path = Path(pipeline_dir) / sub / "config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            levels = cfg.get("block_out_channels") or cfg.get("down_block_types")
            if not levels:
                raise ValueError(f"{cfg_path} names neither block_out_channels nor down_block_types")
            return 2 ** (len(levels) - 1)
    return 1


def resolution(spec: RunSpec) -> int:
    """Side of the images a run writes: the zoo's value, or for a local pipeline its UNet's ``sample_size``
    times the autoencoder's down factor (:func:`decoder_factor`)."""
    from models.registry import ZOO

    if spec.model_path is None and spec.model in ZOO:
        return int(ZOO[spec.model].resolution)
    try:
        import json

        cfg = json.loads((Path(spec.model_path or "") / "unet" / "config.json").read_text())
        size = cfg.get("sample_size", 32)
        size = max(size) if isinstance(size, list | tuple) else int(size)
        return size * decoder_factor(spec.model_path or "")
    except (OSError, ValueError, TypeError):
        return int(ZOO[spec.model].resolution) if spec.model in ZOO else 256


def planned_bytes(spec: RunSpec) -> int:
    """Bytes of one run's shards (uint8, uncompressed npz) plus :data:`RUN_MARGIN_BYTES`."""
    side = resolution(spec)
    return spec.num_samples * side * side * 3 + RUN_MARGIN_BYTES


def _is_complete(spec: RunSpec, out: Path) -> bool:
    from harness.tracking import read_results

    res = read_results(out / "runs" / spec.run_name)
    return res is not None and res.get("status") == "complete"


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 1024:,.0f} KiB"


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (Linux /proc/self/mountinfo; "" elsewhere)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    best, fstype = "", ""
    target = str(path.resolve())
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, right.split()[0]
    return fstype


def _writable_target(path: Path, flag: str, file_ok: bool) -> None:
    """``path`` (a directory, or a file when ``file_ok``) can be created and written, without writing anything."""
    path = path.expanduser().absolute()
    if path.exists():
        if not file_ok and not path.is_dir():
            raise PreflightError(f"{flag}: {path} exists and is not a directory: name a directory")
        if file_ok and path.is_dir():
            raise PreflightError(f"{flag}: {path} is a directory: name a database file")
    anchor = _existing_ancestor(path)
    if anchor != path and not anchor.is_dir():
        raise PreflightError(f"{flag}: {anchor} is a file, so {path} cannot be created: name a path under a directory")
    fstype = _fs_type(anchor)
    if fstype in PSEUDO_FS:
        raise PreflightError(f"{flag}: {anchor} is on a {fstype} filesystem (a kernel view, not storage): "
                             "name a directory on a disk")
    try:
        readonly = bool(os.statvfs(anchor).f_flag & os.ST_RDONLY)
    except OSError:
        readonly = False
    if readonly:
        raise PreflightError(f"{flag}: {anchor} is on a read-only filesystem: name a writable directory")
    probe = anchor if anchor.is_dir() else anchor.parent
    if not os.access(probe, os.W_OK | os.X_OK) or (anchor == path and path.is_file() and not os.access(path, os.W_OK)):
        raise PreflightError(f"{flag}: {anchor} is not writable by this user: name a directory you can write")
