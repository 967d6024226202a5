"""Run a sweep: skip complete runs, run the rest through one executor call, mirror results into MLflow.

All pending runs go to the executor at once (one Slurm array per sweep), FP reference runs
first in the list. The paired metrics of a quantized run read the FP samples of the same
(model, protocol, seed); a run that ends before its FP reference has them filled in by the
driver (:func:`harness.runner.add_paired_metrics`) as soon as the reference finishes, and is
mirrored then. The driver is the only MLflow writer; it mirrors each run as it is final, and
again (idempotently) on every rerun, so nothing is lost or duplicated.

The driver holds a lock on ``--out`` (``OUT/.bench.lock``, :func:`sweep_lock`) for the whole sweep,
so the MLflow store is created and migrated once and a child run is looked up and created by one
process at a time; a second sweep on the same directory stops at once with :class:`SweepLocked`
(exit 2, naming the holder's pid). Workers (gpus, Slurm, torchrun) never take it: they only write
``results.json`` files. A ``results.json`` that says complete while its sample shards are missing
or damaged is not trusted: it is renamed ``results.json.untrusted`` and the run is made again.
An interrupted sweep (Ctrl-C) ends its parent run KILLED.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm import tqdm

from harness.runner import RunOptions, add_paired_metrics, is_complete, needs_paired, run_dir, run_one
from harness.shards import ShardStore
from harness.spec import RunSpec
from harness.tracking import RESULTS, Tracker, prepare_store, read_results
from models.atomic import DiskFullError, write_text_atomic

LOCK_NAME = ".bench.lock"
OWNER_NAME = ".bench.lock.owner"


class SweepLocked(RuntimeError):
    """Another sweep holds the ``--out`` lock; ``str(e)`` is one line naming its pid."""


@contextlib.contextmanager
def sweep_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.bench.lock`` (an OS file lock, released when the process dies however it dies).

    Raises :class:`SweepLocked` at once when another process holds it. ``OUT/.bench.lock.owner``
    says who holds it (pid, host, start time), for the message.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_NAME))
    owner = out / OWNER_NAME
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = ""
        for _ in range(20):  # the holder writes its owner file right after taking the lock
            try:
                info = json.loads(owner.read_text())
                who = f"pid {info['pid']} on {info['host']}, since {info['since']}"
                break
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        raise SweepLocked(f"--out {out} is in use by another bench run ({who or 'pid unknown'}): wait for it to "
                          f"finish (rerunning then resumes), or pass another --out") from None
    try:
        write_text_atomic(owner, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def trusted_complete(spec: RunSpec, out: Path) -> bool:
    """``is_complete``, and its sample shards all exist and are intact; a complete ``results.json``
    without them is renamed ``results.json.untrusted`` (kept, not deleted) so the run is made again."""
    if not is_complete(spec, out):
        return False
    store = ShardStore(run_dir(spec, out) / "samples", spec.num_samples)
    store.verify()  # damaged shards -> *.corrupt
    if store.complete:
        return True
    res = run_dir(spec, out) / RESULTS
    os.replace(res, res.with_name(RESULTS + ".untrusted"))
    return False


@dataclass
class SweepOutcome:
    completed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def sweep_hash(specs: list[RunSpec]) -> str:
    return hashlib.sha256(",".join(sorted(s.config_hash for s in specs)).encode()).hexdigest()[:16]


# An executor takes the specs still to run and makes their results.json appear on disk,
# calling on_done(spec) in this process as each one ends.
# local: in this process, one after another (harness/executors.py adds gpus and slurm).
Executor = Callable[[list[RunSpec], RunOptions, Callable[[RunSpec], None]], None]


def local_executor(specs: list[RunSpec], opts: RunOptions, on_done: Callable[[RunSpec], None]) -> None:
    for spec in tqdm(specs, desc="sweep", unit="run"):
        res = run_one(spec, opts)
        on_done(spec)
        error = str(res.get("error", ""))
        if error.startswith(f"{DiskFullError.__name__}: "):  # the next runs would fail the same way: stop here
            raise DiskFullError("", 0, message=error.removeprefix(f"{DiskFullError.__name__}: "))


def run_sweep(
    specs: list[RunSpec], opts: RunOptions, tracking_uri: str, sweep_args: dict, executor: Executor = local_executor
) -> SweepOutcome:
    """Run the sweep under the ``--out`` lock (:class:`SweepLocked` if another sweep holds it)."""
    specs = list({s.config_hash: s for s in specs}.values())  # one run per spec, however often it was listed
    with sweep_lock(opts.out):
        note = prepare_store(tracking_uri)  # created and migrated once, under the lock
        if note:
            tqdm.write(f"bench: {note}", file=sys.stderr)
        return _run_locked(specs, opts, tracking_uri, sweep_args, executor)


def _run_locked(specs: list[RunSpec], opts: RunOptions, tracking_uri: str, sweep_args: dict,
                executor: Executor) -> SweepOutcome:
    outcome = SweepOutcome()
    protocols = sorted({s.protocol for s in specs})
    trackers = {p: Tracker(tracking_uri, p, sweep_hash(specs), sweep_args) for p in protocols}
    try:
        _drive(specs, opts, executor, trackers, outcome)
    except KeyboardInterrupt:
        _finish_all(trackers, False, "KILLED")
        raise
    except BaseException:
        _finish_all(trackers, False, "FAILED")
        raise
    _finish_all(trackers, outcome.ok)
    return outcome


def _finish_all(trackers: dict[str, Tracker], ok: bool, status: str | None = None) -> None:
    for tracker in trackers.values():
        try:
            tracker.finish(ok, status)
        except Exception:  # the store itself may be what failed (disk full): the runs' files are kept
            if status is None:
                raise


def _drive(specs: list[RunSpec], opts: RunOptions, executor: Executor, trackers: dict[str, Tracker],
           outcome: SweepOutcome) -> None:
    def mirror(spec: RunSpec) -> None:
        res = read_results(run_dir(spec, opts.out))
        if res is None:
            outcome.failed.append((spec.run_name, "no results.json was written (worker died?)"))
            return
        trackers[spec.protocol].mirror(run_dir(spec, opts.out), res)
        if res["status"] == "complete":
            outcome.completed.append(spec.run_name)
        else:
            outcome.failed.append((spec.run_name, res.get("error", res["status"])))

    todo = []
    for spec in specs:
        if trusted_complete(spec, opts.out):
            outcome.skipped.append(spec.run_name)
            add_paired_metrics(spec, opts.out, opts)  # in case the driver died before filling them in
            trackers[spec.protocol].mirror(run_dir(spec, opts.out), read_results(run_dir(spec, opts.out)))
        else:
            todo.append(spec)

    fp_pending = {s.config_hash for s in todo if s.method == "fp"}
    waiting: dict[str, list[RunSpec]] = {}  # FP config hash -> runs that ended before it

    def on_done(spec: RunSpec) -> None:
        if spec.method == "fp":
            fp_pending.discard(spec.config_hash)
            mirror(spec)
            for dep in waiting.pop(spec.config_hash, []):
                add_paired_metrics(dep, opts.out, opts)
                mirror(dep)
            return
        ref = spec.fp_reference().config_hash
        if ref in fp_pending and needs_paired(spec, opts.out):
            waiting.setdefault(ref, []).append(spec)  # mirrored once its FP reference is done
            return
        add_paired_metrics(spec, opts.out, opts)
        mirror(spec)

    todo.sort(key=lambda s: s.method != "fp")  # FP first: sequential executors then need no fill-in
    if todo:
        executor(todo, opts, on_done)
    for deps in waiting.values():  # the FP reference never finished: mirror what exists
        for dep in deps:
            mirror(dep)
