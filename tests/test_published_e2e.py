"""Published models end to end, offline: the papers' zoo entries through `bench ref` and `bench run --protocol paper`.

Every network is real code with random weights built here (no download is possible): a 256-px pixel UNet of the
ddpm-church family (google/ddpm-church-256's block layout at tiny widths) and a 32-px one of ddpm-cifar10's, each
saved with ``DDPMPipeline.save_pretrained``; a torch-fidelity InceptionV3 state dict (tests/helpers_inception.py);
a tiny CLIP (``CLIPConfig``) with a byte-level BPE tokenizer written here. Numbers mean nothing; the tests check
that each run completes, scores every metric against the named reference it recorded, and that bad input stops
in seconds with one line.

Calibration: ``--protocol paper`` keeps the paper preset's calibration (rtn: 256 FP trajectories). At 256 px on a
CPU that bank alone takes about 3 minutes and 800 MB, so the runs here add ``--preset fast`` (32 trajectories);
everything else (sampler, eta, spacing, reference, extractor) is the paper protocol.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from helpers_images import sha256_of, smooth_images
from helpers_inception import random_inception_weights
from PIL import Image

from harness import metrics as M
from harness.cli import main
from harness.metrics.reference import adm_spatial_permutation
from harness.results import load_features
from models.zoo import DDPM_SCHEDULER, miniature

pytestmark = [
    pytest.mark.filterwarnings("ignore:Inception weights .* differs from the published"),
    pytest.mark.filterwarnings("ignore:reference .* holds statistics of the TF Inception graph"),
    pytest.mark.filterwarnings("ignore:kid/inception skipped"),
]

REPO = Path(__file__).resolve().parents[1]
INCEPTION = ("fid/inception", "is/inception", "sfid/inception", "kid/inception")
BAD_INPUT_SECONDS = 15.0
FAST = ["--preset", "fast", "--bits", "w8a8", "--device", "cpu", "--batch-size", "16"]

# google/ddpm-church-256: 6 levels, attention at the 16x16 level only; here the same layout at widths 8..16.
CHURCH_UNET = dict(sample_size=256, in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16, 16, 16),
                   layers_per_block=1, down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, norm_num_groups=8,
                   attention_head_dim=None)




def _pipeline(unet_cfg: dict, path: Path) -> Path:
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**unet_cfg), scheduler=DDPMScheduler(**DDPM_SCHEDULER)).save_pretrained(path)
    return path


def _bench(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _results(out: Path) -> dict[str, dict]:
    """method-bits -> results.json of every run under ``out``."""
    res = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/*/results.json"))]
    return {f"{r['spec']['method']}-{r['spec']['bits']}": r for r in res}


def _mlflow_runs(out: Path, protocol: str = "paper"):
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[f"dmqbench-{protocol}"], filter_string="tags.kind = 'run'")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Inception weights, a temporary reference store (DMQBENCH_REFSTATS) and the two pipelines."""
    root = tmp_path_factory.mktemp("published")
    store = root / "refstats"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DMQBENCH_REFSTATS", str(store))
        mp.delenv("DMQBENCH_CAPTIONS", raising=False)
        yield {"root": root, "store": store, "weights": str(random_inception_weights(root / "inception.pth")),
               "church": _pipeline(CHURCH_UNET, root / "ddpm-church"),
               "cifar": _pipeline(miniature("ddpm-cifar10")["unet"], root / "ddpm-cifar10")}


# ---- a. ddpm-church (256 px, Inception, LSUN church reference built from a folder) -----------------------------

@pytest.fixture(scope="module")
def church(env):
    folder = env["root"] / "church-pngs"
    folder.mkdir()
    for i, im in enumerate(smooth_images(32, 256, 1)):
        Image.fromarray(im.transpose(1, 2, 0)).save(folder / f"{i:03d}.png")
    t = time.perf_counter()
    r = _bench("ref", "build", "lsun-church-train", "--images", folder, "--inception-weights", env["weights"],
               "--device", "cpu", "--batch-size", "16")
    assert r.exit_code == 0, r.output
    build_s = time.perf_counter() - t
    out = env["root"] / "church-out"
    t = time.perf_counter()
    r = _bench("run", "--methods", "fp,rtn", "--models", "ddpm-church", "--model-path", env["church"],
               "--protocol", "paper", "--num-samples", "16", "--steps", "2", "--inception-weights", env["weights"],
               "--out", out, *FAST)
    return {"out": out, "result": r, "build_s": build_s, "run_s": time.perf_counter() - t}


