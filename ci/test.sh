#!/usr/bin/env bash
# The project's one test command (README): install, start test services, run the suite,
# then the embedded smoke benchmark and the regression gate against the committed baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

python -m pip install -q -e ".[test]"
python -m pip install -q -e ".[compvis-test]" && python -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5 taming-transformers-rom1504==0.0.6  # original CompVis ldm/taming modules for tests/test_convert_compvis.py (--no-deps: skips their training-only deps: pytorch-lightning, open-clip-torch, transformers, opencv, ...)

# Optional services for the Slurm and Chromium tests (skipped with a reason when absent).
# shellcheck disable=SC1091
set +u; source .ci/run.d/slurm.sh; set -u
stop_services() { bash .ci/run.d/slurm-stop.sh || true; }
trap stop_services EXIT

ruff check .
python -m pytest -q -rs

# The embedded benchmark under the smoke protocol, gated by the committed baseline.
out="${DMQ_CI_OUT:-$(mktemp -d)/smoke}"
time bench run --out "$out"  # its wall time in the log: the default run is meant to take at most 4 minutes on 2 cores
bench regress --out "$out" --baseline results/baselines/smoke.json
