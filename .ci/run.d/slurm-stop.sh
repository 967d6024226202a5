#!/usr/bin/env bash
# Run by .ci/run after pytest: stop the daemons ci/slurm/setup.sh started (by their recorded pids).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$ROOT/ci/slurm/teardown.sh" "$@" || true
