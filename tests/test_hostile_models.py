"""Hostile model files: a NaN-weights pipeline fails its run naming NaN and the layer (no score is shown),
and a pickle planted where a run keeps its quantized state is never unpickled: the file is moved aside
and the run calibrates again."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from models.registry import TINY_RANDOM_UNET

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))


def _bench(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], env=_env(), capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_nan_weights_fail_the_run_naming_nan_and_the_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_RANDOM_UNET)
    with torch.no_grad():
        unet.down_blocks[1].resnets[0].conv1.weight.fill_(float("nan"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "nan")
    out = tmp_path / "out"
    r = _bench("run", "--methods", "fp", "--model-path", str(tmp_path / "nan"), "--num-samples", "4", "--steps", "2",
               "--out", str(out))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    (res_path,) = out.glob("runs/*/fp-*/results.json")
    res = json.loads(res_path.read_text())
    assert res["status"] == "failed" and res["metrics"] == {}
    assert "NaN" in res["error"] and "down_blocks.1.resnets.0.conv1" in res["error"], res["error"]
    assert not list(out.glob("runs/*/fp-*/samples/*.npz"))  # failed before a single sample was drawn
    board = _bench("leaderboard", "--out", str(out), "--dest", str(tmp_path / "board"))
    assert board.returncode != 0 and "no complete runs" in board.stderr + board.stdout  # nothing to rank


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_pickle_in_place_of_the_quantized_state_is_not_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("run", "--methods", "fp,rtn", "--models", "tiny-random", "--bits", "w8a8", "--num-samples", "4",
            "--steps", "2", "--out", str(out))
    (tmp_path / "cwd").mkdir()
    first = _bench(*args, cwd=tmp_path / "cwd")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert not (tmp_path / "cwd" / "mlruns").exists() and (out / "mlartifacts").is_dir()  # nothing outside --out
    (rdir,) = out.glob("runs/tiny-random/rtn-*")
    saved = rdir / "quantized.safetensors"
    assert saved.is_file()
    samples = {p.name: p.read_bytes() for p in (rdir / "samples").glob("*.npz")}
    marker = tmp_path / "payload-ran"
    saved.write_bytes(pickle.dumps(_Payload(marker)))  # an earlier run's file, replaced by an attacker
    (rdir / "results.json").unlink()
    shutil.rmtree(rdir / "samples")

    again = _bench(*args)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert not marker.exists(), "the planted pickle was executed"
    assert (rdir / "quantized.safetensors.corrupt").is_file()  # moved aside, named in the log
    assert "quantized.safetensors did not load" in again.stdout + again.stderr
    assert json.loads((rdir / "results.json").read_text())["status"] == "complete"
    assert {p.name: p.read_bytes() for p in (rdir / "samples").glob("*.npz")} == samples  # recalibrated, same
