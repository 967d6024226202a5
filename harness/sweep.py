"""Run a sweep: skip complete runs, run the rest through one executor call, mirror results into MLflow.

All pending runs go to the executor at once (one Slurm array per sweep), FP reference runs
first in the list. The paired metrics of a quantized run read the FP samples of the same
(model, protocol, seed); a run that ends before its FP reference has them filled in by the
driver (:func:`harness.runner.add_paired_metrics`) as soon as the reference finishes, and is
mirrored then. The driver is the only MLflow writer; it mirrors each run as it is final, and
again (idempotently) on every rerun, so nothing is lost or duplicated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from harness.runner import RunOptions, add_paired_metrics, is_complete, needs_paired, run_dir, run_one
from harness.spec import RunSpec
from harness.tracking import Tracker, read_results


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
        run_one(spec, opts)
        on_done(spec)


def run_sweep(
    specs: list[RunSpec], opts: RunOptions, tracking_uri: str, sweep_args: dict, executor: Executor = local_executor
) -> SweepOutcome:
    outcome = SweepOutcome()
    protocols = sorted({s.protocol for s in specs})
    trackers = {p: Tracker(tracking_uri, p, sweep_hash(specs), sweep_args) for p in protocols}

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
        if is_complete(spec, opts.out):
            outcome.skipped.append(spec.run_name)
            add_paired_metrics(spec, opts.out)  # in case the driver died before filling them in
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
                add_paired_metrics(dep, opts.out)
                mirror(dep)
            return
        ref = spec.fp_reference().config_hash
        if ref in fp_pending and needs_paired(spec, opts.out):
            waiting.setdefault(ref, []).append(spec)  # mirrored once its FP reference is done
            return
        add_paired_metrics(spec, opts.out)
        mirror(spec)

    todo.sort(key=lambda s: s.method != "fp")  # FP first: sequential executors then need no fill-in
    if todo:
        executor(todo, opts, on_done)
    for deps in waiting.values():  # the FP reference never finished: mirror what exists
        for dep in deps:
            mirror(dep)
    for tracker in trackers.values():
        tracker.finish(outcome.ok)
    return outcome
