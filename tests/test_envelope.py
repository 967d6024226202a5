"""The harness envelope: a plug-in method is one class; what it returns (a denoiser wrapper included)
survives a SIGKILL-and-resume bit for bit; calibration that breaks the envelope's contract is named.

The plug-in below is defined here and registered only where it runs (a subprocess for the CLI,
a fixture that unregisters it in-process), so the global registry is left as it was.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_kill import kill_mid_sampling
from torch import nn

import methods
from harness.calibration import TrajectoryBank
from harness.generate import make_schedule
from harness.sampling import sample_ddim
from harness.shards import SHARD_SIZE, ShardStore
from methods.base import BitConfig, QuantMethod
from methods.envelope import CalibrationError, load_quantized, save_quantized
from methods.quant.calibrate import init_activation_ranges
from methods.quant.quantizer import UniformQuantizer
from methods.quant.surgery import UNIFORM, quant_layers
from methods.registry import METHODS
from models.loading import load_model
from models.registry import get_model

NUM = 3 * SHARD_SIZE


class GainDenoiser(nn.Module):
    """A denoiser wrapper with calibrated state (as PTQD's noise correction is): eps * gain."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.unet = inner.unet  # registered: the wrapper's state_dict holds the UNet and the gain
        self.register_buffer("gain", torch.ones(()))

    def forward(self, x, t, cond=None):
        return self.inner(x, t, cond) * self.gain


class WrapMethod(QuantMethod):
    """Min-max quantizers everywhere, then a wrapper whose gain is fitted on calibration data."""

    def extend(self, denoiser, bits, scope, summary, structure):
        return GainDenoiser(denoiser)

    def calibrate(self, denoiser, calib, bits, artifact_dir):
        layers = quant_layers(denoiser.unet)
        for layer in layers.values():
            layer.init_weight_range("minmax")
        traj = calib.trajectories(2)
        init_activation_ranges(denoiser.inner, layers, traj.at_steps([0, 1]), traj.num_steps, device=calib.device)
        with torch.no_grad():  # any data-dependent value that is not 1: losing it changes the samples
            denoiser.gain.fill_(1.0 - 0.05 * float(traj.x[:, 0].abs().mean()))
        return {"gain": float(denoiser.gain)}


def register() -> None:
    methods.registry.register_method("test-wrap")(WrapMethod)


@pytest.fixture
def wrap_registered():
    register()
    yield
    METHODS.unregister("test-wrap")


def _cmd(out: Path) -> list[str]:
    boot = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_envelope; "
            "test_envelope.register(); from harness.cli import main; main()")
    return [sys.executable, "-c", boot, "run", "--methods", "fp,test-wrap", "--models", "tiny-random", "--bits",
            "w8a8", "--num-samples", str(NUM), "--steps", "3", "--device", "cpu", "--out", str(out)]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


