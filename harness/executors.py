"""Executors: how a sweep's pending runs get done.

An executor is ``fn(specs, opts, on_done)``: it makes each spec's ``results.json`` appear and
calls ``on_done(spec)`` in the driver process as each run ends (the driver is the only MLflow
writer, see harness/sweep.py).

* ``local``: in this process, one run after another.
* ``gpus``: one worker process per visible GPU (``python -m harness.worker`` with
  ``CUDA_VISIBLE_DEVICES`` set to that GPU); a GPU takes the next run as soon as it is free.
* ``slurm``: one array job per sweep through submitit (``map_array``), partition, time, GPUs and
  array parallelism as options. Each task is :class:`SlurmTask` (submitit ``Checkpointable``):
  on preemption or timeout submitit requeues it and the run resumes from its last complete
  shard. The driver polls the jobs with a bounded wait and mirrors each one as it finishes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import click

from harness.runner import RunOptions, run_one
from harness.spec import RunSpec
from harness.sweep import Executor, local_executor

POLL_S = 1.0


def make_executor(name: str, out_dir: Path | None = None, partition: str | None = None, time_minutes: int = 240,
                  gpus: int = 1, parallelism: int = 16, **options) -> Executor:
    if name == "local":
        return local_executor
    if name == "gpus":
        ids = visible_gpus()
        if not ids:
            raise click.UsageError("--executor gpus: no visible GPU (CUDA_VISIBLE_DEVICES / torch.cuda): "
                                   "use --executor local, or --executor slurm to run on a cluster")
        return GpuExecutor(ids)
    if name == "slurm":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise click.UsageError("--executor slurm needs submitit: pip install submitit") from None
        return SlurmExecutor(partition=partition, time_minutes=time_minutes, gpus=gpus, parallelism=parallelism,
                             **options)
    raise click.UsageError(f"unknown executor {name!r}: use local, gpus or slurm")


# --------------------------------------------------------------------------------------------- gpus


def visible_gpus() -> list[str]:
    """GPU ids a worker can be pinned to: ``CUDA_VISIBLE_DEVICES`` when set (the ids are taken as given),
    else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [x.strip() for x in env.split(",") if x.strip() and x.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def _job_paths(spec: RunSpec, out: Path) -> tuple[Path, Path]:
    d = Path(out) / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{spec.config_hash}.json", d / f"{spec.config_hash}.log"


class GpuExecutor:
    """One ``python -m harness.worker`` process per GPU; the next pending run goes to the first free GPU."""

    def __init__(self, gpu_ids: list[str]) -> None:
        self.gpu_ids = gpu_ids

    def __call__(self, specs: list[RunSpec], opts: RunOptions, on_done: Callable[[RunSpec], None]) -> None:
        from harness.worker import write_spec

        queue = list(specs)
        running: dict[str, tuple[subprocess.Popen, RunSpec, object]] = {}
        device = "cuda" if str(opts.device).startswith("cuda") else str(opts.device)
        try:
            while queue or running:
                for gpu in self.gpu_ids:
                    if gpu in running or not queue:
                        continue
                    spec = queue.pop(0)
                    spec_file, log_file = _job_paths(spec, opts.out)
                    write_spec(spec, spec_file)
                    cmd = [sys.executable, "-m", "harness.worker", "--spec", str(spec_file), "--out", str(opts.out),
                           "--device", device, "--batch-size", str(opts.batch_size)]
                    if opts.inception_weights:
                        cmd += ["--inception-weights", str(opts.inception_weights)]
                    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
                    log = open(log_file, "ab")  # noqa: SIM115 (closed when the worker ends)
                    click.echo(f"[gpu {gpu}] {spec.run_name} (log: {log_file})")
                    running[gpu] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), spec, log)
                time.sleep(POLL_S / 4)
                for gpu, (proc, spec, log) in list(running.items()):
                    if proc.poll() is not None:
                        log.close()
                        del running[gpu]
                        on_done(spec)
        finally:
            for proc, _, log in running.values():  # interrupted: stop our workers; a rerun resumes them
                proc.terminate()
                proc.wait(timeout=30)
                log.close()