@pytest.mark.slow
def test_church_reference_build_records_the_folder(env, church):
    ref = M.resolve_reference("lsun-church-train", "inception", env["weights"])
    assert Path(ref.path).is_relative_to(env["store"])  # the store the env var names
    m = ref.manifest
    assert m["num_images"] == 32 and m["resolution"] == 256 and m["source"]["kind"] == "folder"
    assert m["extractor_weights_sha256"] == sha256_of(env["weights"]) and ref.sha256 == sha256_of(ref.path)


@pytest.mark.slow
def test_church_paper_protocol_runs_and_scores_against_lsun_church(env, church):
    r = church["result"]
    assert r.exit_code == 0, r.output + r.stderr
    res = _results(church["out"])
    assert sorted(res) == ["fp-fp", "rtn-w8a8"]
    ref = M.resolve_reference("lsun-church-train", "inception", env["weights"])
    for name, data in res.items():
        assert data["status"] == "complete", (name, data.get("error"))
        spec = data["spec"]
        assert (spec["model"], spec["protocol"], spec["extractor"], spec["reference"]) == (
            "ddpm-church", "paper", "inception", "lsun-church-train")
        assert (spec["sampler"], spec["eta"], spec["spacing"], spec["steps"], spec["num_samples"]) == (
            "ddim", 0.0, "uniform", 2, 16)
        assert "captions" not in spec  # pixel models record no caption file
        for key in INCEPTION:
            assert np.isfinite(data["metrics"][key]), (name, key)
        assert data["reference"]["inception"]["name"] == "lsun-church-train"
        assert data["reference"]["inception"]["sha256"] == ref.sha256 == sha256_of(ref.path)
        assert data["reference"]["inception"]["provenance"] == "built"
    # The FID is that of the run's own features against the named reference's statistics, recomputed here in
    # the low-rank form: with X the centred [n, D] features, Tr((S1 S2)^1/2) = sum sqrt(eig(X S2 X^T / (n-1))).
    rdir = next(church["out"].glob("runs/ddpm-church/fp-fp-*"))
    f = load_features(rdir, 16)["inception/2048"].astype(np.float64)
    mu2, s2 = ref.stats.mu["2048"].astype(np.float64), ref.stats.sigma["2048"].astype(np.float64)
    x = f - f.mean(0)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(x @ s2 @ x.T / (len(f) - 1)), 0, None)).sum()
    want = ((f.mean(0) - mu2) ** 2).sum() + (x**2).sum() / (len(f) - 1) + np.trace(s2) - 2 * tr_covmean
    assert res["fp-fp"]["metrics"]["fid/inception"] == pytest.approx(want, rel=1e-3)

    runs = _mlflow_runs(church["out"])
    assert sorted(runs["tags.method"]) == ["fp", "rtn"]
    for key in INCEPTION:
        assert np.isfinite(runs[f"metrics.{key}"].astype(float)).all(), key
    assert (runs["tags.reference/inception"] == f"lsun-church-train@{ref.sha256[:16]}").all()
    print(f"church: ref build {church['build_s']:.0f} s, run {church['run_s']:.0f} s")


# ---- b. ddpm-cifar10 (32 px, CifarNet + Inception; CIFAR-10 pickles and an ADM-style statistics file) -----------