@pytest.mark.slow
def test_wrapper_method_survives_sigkill_and_resume_bit_identically(tmp_path: Path) -> None:
    ref = subprocess.run(_cmd(tmp_path / "ref"), env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    (ref_dir,) = (tmp_path / "ref" / "runs" / "tiny-random").glob("test-wrap-w8a8-*")
    gain = json.loads((ref_dir / "results.json").read_text())["facts"]["gain"]
    assert gain != 1.0

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    killed = kill_mid_sampling(proc, out / "runs" / "tiny-random", "test-wrap-w8a8-*", NUM)
    killed_dir = killed[0] if killed else None
    assert killed_dir is not None, "the sweep ended before it could be killed mid-sampling"
    assert (killed_dir / "quantized.safetensors").exists() and not (killed_dir / "results.json").exists()

    again = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    res = json.loads((killed_dir / "results.json").read_text())
    assert res["status"] == "complete" and res["facts"]["gain"] == gain
    assert res["facts"]["images_generated_this_attempt"] < NUM  # resumed: the kept shards were not redone
    a = ShardStore(killed_dir / "samples", NUM).load_all()
    b = ShardStore(ref_dir / "samples", NUM).load_all()
    assert np.array_equal(a, b), "the resumed wrapper method sampled something else than an uninterrupted run"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    m = load_model(get_model("tiny-random"))
    sch = make_schedule(m, 3, "uniform")
    return m, sch, TrajectoryBank(m, sch, "ddim", 0.0, tmp_path_factory.mktemp("bank"))


def test_reload_rebuilds_the_wrapper_and_a_dropped_wrapper_would_show(tiny, tmp_path, wrap_registered):
    m, sch, bank = tiny
    method = WrapMethod()
    res = method.quantize(copy.deepcopy(m.denoiser), bank, BitConfig(8, 8), UNIFORM, tmp_path / "art")
    assert isinstance(res.denoiser, GainDenoiser) and res.facts["layers_quantized"] > 0
    assert "coverage" in res.facts and res.facts["calib_seconds"] > 0
    assert not any(p.requires_grad for p in res.denoiser.parameters())
    x = torch.randn(2, *m.sample_shape, generator=torch.Generator().manual_seed(0))
    out = sample_ddim(res.denoiser, x, sch)
    save_quantized(res, tmp_path / "q.safetensors")
    loaded = load_quantized(method, copy.deepcopy(m.denoiser), BitConfig(8, 8), UNIFORM, tmp_path / "q.safetensors")
    assert isinstance(loaded, GainDenoiser) and float(loaded.gain) == float(res.denoiser.gain)
    assert torch.equal(sample_ddim(loaded, x, sch), out)
    assert not torch.equal(sample_ddim(loaded.inner, x, sch), out)  # the wrapper is not a no-op


class ForgetfulMethod(WrapMethod):
    """Leaves a training-time quantizer class in the tree: a reload could not rebuild it."""

    def extend(self, denoiser, bits, scope, summary, structure):
        return denoiser

    def calibrate(self, denoiser, calib, bits, artifact_dir):
        layer = next(iter(quant_layers(denoiser.unet).values()))
        layer.act_quantizer = nn.Identity()
        return {}


class NaNMethod(WrapMethod):
    def extend(self, denoiser, bits, scope, summary, structure):
        return denoiser

    def calibrate(self, denoiser, calib, bits, artifact_dir):
        name, layer = next(iter(quant_layers(denoiser.unet).items()))
        layer.weight_quantizer.init_range(layer.module.weight)
        layer.weight_quantizer.scale.fill_(float("nan"))
        return {}


def test_contract_breaches_are_named(tiny, tmp_path):
    m, _, bank = tiny
    with pytest.raises(CalibrationError, match=r"changed the module at 'conv_in.act_quantizer' from "
                                               r"UniformQuantizer to Identity"):
        ForgetfulMethod().quantize(copy.deepcopy(m.denoiser), bank, BitConfig(8, 8), UNIFORM, tmp_path)
    with pytest.raises(CalibrationError, match=r"non-finite values in conv_in.weight_quantizer.scale"):
        NaNMethod().quantize(copy.deepcopy(m.denoiser), bank, BitConfig(8, 8), UNIFORM, tmp_path)


def test_adaround_is_baked_into_plain_weights_exactly(tiny):
    """A hardened AdaRound quantizer becomes on-grid weights under a uniform quantizer: same output."""
    from methods.envelope import bake_adaround
    from methods.quant.adaround import attach_adaround
    from methods.quant.layers import QuantLayer

    torch.manual_seed(0)
    layer = QuantLayer(nn.Conv2d(4, 6, 3), 4, 16, w_symmetric=False)
    layer.init_weight_range("minmax")
    (q,) = attach_adaround(layer)
    with torch.no_grad():
        q.alpha.copy_(torch.randn_like(q.alpha))  # a rounding that differs from nearest on many weights
    q.harden()
    x = torch.randn(2, 4, 8, 8)
    expected = layer(x)
    nearest = layer.weight_quantizer.scale * torch.round(layer.module.weight / layer.weight_quantizer.scale)
    root = nn.Sequential(layer)
    bake_adaround(root)
    assert type(layer.weight_quantizer) is UniformQuantizer
    assert torch.equal(layer(x), expected)
    assert not torch.equal(layer.module.weight, nearest)  # the learned rounding survived, not round-to-nearest