# -------------------------------------------------------------------------------------------- slurm

try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a dependency
    _Checkpointable = object


class SlurmTask(_Checkpointable):
    """One run inside a Slurm job. Requeued as is on preemption/timeout (submitit's checkpoint):
    the run resumes from its files (quantized model, complete shards)."""

    def __call__(self, spec: dict, opts: dict) -> str:
        import torch

        opts = dict(opts)
        if opts.get("device") == "auto":
            opts["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(int(cpus))
        res = run_one(RunSpec.from_dict(spec), RunOptions(**{**opts, "out": Path(opts["out"])}))
        return res["status"]


class SlurmExecutor:
    """All pending runs of a call as one submitit array job; mirrors each as it ends (bounded wait)."""

    def __init__(self, partition: str | None = None, time_minutes: int = 240, gpus: int = 1, parallelism: int = 16,
                 cpus_per_task: int | None = None, max_wait_s: float | None = None, poll_s: float = POLL_S,
                 log: Callable[[str], None] = click.echo) -> None:
        self.partition = partition
        self.time_minutes = time_minutes
        self.gpus = gpus
        self.parallelism = parallelism
        env_cpus = os.environ.get("DMQ_SLURM_CPUS_PER_TASK")
        self.cpus_per_task = cpus_per_task or (int(env_cpus) if env_cpus else None)
        env_wait = os.environ.get("DMQ_SLURM_MAX_WAIT_S")
        # queueing + the job's time limit + one requeue, unless told otherwise
        self.max_wait_s = max_wait_s or (float(env_wait) if env_wait else 2 * time_minutes * 60 + 600)
        self.poll_s = poll_s
        self.log = log

    def executor(self, folder: Path):
        import submitit

        ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
        params = dict(timeout_min=self.time_minutes, slurm_array_parallelism=self.parallelism, name="dmqbench",
                      tasks_per_node=1, nodes=1, stderr_to_stdout=True,
                      slurm_additional_parameters={"requeue": True})
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        ex.update_parameters(**params)
        return ex

    def __call__(self, specs: list[RunSpec], opts: RunOptions, on_done: Callable[[RunSpec], None]) -> None:
        folder = Path(opts.out).resolve() / "slurm"
        ex = self.executor(folder)
        o = asdict(opts)
        o["out"] = str(Path(opts.out).resolve())
        if self.gpus:
            o["device"] = "auto"  # decided on the compute node
        jobs = ex.map_array(SlurmTask(), [s.to_dict() for s in specs], [o] * len(specs))
        self.log(f"slurm: submitted {len(jobs)} array tasks ({jobs[0].job_id.split('_')[0]}), logs in {folder}")
        pending = {j.job_id: (j, s) for j, s in zip(jobs, specs)}
        deadline = time.monotonic() + self.max_wait_s
        try:
            while pending:
                for jid, (job, spec) in list(pending.items()):
                    if not job.done():
                        continue
                    del pending[jid]
                    try:
                        status = job.result()
                        self.log(f"slurm: {jid} {spec.run_name}: {status}")
                    except Exception as e:  # FailedJobError / UncompletedJobError: mirror records what exists
                        self.log(f"slurm: {jid} {spec.run_name}: job ended without a result "
                                 f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''})")
                    on_done(spec)
                if not pending:
                    break
                if time.monotonic() > deadline:
                    self.log(f"slurm: gave up waiting after {self.max_wait_s:.0f} s for "
                             f"{', '.join(pending)}; they keep running: rerun the same command to collect them")
                    for _, spec in pending.values():
                        on_done(spec)  # mirrors what is there; a missing results.json counts as failed
                    break
                time.sleep(self.poll_s)
        except KeyboardInterrupt:
            self.log(f"slurm: interrupted; jobs {', '.join(pending)} keep running (scancel them, or rerun to collect)")
            raise
