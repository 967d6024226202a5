"""Test helper: SIGKILL a `bench run` process group while one run is part-way through sampling."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from harness.shards import ShardStore


def kill_mid_sampling(proc: subprocess.Popen, runs: Path, pattern: str, num: int,
                      timeout: float = 300) -> tuple[Path, list[int]] | None:
    """Poll ``runs`` for the run dir matching ``pattern``; once 1..all-but-one of its ``num``-image shards
    are written, SIGKILL the process group (the driver and anything it started). Returns the run dir and
    the shards done at the kill, or ``None`` if the process ended first (it is killed then anyway)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            dirs = list(runs.glob(pattern)) if runs.exists() else []
            if dirs:
                store = ShardStore(dirs[0] / "samples", num)
                done = [k for k in range(store.num_shards) if store.is_done(k)]
                if 1 <= len(done) < store.num_shards:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    return dirs[0], done
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return None
