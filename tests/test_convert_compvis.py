"""``bench convert compvis`` against the ORIGINAL latent-diffusion modules, at miniature width.

The original modules come from the ``ldm`` package of ``stable-diffusion-sdkit`` (its openaimodel
``UNetModel``, ``Encoder``/``Decoder``, ``AutoencoderKL`` and ``ClassEmbedder`` keep CompVis' parameter
names) and taming-transformers' ``VectorQuantizer2`` (the codebook of CompVis' ``VQModel``); install with
``pip install -e .[compvis-test]`` plus the ``--no-deps`` line of ci/test.sh. Each test builds a
random-init original model with the released config's structure (configs/latent-diffusion/
lsun_churches-ldm-kl-8.yaml, lsun_bedrooms-ldm-vq-4.yaml, cin256-v2.yaml) at small width, saves it as a
CompVis ``.ckpt`` (``{"state_dict": {"model.diffusion_model.*", "first_stage_model.*",
"cond_stage_model.*", ...}}``) with a YAML mirroring the released one, converts it and compares outputs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

pytest.importorskip("einops")
pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")
pytest.importorskip("taming.modules.vqvae.quantize")

from harness.cli import main  # noqa: E402
from models.convert_compvis import ConvertError, build  # noqa: E402
from models.latent import ClassConditionedUNet, load_compvis_dir  # noqa: E402
from models.loading import load_model  # noqa: E402
from models.registry import ZOO  # noqa: E402

TOL = 1e-5


@contextlib.contextmanager
def _stub_modules(**attrs: dict):
    """Import-time stand-ins for packages the ``ldm`` modules import at top level but these tests never use.

    ``ldm.models.autoencoder`` subclasses ``pytorch_lightning.LightningModule`` (training only: a plain
    ``nn.Module`` builds the same network); ``ldm.modules.encoders.modules`` imports ``transformers`` and
    ``open_clip`` for its text encoders (``ClassEmbedder`` needs neither). Stubs are added only for packages
    that are not installed, and removed again after the import so nothing else sees them.
    """
    added = []
    for name, members in attrs.items():
        if importlib.util.find_spec(name) is None:
            mod = types.ModuleType(name)
            mod.__dict__.update(members)
            sys.modules[name] = mod
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _ldm():
    from ldm.modules.diffusionmodules import model as ae_model
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.ema import LitEma
    from taming.modules.vqvae.quantize import VectorQuantizer2

    with _stub_modules(pytorch_lightning={"LightningModule": nn.Module}):
        from ldm.models.autoencoder import AutoencoderKL
    dummy = type("Unused", (), {})
    with _stub_modules(transformers={n: dummy for n in ("T5Tokenizer", "T5EncoderModel", "CLIPTokenizer",
                                                        "CLIPTextModel")}, open_clip={}):
        from ldm.modules.encoders.modules import ClassEmbedder
    return types.SimpleNamespace(UNetModel=UNetModel, Encoder=ae_model.Encoder, Decoder=ae_model.Decoder,
                                 AutoencoderKL=AutoencoderKL, ClassEmbedder=ClassEmbedder, LitEma=LitEma,
                                 VectorQuantizer2=VectorQuantizer2)


class CompVisVQ(nn.Module):
    """CompVis ``ldm.models.autoencoder.VQModel(Interface)``'s modules and decode path (its training code is
    not in the sdkit package): Encoder, Decoder, VectorQuantizer2 codebook, quant_conv, post_quant_conv."""

    def __init__(self, L, ddconfig: dict, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.encoder, self.decoder = L.Encoder(**ddconfig), L.Decoder(**ddconfig)
        self.quantize = L.VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))


# ---- miniature configs mirroring the released YAMLs -------------------------------------------------------------

def _first_stage_kl() -> dict:  # lsun_churches-ldm-kl-8.yaml: ch 128, ch_mult [1,2,4,4], z 4, embed_dim 4
    return {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}}


def _first_stage_vq() -> dict:  # lsun_bedrooms-ldm-vq-4.yaml / cin256-v2.yaml: n_embed 8192, ch 128, [1,2,4]
    return {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 64, "ddconfig": {
            "double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}}


def config_church() -> dict:
    # Released: image_size 32, model_channels 192, attention_resolutions [1,2,4,8], channel_mult [1,2,2,4,4],
    # num_heads 8, use_scale_shift_norm, resblock_updown; scale_by_std (scale_factor in the checkpoint).
    return {"model": {"base_learning_rate": 5.0e-5, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0155, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "loss_type": "l1", "first_stage_key": "image", "cond_stage_key": "image",
        "image_size": 4, "channels": 4, "cond_stage_trainable": False, "concat_mode": False, "scale_by_std": True,
        "monitor": "val/loss_simple_ema",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 4, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [1, 2], "num_res_blocks": 2, "channel_mult": [1, 2], "num_heads": 8,
            "use_scale_shift_norm": True, "resblock_updown": True}},
        "first_stage_config": _first_stage_kl(),
        "cond_stage_config": "__is_unconditional__"}}}


def config_bedroom() -> dict:
    # Released: image_size 64, model_channels 224, attention_resolutions [8,4,2], channel_mult [1,2,3,4],
    # num_head_channels 32.
    return {"model": {"base_learning_rate": 2.0e-6, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "image", "image_size": 8, "channels": 3, "monitor": "val/loss_simple_ema",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
            "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3], "num_head_channels": 32}},
        "first_stage_config": _first_stage_vq(),
        "cond_stage_config": "__is_unconditional__"}}}


def config_cin() -> dict:
    # Released cin256-v2: image_size 64, model_channels 192, attention_resolutions [8,4,2], channel_mult
    # [1,2,3,5], num_heads 1, spatial transformer (depth 1), context_dim 512; ClassEmbedder 1001 x 512.
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "image", "cond_stage_key": "class_label", "image_size": 8,
        "channels": 3, "cond_stage_trainable": True, "conditioning_key": "crossattn", "monitor": "val/loss",
        "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
            "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3], "num_heads": 1,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 64}},
        "first_stage_config": _first_stage_vq(),
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder", "params": {
            "n_classes": 1001, "embed_dim": 64, "key": "class_label"}}}}}


# ---- original models and their .ckpt ---------------------------------------------------------------------------

def _jitter(module: nn.Module, seed: int) -> nn.Module:
    """Random-init everything, zero-initialised output convs included, so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def make_original(cfg: dict, seed: int = 0, ema: bool = False) -> dict:
    L = _ldm()
    torch.manual_seed(seed)
    p = cfg["model"]["params"]
    up = p["unet_config"]["params"]
    unet = _jitter(L.UNetModel(**up), seed)
    fs = p["first_stage_config"]["params"]
    if p["first_stage_config"]["target"].endswith("AutoencoderKL"):
        ae = _jitter(L.AutoencoderKL(ddconfig=fs["ddconfig"], lossconfig=fs["lossconfig"], embed_dim=fs["embed_dim"]),
                     seed + 1)
    else:
        ae = _jitter(CompVisVQ(L, fs["ddconfig"], fs["n_embed"], fs["embed_dim"]), seed + 1)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in ae.state_dict().items()})
    out = {"unet": unet, "ae": ae, "cond": None, "ema_unet": None}
    cond = p.get("cond_stage_config")
    if isinstance(cond, dict):
        emb = _jitter(L.ClassEmbedder(**cond["params"]), seed + 2)
        sd.update({f"cond_stage_model.{k}": v for k, v in emb.state_dict().items()})
        out["cond"] = emb
    if ema:  # LatentDiffusion's LitEma over its DiffusionWrapper (model.diffusion_model)
        ema_unet = _jitter(copy.deepcopy(unet), seed + 3)
        wrapper = nn.Module()
        wrapper.diffusion_model = ema_unet
        sd.update({f"model_ema.{k}": v for k, v in L.LitEma(wrapper).state_dict().items()})
        out["ema_unet"] = ema_unet
    # LatentDiffusion's schedule buffers (make_beta_schedule "linear": linear in sqrt(beta), float64).
    betas = torch.linspace(p["linear_start"] ** 0.5, p["linear_end"] ** 0.5, p["timesteps"], dtype=torch.float64) ** 2
    sd["betas"] = betas.float()
    sd["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    sd["scale_factor"] = torch.tensor(0.22765929 if p.get("scale_by_std") else 1.0)
    out["state_dict"] = sd
    return out


def write(tmp: Path, name: str, cfg: dict, state_dict: dict) -> tuple[Path, Path]:
    ckpt, conf = tmp / f"{name}.ckpt", tmp / f"{name}.yaml"
    torch.save({"state_dict": state_dict}, ckpt)
    conf.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ckpt, conf


def run_convert(*args: str):
    return CliRunner().invoke(main, ["convert", "compvis", *args])


CASES = {"church": (config_church, "ldm-lsun-church", True), "bedroom": (config_bedroom, "ldm-lsun-bedroom", False),
         "cin": (config_cin, "ldm-imagenet", False)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("compvis")
    made = {}
    for name, (cfg_fn, zoo_name, ema) in CASES.items():
        cfg = cfg_fn()
        orig = make_original(cfg, seed=len(made) * 10, ema=ema)
        ckpt, conf = write(root, name, cfg, orig["state_dict"])
        out = root / f"{name}-diffusers"
        res = run_convert("--ckpt", str(ckpt), "--config", str(conf), "--out", str(out), "--model", zoo_name)
        assert res.exit_code == 0, res.output + res.stderr
        made[name] = dict(orig, cfg=cfg, ckpt=ckpt, conf=conf, out=out, zoo=zoo_name, root=root)
    return made


# ---- equality with the original modules ----------------------------------------------------------------------

def _inputs(cfg: dict, seed: int = 123):
    up = cfg["model"]["params"]["unet_config"]["params"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, up["in_channels"], up["image_size"], up["image_size"], generator=g)
    return x, torch.tensor([1, 500, 999])


@pytest.mark.parametrize("name", list(CASES))
def test_converted_unet_and_decoder_equal_the_original(converted, name):
    c = converted[name]
    unet, _, comps, record = load_compvis_dir(c["out"])
    x, t = _inputs(c["cfg"])
    ref_unet = c["ema_unet"] if c["ema_unet"] is not None else c["unet"]
    with torch.no_grad():
        if name == "cin":
            assert isinstance(unet, ClassConditionedUNet) and record["null_class"] == 1000
            y = torch.tensor([0, 7, 1000])
            context = c["cond"]({"class_label": y}, disable_dropout=True)  # [B, 1, D]
            ref = ref_unet(x, t, context=context)
            got = unet(x, t, class_labels=y).sample
        else:
            ref = ref_unet(x, t)
            got = unet(x, t).sample
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL, (name, (got - ref).abs().max().item())
    if c["ema_unet"] is not None:  # the EMA copy was converted, not the raw weights
        assert record["ema"] and (c["unet"](x, t) - got).abs().max().item() > 1e-3

    ae_name = "vae" if "vae" in comps else "vqvae"
    ae = comps[ae_name]
    zc = c["cfg"]["model"]["params"]["first_stage_config"]["params"]["embed_dim"]
    z = torch.randn(2, zc, 4 if ae_name == "vae" else 8, 4 if ae_name == "vae" else 8,
                    generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        if ae_name == "vae":
            ref_img, got_img = c["ae"].decode(z), ae.decode(z).sample
        else:
            ref_img = c["ae"].decode(z, force_not_quantize=True)
            got_img = ae.decode(z, force_not_quantize=True).sample
            # quantized decode (what LatentDiffusion.decode_first_stage does for VQ models): same codes
            ref_q, got_q = c["ae"].decode(z), ae.decode(z).sample
            assert (ref_q - got_q).abs().max().item() <= TOL
    assert got_img.shape == (2, 3, 32, 32)
    assert (got_img - ref_img).abs().max().item() <= TOL
    assert record["latent_scale"] == pytest.approx(0.22765929 if name == "church" else 1.0)


@pytest.mark.parametrize("name", list(CASES))
def test_converted_directory_loads_as_the_zoo_entry(converted, name):
    from harness.generate import make_schedule, sample_images

    c = converted[name]
    spec = ZOO[c["zoo"]]
    model = load_model(spec, model_path=str(c["out"]))
    assert model.decode is not None
    sd = c["state_dict"]
    assert torch.allclose(model.scheduler.alphas_cumprod, sd["alphas_cumprod"], atol=1e-6)
    if name == "cin":
        assert model.num_classes == 1000 and model.denoiser.uncond.tolist() == [1000]
        assert model.denoiser.conditioning == "class" and model.denoiser.guidance_scale == 3.0
    schedule = make_schedule(model, 2, spec.spacing)
    images = sample_images(model, model.denoiser, schedule, spec.sampler, spec.eta, [0, 1], "cpu")
    assert images.shape == (2, 3, 32, 32) and images.dtype == np.uint8


def test_cin_guidance_uses_the_null_class_embedding(converted):
    c = converted["cin"]
    model = load_model(ZOO["ldm-imagenet"], model_path=str(c["out"]))
    x, t = _inputs(c["cfg"])
    y = torch.tensor([3, 4, 5])
    with torch.no_grad():
        eps = model.denoiser(x, t, y)
        ctx = c["cond"]({"class_label": y}, disable_dropout=True)
        null = c["cond"]({"class_label": torch.full((3,), 1000)}, disable_dropout=True)
        e_c, e_u = c["unet"](x, t, context=ctx), c["unet"](x, t, context=null)
    assert (eps - (e_u + 3.0 * (e_c - e_u))).abs().max().item() <= 1e-4


# ---- bad input ----------------------------------------------------------------------------------------------------

def _one_line_exit_2(res, out: Path, needle: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


def test_bad_input_exits_2_with_one_line_and_writes_nothing(converted, tmp_path):
    c = converted["bedroom"]
    out = tmp_path / "out"
    ok = ("--ckpt", str(c["ckpt"]), "--config", str(c["conf"]))
    _one_line_exit_2(run_convert("--ckpt", str(tmp_path / "nope.ckpt"), "--config", str(c["conf"]),
                                 "--out", str(out)), out, "not found")
    _one_line_exit_2(run_convert("--ckpt", str(c["ckpt"]), "--config", str(tmp_path / "nope.yaml"),
                                 "--out", str(out)), out, "not found")
    # not a latent-diffusion checkpoint
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, tmp_path / "foo.ckpt")
    _one_line_exit_2(run_convert("--ckpt", str(tmp_path / "foo.ckpt"), "--config", str(c["conf"]),
                                 "--out", str(out)), out, "not a CompVis latent-diffusion checkpoint")
    # pickled Python objects that weights_only refuses (as pytorch-lightning checkpoints may hold)
    torch.save({"state_dict": c["state_dict"], "callbacks": {"cb": ConvertError("x")}}, tmp_path / "pl.ckpt")
    _one_line_exit_2(run_convert("--ckpt", str(tmp_path / "pl.ckpt"), "--config", str(c["conf"]),
                                 "--out", str(out)), out, "weights_only")
    # the checkpoint does not match the config: another model's (schedule differs), a UNet tensor missing,
    # a first-stage tensor of the wrong shape
    _one_line_exit_2(run_convert("--ckpt", str(converted["church"]["ckpt"]), "--config", str(c["conf"]),
                                 "--out", str(out)), out, "do not match the checkpoint's betas")
    sd = dict(c["state_dict"])
    sd.pop("model.diffusion_model.middle_block.1.qkv.weight")
    torch.save({"state_dict": sd}, tmp_path / "partial.ckpt")
    _one_line_exit_2(run_convert("--ckpt", str(tmp_path / "partial.ckpt"), "--config", str(c["conf"]),
                                 "--out", str(out)), out, "middle_block.1.qkv.weight")
    sd = dict(c["state_dict"])
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(5, 3, 3, 3)
    torch.save({"state_dict": sd}, tmp_path / "shape.ckpt")
    _one_line_exit_2(run_convert("--ckpt", str(tmp_path / "shape.ckpt"), "--config", str(c["conf"]),
                                 "--out", str(out)), out, "does not match the config for the first stage")
    # unsupported configs
    for change, needle in ((lambda p: p.update(parameterization="v"), "parameterization"),
                           (lambda p: p["first_stage_config"].update(target="ldm.models.autoencoder.Foo"),
                            "not supported"),
                           (lambda p: p["unet_config"]["params"].update(num_res_blocks=[2, 2, 1]), "num_res_blocks")):
        cfg = config_bedroom()
        change(cfg["model"]["params"])
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
        _one_line_exit_2(run_convert("--ckpt", str(c["ckpt"]), "--config", str(tmp_path / "bad.yaml"),
                                     "--out", str(out)), out, needle)
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    _one_line_exit_2(run_convert("--ckpt", str(c["ckpt"]), "--config", str(tmp_path / "broken.yaml"),
                                 "--out", str(out)), out, "YAML")
    # the wrong zoo entry for this architecture
    _one_line_exit_2(run_convert(*ok, "--out", str(out), "--model", "ldm-lsun-church"), out, "ldm-lsun-church")
    _one_line_exit_2(run_convert(*ok, "--out", str(out), "--model", "sd-v1-4"), out, "sd-v1-4")
    # --out exists with files
    out.mkdir()
    (out / "x").write_text("")
    res = run_convert(*ok, "--out", str(out))
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "already exists" in res.stderr
    assert [p.name for p in out.iterdir()] == ["x"]


def test_build_rejects_missing_ema_copies(converted):
    c = converted["church"]
    sd = dict(c["state_dict"])
    sd.pop(next(k for k in sd if k.startswith("model_ema.diffusion_model")))
    ckpt = c["root"] / "church-bad-ema.ckpt"
    torch.save({"state_dict": sd}, ckpt)
    with pytest.raises(ConvertError, match="EMA"):
        build(ckpt, c["conf"])
    assert build(ckpt, c["conf"], ema=False)["record"]["ema"] is False


# ---- end to end -------------------------------------------------------------------------------------------------

def test_converted_church_runs_bench_run(converted, tmp_path):
    """fp, rtn and qdiffusion under ldm-lsun-church's protocol (DDIM, eta 0, uniform spacing, the checkpoint's
    latent scale) on the converted miniature (32x32 images).

    The zoo entry scores with Inception against LSUN statistics, neither of which exists offline (``bench run``
    stops with "no Inception weights"), so this test swaps only the entry's scoring for the embedded CifarNet
    while it runs (the local executor runs in this process and reads the registry).
    """
    from dataclasses import replace

    from models.registry import register_model

    original = ZOO["ldm-lsun-church"]
    register_model(replace(original, extractor="cifarnet", reference="cifar10-test"))
    c = converted["church"]
    out = tmp_path / "runs"
    try:
        res = CliRunner().invoke(main, ["run", "--methods", "fp,rtn,qdiffusion", "--models", "ldm-lsun-church",
                                        "--model-path", str(c["out"]), "--bits", "w8a8", "--num-samples", "4",
                                        "--steps", "2", "--out", str(out), "--device", "cpu"])
    finally:
        register_model(original)
    assert res.exit_code == 0, res.output + res.stderr
    results = sorted(out.glob("runs/**/results.json"))
    assert len(results) == 3
    for r in results:
        data = json.loads(r.read_text())
        assert data["status"] == "complete", r
        assert np.isfinite(data["metrics"]["fid/cifarnet"]), r
