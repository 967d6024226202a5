#!/usr/bin/env bash
# Sourced (or run) by .ci/run before pytest: start a single-node Slurm and install Chromium.
# Failure to start either is not fatal: the tests that need them skip with the reason.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export DMQ_SLURM_DIR="${DMQ_SLURM_DIR:-/tmp/dmq-slurm}"
if [ "$(id -u)" = 0 ]; then
  if bash "$ROOT/ci/slurm/setup.sh"; then
    export DMQ_SLURM_STARTED=1
  else
    echo "[ci] Slurm could not be started: tests/test_executors_slurm.py will skip" >&2
  fi
  bash "$ROOT/ci/chromium.sh" || echo "[ci] Chromium could not be installed: the render test will skip" >&2
else
  echo "[ci] not root: Slurm and Chromium are not set up here (their tests skip)" >&2
fi
# the jobs of the Slurm test are small CPU jobs; bound every wait
export DMQ_SLURM_MAX_WAIT_S="${DMQ_SLURM_MAX_WAIT_S:-300}"
true