def _cifar_pickles(root: Path, per_batch: int = 3) -> Path:
    """A torchvision-layout ``cifar-10-batches-py/`` (protocol-2 pickles of dicts) of smooth 32-px images."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x = smooth_images(per_batch, 32, 10 + i)
        with open(d / name, "wb") as fh:
            pickle.dump({"batch_label": f"batch {i}", "labels": list(range(per_batch)),
                         "data": x.reshape(per_batch, -1), "filenames": [f"{i}_{j}.png" for j in range(per_batch)]},
                        fh, protocol=2)
    return d


def _adm_npz(path: Path, images: np.ndarray, weights: str) -> Path:
    """An ADM reference batch (mu, sigma, mu_s, sigma_s; spatial features in ADM's NHWC order) of ``images``."""
    f = M.extract_features(images, "inception", ["2048", "spatial"], inception_weights=weights)
    pool, spatial = (M.feature_statistics(f[k]) for k in ("2048", "spatial"))
    inv = np.argsort(adm_spatial_permutation())  # ours = adm[perm]  =>  adm = ours[inv]
    np.savez(path, mu=pool["mu"], sigma=pool["sigma"], mu_s=spatial["mu"][inv],
             sigma_s=spatial["sigma"][np.ix_(inv, inv)])
    return path


@pytest.fixture(scope="module")
def cifar(env):
    from harness.metrics.sources import open_source

    data = _cifar_pickles(env["root"] / "cifar")
    for name, extra in (("cifar10-train", ["--inception-weights", env["weights"]]), ("cifar10-train", []),
                        ("cifar10-adm", [])):
        r = _bench("ref", "build", name, "--images", data.parent, "--extractor",
                   "inception" if extra else "cifarnet", *extra, "--device", "cpu")
        assert r.exit_code == 0, r.output
    train = np.concatenate(list(open_source(data, split="train").chunks()))
    assert train.shape == (15, 3, 32, 32)
    npz = _adm_npz(env["root"] / "VIRTUAL_cifar10_train.npz", train, env["weights"])
    r = _bench("ref", "import", "cifar10-adm", "--npz", npz)
    assert r.exit_code == 0, r.output
    out = {}
    for key, methods, ref in (("built", "fp,rtn", []), ("adm", "fp", ["--reference", "cifar10-adm"])):
        out[key] = env["root"] / f"cifar-out-{key}"
        t = time.perf_counter()
        r = _bench("run", "--methods", methods, "--models", "ddpm-cifar10", "--model-path", env["cifar"],
                   "--protocol", "paper", "--num-samples", "16", "--steps", "2", "--inception-weights",
                   env["weights"], "--out", out[key], *ref, *FAST)
        assert r.exit_code == 0, r.output + r.stderr
        print(f"cifar ({key}): run {time.perf_counter() - t:.0f} s")
    return out


@pytest.mark.slow
def test_cifar10_paper_protocol_against_pickle_built_reference(env, cifar):
    res = _results(cifar["built"])
    assert sorted(res) == ["fp-fp", "rtn-w8a8"]
    refs = {net: M.resolve_reference("cifar10-train", net, env["weights"]) for net in ("cifarnet", "inception")}
    for name, data in res.items():
        assert data["status"] == "complete", (name, data.get("error"))
        assert (data["spec"]["spacing"], data["spec"]["reference"]) == ("quad", "cifar10-train")
        for key in (*INCEPTION, "fid/cifarnet", "kid/cifarnet"):
            assert np.isfinite(data["metrics"][key]), (name, key)
        for net, ref in refs.items():
            assert data["reference"][net]["name"] == "cifar10-train" and data["reference"][net]["sha256"] == ref.sha256
            assert ref.manifest["source"]["kind"] == "cifar10-pickles" and ref.manifest["num_images"] == 15
    runs = _mlflow_runs(cifar["built"])
    for key in INCEPTION:
        assert np.isfinite(runs[f"metrics.{key}"].astype(float)).all(), key
    assert (runs["tags.reference/inception"] == f"cifar10-train@{refs['inception'].sha256[:16]}").all()
    assert (runs["tags.reference/cifarnet"] == f"cifar10-train@{refs['cifarnet'].sha256[:16]}").all()


@pytest.mark.slow
def test_cifar10_against_imported_adm_statistics_matches_the_built_reference(env, cifar):
    """The ADM file holds the same images' statistics in ADM's layout: the same FID and sFID, but no KID."""
    built, adm = _results(cifar["built"])["fp-fp"], _results(cifar["adm"])["fp-fp"]
    assert adm["status"] == "complete", adm.get("error")
    ref = M.resolve_reference("cifar10-adm", "inception", env["weights"])
    assert adm["reference"]["inception"]["name"] == "cifar10-adm"
    assert adm["reference"]["inception"]["provenance"] == "imported:adm"
    assert adm["reference"]["inception"]["sha256"] == ref.sha256
    for key in ("fid/inception", "is/inception", "sfid/inception"):
        assert np.isfinite(adm["metrics"][key]) and adm["metrics"][key] == pytest.approx(built["metrics"][key],
                                                                                         rel=1e-3), key
    assert "kid/inception" not in adm["metrics"]  # imported statistics carry no raw features
    runs = _mlflow_runs(cifar["adm"])
    assert (runs["tags.reference/inception"] == f"cifar10-adm@{ref.sha256[:16]}").all()


# ---- c. bad input: exit 2, one line, nothing written, in seconds ------------------------------------------------

def _cli_subprocess(args: list[str], cwd: Path, env_vars: dict) -> tuple[subprocess.CompletedProcess, float]:
    """The real console entry point (fresh interpreter, stderr as a user sees it)."""
    env = dict(os.environ, **env_vars, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                                os.environ.get("PYTHONPATH")])))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "harness.cli", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    return p, time.perf_counter() - t


