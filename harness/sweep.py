"""Run a sweep: skip complete runs, run the rest through an executor, mirror results into MLflow.

Order matters once: FP reference runs go first, since the paired metrics of every
quantized run read the FP samples of the same (model, protocol, seed). The driver is
the only MLflow writer; it mirrors each run's results.json as soon as the run ends,
and again (idempotently) on every rerun, so nothing is lost or duplicated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm import tqdm

from harness.runner import RunOptions, is_complete, run_dir, run_one
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


# An executor takes the specs still to run and makes their results.json appear on disk.
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
            trackers[spec.protocol].mirror(run_dir(spec, opts.out), read_results(run_dir(spec, opts.out)))
        else:
            todo.append(spec)
    fp_first = [s for s in todo if s.method == "fp"]
    rest = [s for s in todo if s.method != "fp"]
    for group in (fp_first, rest):
        if group:
            executor(group, opts, mirror)
    for tracker in trackers.values():
        tracker.finish(outcome.ok)
    return outcome
