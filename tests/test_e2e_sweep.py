"""End to end through the CLI: a tiny sweep, its files, its MLflow store, resume, bad input, local models."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from harness.cli import main
from models.registry import TINY_RANDOM_UNET

ARGS = ["--models", "tiny-random", "--bits", "w8a8,w4a8", "--num-samples", "8", "--steps", "4"]


def _bench(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    result = _bench("run", "--methods", "fp,rtn", *ARGS, "--out", str(out))
    return out, result


def test_sweep_writes_results_and_mlflow(sweep):
    out, result = sweep
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("runs/tiny-random/*/results.json"))
    assert len(files) == 3  # fp once, rtn at two bit-widths
    for f in files:
        res = json.loads(f.read_text())
        assert {"spec", "config_hash", "seeds", "versions", "git_revision", "timings", "metrics", "status"} <= set(res)
        assert res["status"] == "complete"
        assert {"fid/cifarnet", "is/cifarnet", "sfid/cifarnet", "kid/cifarnet", "paired/mse", "paired/psnr",
                "paired/eps_mse"} <= set(res["metrics"])
        assert (f.parent / "samples_grid.png").exists()
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["dmqbench-smoke"], filter_string="tags.kind = 'run'")
    assert sorted(zip(runs["tags.method"], runs["tags.bits"])) == [("fp", "fp"), ("rtn", "w4a8"), ("rtn", "w8a8")]
    assert (runs["tags.model"] == "tiny-random").all()
    assert runs["metrics.fid/cifarnet"].notna().all()
    fp = runs[runs["tags.method"] == "fp"].iloc[0]
    assert fp["metrics.paired/mse"] == 0.0
    w4 = runs[runs["tags.bits"] == "w4a8"].iloc[0]
    w8 = runs[runs["tags.bits"] == "w8a8"].iloc[0]
    assert w4["metrics.paired/eps_mse"] > w8["metrics.paired/eps_mse"] > 0  # fewer bits, larger error
    parents = mlflow.search_runs(experiment_names=["dmqbench-smoke"], filter_string="tags.kind = 'sweep'")
    assert len(parents) == 1 and (runs["tags.mlflow.parentRunId"] == parents["run_id"][0]).all()


def test_rerun_does_no_new_work_and_no_duplicates(sweep):
    out, _ = sweep
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/shard-*.npz")}
    result = _bench("run", "--methods", "fp,rtn", *ARGS, "--out", str(out))
    assert result.exit_code == 0
    assert "0 ran, 3 already complete" in result.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/**/shard-*.npz")} == before
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    assert len(mlflow.search_runs(experiment_names=["dmqbench-smoke"], filter_string="tags.kind = 'run'")) == 3


def test_method_args_variant_is_a_row_of_its_own(sweep, tmp_path):
    """--method-args end to end: recorded in the spec and hash, calibrates differently, shown as rtn[...]."""
    out, _ = sweep
    result = _bench("run", "--methods", "rtn", *ARGS, "--bits", "w4a8", "--method-args", "rtn:calib_images=2",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "1 ran, 1 already complete" in result.output  # FP reused; the variant is a new run
    every = [json.loads(f.read_text()) for f in out.glob("runs/tiny-random/*/results.json")]
    runs = {(r["spec"].get("variant"), r["spec"]["bits"]): r for r in every if r["spec"]["method"] == "rtn"}
    variant, plain = runs[("calib_images=2", "w4a8")], runs[(None, "w4a8")]
    assert variant["spec"]["method_config"]["calib_images"] == 2 != plain["spec"]["method_config"]["calib_images"]
    assert variant["config_hash"] != plain["config_hash"]
    # fewer calibration trajectories -> other activation ranges -> other samples
    assert variant["metrics"]["paired/mse"] != plain["metrics"]["paired/mse"]
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    tagged = mlflow.search_runs(experiment_names=["dmqbench-smoke"], filter_string="tags.variant = 'calib_images=2'")
    assert len(tagged) == 1
    result = _bench("leaderboard", "--out", str(out), "--dest", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert set(pd.read_csv(tmp_path / "leaderboard.csv")["method"]) == {"fp", "rtn", "rtn[calib_images=2]"}


def test_leaderboard_writes_markdown_and_csv(sweep, tmp_path):
    out, _ = sweep
    result = _bench("leaderboard", "--out", str(out), "--dest", str(tmp_path))
    assert result.exit_code == 0, result.output
    md = (tmp_path / "leaderboard.md").read_text()
    assert "## tiny-random" in md and "`fid/cifarnet`" in md and "| rtn" in md and "w4a8" in md
    csv = pd.read_csv(tmp_path / "leaderboard.csv")
    assert {"fp", "rtn"} <= set(csv["method"])
    assert "| fp" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "nosuch"], "Known methods: "),
        (["--methods", "rtn", "--bits", "w4"], "wXaY"),
        (["--methods", "rtn", "--models", "nosuch"], "Known models"),
        (["--methods", "rtn", "--protocol", "nosuch"], "unknown protocol"),
        (["--methods", "rtn", "--inception-weights", "/no/such/weights.pth"], "/no/such/weights.pth"),
        (["--methods", "rtn", "--method-args", "rtn:calib_imgs=4"], "did you mean calib_images?"),
        (["--methods", "rtn", "--method-args", "rtn:calib_images=four"], "expected int"),
        (["--methods", "rtn", "--method-args", "tdq:hidden=4"], "add it to --methods"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", *args, "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_local_class_conditional_pipeline_directory(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_RANDOM_UNET, num_class_embeds=10)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    result = _bench("run", "--methods", "fp,rtn", "--model-path", str(tmp_path / "pipe"), "--bits", "w8a8",
                    "--num-samples", "4", "--steps", "3", "--out", str(out))
    assert result.exit_code == 0, result.output
    res = [json.loads(p.read_text()) for p in Path(out).glob("runs/*/*/results.json")]
    assert len(res) == 2 and all(r["status"] == "complete" for r in res)
    assert all(r["spec"]["model_path"] == str((tmp_path / "pipe").resolve()) for r in res)


def test_weights_replaced_in_place_are_not_resumed(tmp_path):
    """A --model-path whose weights were overwritten since OUT was drawn: the rerun is refused (exit 2,
    nothing touched) instead of scoring the old samples as the new model's; the same weights saved
    again (new mtime, same bytes) resume as before."""
    pipe, out = tmp_path / "pipe", tmp_path / "out"

    def save(seed):
        torch.manual_seed(seed)
        DDPMPipeline(unet=UNet2DModel(**TINY_RANDOM_UNET), scheduler=DDPMScheduler()).save_pretrained(pipe)

    args = ("run", "--methods", "fp", "--model-path", str(pipe), "--bits", "w8a8", "--num-samples", "4",
            "--steps", "2", "--out", str(out))
    save(0)
    assert _bench(*args).exit_code == 0
    (res_path,) = out.glob("runs/*/*/results.json")
    before = res_path.read_bytes()
    assert json.loads((res_path.parent / "weights.json").read_text())["directory"] == str(pipe.resolve())
    save(1)
    refused = _bench(*args)
    assert refused.exit_code == 2, refused.output
    assert "other weights" in refused.output and str(res_path.parent) in refused.output
    assert "Traceback" not in refused.output and res_path.read_bytes() == before
    save(0)
    again = _bench(*args)
    assert again.exit_code == 0 and "1 already complete" in again.output, again.output


def test_training_curve_from_snapshot_sweeps(tmp_path):
    """models/card.py --curve: one FP + RTN W4A8 sweep per training snapshot -> curve.json, figure, card table."""
    from models.card import _curve_lines, collect_curve, plot_curve, segment_threads

    assert segment_threads({"hardware": "CPU (x86_64, 12 threads)"}) == 12 and segment_threads({}) == 1
    outs = []
    for steps in (10, 30):  # two "snapshots" (random weights): the card orders them by training steps
        torch.manual_seed(steps)
        pipe = tmp_path / f"snap{steps}"
        DDPMPipeline(unet=UNet2DModel(**TINY_RANDOM_UNET), scheduler=DDPMScheduler()).save_pretrained(pipe)
        segments = [{"wall_seconds": 1800.0, "hardware": "CPU (x86_64, 2 threads)"}] * (steps // 10)
        (pipe / "training.json").write_text(json.dumps({"steps": steps, "segments": segments}))
        out = tmp_path / f"out{steps}"
        result = _bench("run", "--methods", "rtn", "--model-path", str(pipe), "--bits", "w4a8",
                        "--num-samples", "4", "--steps", "2", "--out", str(out))
        assert result.exit_code == 0, result.output
        outs.append(out)
    curve = collect_curve(outs[::-1])
    assert [p["steps"] for p in curve["points"]] == [10, 30] and curve["protocol"]["num_samples"] == 4
    rtn = curve["points"][0]["rtn_w4a8"]
    assert rtn["fid_fp/cifarnet"][0] > 0 and rtn["fid_fp/cifarnet"][1] <= rtn["fid_fp/cifarnet"][0]
    plot_curve(curve, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    table = [line for line in _curve_lines(curve, shipped_steps=30) if line.startswith(("| 10 |", "| 30 (shipped) |"))]
    assert len(table) == 2 and f"{rtn['fid_fp/cifarnet'][0]:.4g}" in table[0]
    # CPU hours: wall x threads summed over segments, 1 x 1800 s x 2 = 1.00 h and 3 x 1800 s x 2 = 3.00 h
    assert table[0].split("|")[2].strip() == "1.00" and table[1].split("|")[2].strip() == "3.00"
