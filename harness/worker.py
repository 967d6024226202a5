"""Worker entry: run one spec from a spec JSON file and write its ``results.json`` (never MLflow).

    python -m harness.worker --spec SPEC.json --out OUT [--device cuda] [--batch-size 64]
    torchrun --nproc_per_node N -m harness.worker --spec SPEC.json --out OUT

Under torchrun (``WORLD_SIZE`` > 1) the ranks split the run's shards and rank 0 scores
(:mod:`harness.distributed`). The gpus executor starts one of these per visible GPU with
``CUDA_VISIBLE_DEVICES`` set; the driver mirrors the results file into MLflow afterwards.
Exit status: 0 when the run is complete, 1 when it failed (the reason is in results.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.runner import RunOptions
from harness.spec import RunSpec


def load_spec(path: str | Path) -> RunSpec:
    data = json.loads(Path(path).read_text())
    return RunSpec.from_dict(data.get("spec", data))  # a bare spec dict or a results.json


def write_spec(spec: RunSpec, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.worker", description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="spec JSON (RunSpec.to_dict(), or a run's results.json)")
    p.add_argument("--out", required=True, help="the sweep's output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--inception-weights", default=None)
    a = p.parse_args(argv)
    spec = load_spec(a.spec)
    opts = RunOptions(out=Path(a.out), device=a.device, batch_size=a.batch_size, inception_weights=a.inception_weights)

    from harness.distributed import env_rank_world

    _, world, _ = env_rank_world()
    if world > 1:
        from harness.distributed import run_distributed, shutdown

        try:
            res = run_distributed(spec, opts)
        finally:
            shutdown()
        if res is None:  # not rank 0
            return 0
    else:
        from harness.runner import run_one

        res = run_one(spec, opts)
    print(f"{spec.run_name}: {res['status']}" + (f" ({res.get('error')})" if res["status"] != "complete" else ""),
          flush=True)
    return 0 if res["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