def _assert_bad_input(code: int, stderr: str, seconds: float, out: Path, needle: str) -> None:
    assert code == 2, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert seconds < BAD_INPUT_SECONDS, f"{seconds:.1f} s"
    assert not out.exists()


def test_missing_reference_exits_2_naming_bench_ref_build(env, tmp_path):
    """A fresh process with an empty store: the one line names the command that builds the reference. The
    random weights' "not the published file" warning is held back, so stderr is that one line."""
    out = tmp_path / "out"
    p, s = _cli_subprocess(["run", "--methods", "fp,rtn", "--models", "ddpm-church", "--model-path", env["church"],
                            "--protocol", "paper", "--inception-weights", env["weights"], "--out", out],
                           tmp_path, {"DMQBENCH_REFSTATS": str(tmp_path / "empty-store")})
    _assert_bad_input(p.returncode, p.stderr, s, out,
                      "bench ref build lsun-church-train --images DIR --inception-weights W")
    assert not (tmp_path / "empty-store").exists()


def test_missing_captions_for_sd_exits_2_naming_captions_flag(env, tmp_path):
    """sd-v1-4 samples from the protocol's caption file (not shipped): without it, one line names --captions."""
    images = smooth_images(4, 64, 5)
    for i, im in enumerate(images):
        (tmp_path / "coco").mkdir(exist_ok=True)
        Image.fromarray(im.transpose(1, 2, 0)).save(tmp_path / "coco" / f"{i}.png")
    r = _bench("ref", "build", "coco-val2014", "--images", tmp_path / "coco", "--inception-weights", env["weights"],
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    p, s = _cli_subprocess(["run", "--methods", "fp", "--models", "sd-v1-4", "--protocol", "paper",
                            "--inception-weights", env["weights"], "--out", out], tmp_path,
                           {"DMQBENCH_REFSTATS": str(env["store"])})
    _assert_bad_input(p.returncode, p.stderr, s, out, "--captions FILE")
    assert "data/coco/captions_val2014_30k.txt not found" in p.stderr


def _in_process(args: list[str], out: Path, needle: str) -> None:
    t = time.perf_counter()
    r = CliRunner().invoke(main, ["run", *map(str, args), "--out", str(out)])
    _assert_bad_input(r.exit_code, r.stderr, time.perf_counter() - t, out, needle)


def test_bad_inception_files_and_wrong_extractor_exit_2(env, tmp_path):
    out = tmp_path / "out"
    church = ["--models", "ddpm-church", "--model-path", env["church"], "--methods", "fp,rtn", "--protocol", "paper"]
    _in_process([*church, "--inception-weights", tmp_path / "nope.pth"], out, "nope.pth")
    (tmp_path / "notes.pth").write_text("not a state dict\n")
    _in_process([*church, "--inception-weights", tmp_path / "notes.pth"], out, "not a plain state dict")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    _in_process([*church, "--inception-weights", tmp_path / "list.pth"], out, "list.pth")
    # a 256-px model scored with CifarNet: a local directory alone gets the generic spec (CifarNet) ...
    _in_process(["--model-path", env["church"], "--methods", "fp"], out, "CifarNet takes 32x32 images")
    # ... and a CifarNet statistics file as the 256-px model's reference
    cifarnet_stats = M.resolve_reference("cifar10-test", "cifarnet").path
    _in_process([*church, "--inception-weights", env["weights"], "--reference", cifarnet_stats], out,
                "holds 'cifarnet' statistics, not 'inception'")


# ---- 2. text-to-image: --captions and CLIP score ------------------------------------------------------------------

def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip(path: Path) -> Path:
    """A random-init tiny CLIP saved like a hub snapshot: model + CLIPProcessor (a byte-level BPE tokenizer with
    no merges, i.e. one token per byte, built offline; a 32-px image processor)."""
    transformers = pytest.importorskip("transformers")
    chars = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tok_dir = path.parent / (path.name + "-tokenizer-src")
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                                           model_max_length=32)
    eot = vocab["<|endoftext|>"]
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eot, pad_token_id=eot),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(path)
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32,
                                                                                               "width": 32}),
        tokenizer=tokenizer)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd(env):
    root = env["root"] / "sd"
    clip = tiny_clip(root / "clip-tiny")
    captions = root / "captions.txt"
    captions.write_text("a red bus on a street\n\na bowl of fruit\nthree dogs in the snow\n")
    out = root / "out"
    r = _bench("run", "--methods", "fp", "--models", "sd-v1-4-mini", "--num-samples", "5", "--steps", "2",
               "--captions", captions, "--clip-model", clip, "--out", out, "--device", "cpu")
    return {"clip": clip, "captions": captions, "out": out, "result": r}


