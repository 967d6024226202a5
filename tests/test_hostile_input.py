"""Hostile input to ``bench run``: every bad value exits 2 with ONE line on stderr naming the problem and
the flag, before anything is written (no OUT directory, no mlflow.db, no ./mlruns); repeated list entries
are one run and the printed counts match the planned runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.preflight import PreflightError, PreflightOptions, preflight
from harness.spec import SpecError, expand

BASE = ["--models", "tiny-random", "--methods", "fp,rtn", "--bits", "w8a8", "--num-samples", "8", "--steps", "2"]


def _run_cli(tmp_path: Path, *args: str):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # MLflow would put ./mlruns here: it must not appear either
    try:
        return CliRunner().invoke(main, ["run", *args])
    finally:
        os.chdir(cwd)


def _assert_refused(result, tmp_path: Path, out: Path, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no usage block, no traceback
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("args, needles", [
    (["--num-samples", "0"], ["--num-samples", "at least 1"]),
    (["--num-samples", "-5"], ["--num-samples"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--num-samples", "abc"], ["--num-samples"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--seeds", "-1"], ["--seeds"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--device", "cuda:x"], ["--device"]),
    (["--tracking-uri", "foo://bar"], ["--tracking-uri", "foo"]),
    (["--tracking-uri", "http://127.0.0.1:9"], ["--tracking-uri", "127.0.0.1:9"]),
    (["--bits", "w8a8,w9a8"], ["w9a8"]),
])
def test_bad_value_one_line_exit_2_nothing_written(tmp_path, args, needles):
    out = tmp_path / "out"
    _assert_refused(_run_cli(tmp_path, *BASE, *args, "--out", str(out)), tmp_path, out, *needles)


def test_cuda_without_gpu_is_refused_before_the_store(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    _assert_refused(_run_cli(tmp_path, *BASE, "--device", "cuda", "--out", str(out)), tmp_path, out,
                    "--device cuda", "--device cpu")


def test_out_that_cannot_hold_a_sweep(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out, needle in [(a_file, "not a directory"), (a_file / "sub", "is a file"), (Path("/proc/dmq-out"), "proc")]:
        result = _run_cli(tmp_path, *BASE, "--out", str(out))
        assert result.exit_code == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "mlruns").exists()
    assert a_file.read_text() == "x"


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_read_only_and_full_filesystems_are_refused_early(tmp_path):
    ro, small = tmp_path / "ro", tmp_path / "small"
    if not _mount_tmpfs(ro, "ro,size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert _mount_tmpfs(small, "size=1m")
        try:
            result = _run_cli(tmp_path, *BASE, "--out", str(ro / "out"))
            assert result.exit_code == 2 and "read-only" in result.stderr, result.output
            # 8 samples fit in 1 MiB, but the store and working files of two runs do not: refused before writing
            result = _run_cli(tmp_path, *BASE, "--out", str(small / "out"))
            assert result.exit_code == 2 and "free" in result.stderr and "--num-samples" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1 and not (small / "out").exists()
        finally:
            subprocess.run(["umount", str(small)])
    finally:
        subprocess.run(["umount", str(ro)])


def test_real_process_prints_one_line(tmp_path):
    """The console entry point itself (not CliRunner): exit 2, one stderr line, nothing written."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", *BASE, "--tracking-uri", "foo://bar",
                        "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not (tmp_path / "mlruns").exists()


def test_zero_is_not_the_default():
    with pytest.raises(SpecError, match="--num-samples"):
        expand("fp", "tiny-random", "w8a8", [0], "smoke", None, "uniform", 0, 2)
    with pytest.raises(SpecError, match="--steps"):
        expand("fp", "tiny-random", "w8a8", [0], "smoke", None, "uniform", 8, 0)
    from harness.spec import PROTOCOLS

    specs = expand("fp", "tiny-random", "w8a8", [0], "smoke", None, "uniform", None, None)
    smoke = PROTOCOLS["smoke"]
    assert (specs[0].num_samples, specs[0].steps) == (smoke.num_samples, smoke.steps)  # None means the protocol's


def test_repeated_entries_are_one_run():
    specs = expand("fp,rtn,rtn", "tiny-random,tiny-random", "w8a8,w8a8,W8A8", [0, 0], "smoke", None, "uniform", 8, 2)
    assert [(s.method, s.bits) for s in specs] == [("fp", "fp"), ("rtn", "w8a8")]
    assert len({s.config_hash for s in specs}) == len(specs)


def test_preflight_is_importable_and_extensible(tmp_path):
    specs = expand("fp", "tiny-random", "w8a8", [0], "smoke", None, "uniform", 8, 2)
    preflight(specs, PreflightOptions(out=tmp_path / "out"))  # passes, writes nothing
    assert not (tmp_path / "out").exists()
    with pytest.raises(PreflightError) as e:
        preflight(specs, PreflightOptions(out=tmp_path / "out", device="tpu"))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_duplicate_bits_print_the_planned_count(tmp_path):
    out = tmp_path / "out"
    result = _run_cli(tmp_path, *BASE[:-4], "--bits", "w8a8,w8a8", "--num-samples", "8", "--steps", "2",
                      "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "2 runs" in result.stdout and "done: 2 ran, 0 already complete, 0 failed" in result.stdout
    assert len(list(out.glob("runs/tiny-random/*/results.json"))) == 2


@pytest.mark.parametrize("layout, needle", [
    ({"unet/diffusion_pytorch_model.safetensors": b"x"}, "no unet/config.json"),  # weights without a config
    ({"unet/config.json": b"{}", "unet/diffusion_pytorch_model.bin": b"x"}, "no unet/*.safetensors"),  # pickle only
    ({"model_index.json": b"{}"}, "no unet/config.json"),
])
def test_incomplete_model_path_is_refused_before_work(tmp_path, layout, needle):
    """A --model-path directory that cannot load (a bare weights snapshot, pickle-only weights) exits 2
    in one line before anything is written, instead of failing every run after the sweep starts."""
    pipe = tmp_path / "pipe"
    for rel, data in layout.items():
        (pipe / rel).parent.mkdir(parents=True, exist_ok=True)
        (pipe / rel).write_bytes(data)
    out = tmp_path / "out"
    result = _run_cli(tmp_path, *BASE, "--model-path", str(pipe), "--out", str(out))
    _assert_refused(result, tmp_path, out, "--model-path", needle, "save_pretrained")
