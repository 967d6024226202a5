"""Executors: how a sweep's pending runs get done (local for now; gpus and slurm in progress)."""

from __future__ import annotations

from harness.sweep import Executor, local_executor


def make_executor(name: str, **options) -> Executor:
    if name == "local":
        return local_executor
    raise NotImplementedError(f"executor {name!r} is not implemented yet: use --executor local")