def test_sd_reads_captions_file_records_it_and_reports_clip_score(env, sd):
    from harness.calibration import eval_seeds

    r = sd["result"]
    assert r.exit_code == 0, r.output + r.stderr
    (data,) = _results(sd["out"]).values()
    assert data["status"] == "complete", data.get("error")
    assert data["spec"]["captions"] == str(sd["captions"].resolve())
    assert data["spec"]["captions_sha256"] == sha256_of(sd["captions"])
    score = data["metrics"]["clip_score/clip-tiny"]
    assert np.isfinite(score) and 0.0 <= score <= 100.0
    lo, hi = data["metrics"]["clip_score/clip-tiny_ci_low"], data["metrics"]["clip_score/clip-tiny_ci_high"]
    assert lo <= score <= hi

    # Independently: image i with caption line i mod 3, CLIP's projected pooled features, 100 * max(cos, 0).
    from transformers import CLIPModel, CLIPProcessor

    from harness.shards import ShardStore

    rdir = next(sd["out"].glob("runs/sd-v1-4-mini/fp-*"))
    images = ShardStore(rdir / "samples", 5).load_all()
    lines = ["a red bus on a street", "a bowl of fruit", "three dogs in the snow"]
    assert [i % 10_000_000 for i in eval_seeds(0, 0, 5)] == [0, 1, 2, 3, 4]
    model = CLIPModel.from_pretrained(str(sd["clip"]), local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(str(sd["clip"]), local_files_only=True)
    want = []
    with torch.no_grad():
        for i, im in enumerate(images):
            inp = proc(text=[lines[i % 3]], images=[im.transpose(1, 2, 0)], return_tensors="pt", padding=True)
            v = model.visual_projection(model.vision_model(pixel_values=inp["pixel_values"]).pooler_output)
            t = model.text_projection(model.text_model(input_ids=inp["input_ids"],
                                                       attention_mask=inp["attention_mask"]).pooler_output)
            want.append(100 * max(torch.nn.functional.cosine_similarity(v, t).item(), 0.0))
    assert score == pytest.approx(float(np.mean(want)), abs=1e-4)

    runs = _mlflow_runs(sd["out"], "smoke")
    assert runs["metrics.clip_score/clip-tiny"].iloc[0] == pytest.approx(score)


def test_captions_change_the_config_hash_and_the_prompts(env, tmp_path):
    from harness.spec import expand
    from models.loading import load_model
    from models.registry import get_model

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a cat\na dog\n")
    b.write_text("a cat\na tree\n")
    (sa,), (sb,) = (expand("fp", "sd-v1-4-mini", "w8a8", captions=str(f)) for f in (a, b))
    assert sa.captions_sha256 == sha256_of(a) and sa.config_hash != sb.config_hash
    (sn,) = expand("fp", "sd-v1-4-mini", "w8a8")
    assert sn.captions is None and "captions" not in sn.to_dict()  # the miniature's built-in prompts
    (pixel,) = expand("fp", "ddpm-cifar10", "w8a8", captions=str(a))
    assert pixel.captions is None  # not a text model: the file is not part of its spec
    model = load_model(get_model("sd-v1-4-mini"), captions=str(b))
    assert model.extra["captions"] == ["a cat", "a tree"] and model.extra["cond_fn"].caption(3) == "a tree"


def test_bad_captions_and_clip_model_exit_2(env, sd, tmp_path):
    out = tmp_path / "out"
    mini = ["--models", "sd-v1-4-mini", "--methods", "fp"]
    _in_process([*mini, "--captions", tmp_path / "nope.txt"], out, "--captions FILE")
    (tmp_path / "blank.txt").write_text("\n  \n")
    _in_process([*mini, "--captions", tmp_path / "blank.txt"], out, "has no captions")
    _in_process([*mini, "--clip-model", tmp_path / "no-clip"], out, "no such directory")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((sd["clip"] / "config.json").read_text())
    _in_process([*mini, "--clip-model", tmp_path / "half"], out, "no weights")
    _in_process(["--models", "tiny-random", "--methods", "fp", "--clip-model", sd["clip"]], out,
                "no planned model is text-conditional")


# ---- 3. resolution of latent pipeline directories -----------------------------------------------------------------

@pytest.mark.parametrize(("name", "factor"), [("ldm-lsun-bedroom", 4), ("ldm-lsun-church", 8)])
def test_resolution_reads_the_autoencoder_down_factor(name, factor, tmp_path):
    """VQ-f4 decodes 4x its latent side, KL-f8 8x: the planned size equals the size the pipeline decodes."""
    from diffusers import AutoencoderKL, DDIMScheduler, LDMPipeline, VQModel

    from harness.calibration import eval_seeds
    from harness.generate import make_schedule, sample_images
    from harness.preflight import decoder_factor, planned_bytes, resolution
    from harness.spec import expand
    from models.loading import load_model
    from models.registry import ZOO

    cfg = miniature(name)
    torch.manual_seed(0)
    ae = VQModel(**cfg["vq"]) if "vq" in cfg else AutoencoderKL(**cfg["kl"])
    pipe = LDMPipeline(vqvae=ae, unet=UNet2DModel(**cfg["unet"]), scheduler=DDIMScheduler(**cfg["scheduler"]))
    pipe.save_pretrained(tmp_path / "pipe")
    if "kl" in cfg:  # LDMPipeline names its autoencoder vqvae/; a KL pipeline keeps it in vae/
        (tmp_path / "pipe" / "vqvae").rename(tmp_path / "pipe" / "vae")
    assert decoder_factor(tmp_path / "pipe") == factor
    (spec,) = expand("fp", name, "w8a8", num_samples=2, model_path=str(tmp_path / "pipe"))
    latent = cfg["unet"]["sample_size"]
    assert resolution(spec) == latent * factor == 32
    assert planned_bytes(spec) - planned_bytes(expand("fp", name, "w8a8", num_samples=1,
                                                      model_path=str(tmp_path / "pipe"))[0]) == 32 * 32 * 3
    if "vq" in cfg:  # what the loader decodes has that side
        model = load_model(ZOO[name], model_path=str(tmp_path / "pipe"))
        images = sample_images(model, model.denoiser, make_schedule(model, 1, "uniform"), "ddim", 0.0,
                               eval_seeds(0, 0, 1), "cpu")
        assert images.shape[-1] == resolution(spec)
    (pixel,) = expand("fp", None, "w8a8", model_path=str(REPO / "models" / "assets" / "tiny-cifar10"))
    assert resolution(pixel) == 32 and decoder_factor(REPO / "models" / "assets" / "tiny-cifar10") == 1
