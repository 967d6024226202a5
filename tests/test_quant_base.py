"""The Quantizer base class: LSQ gradient in closed form, the disable switch, every quantizer's state round trip."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
from torch import nn

import methods.quant
from methods.quant.adaround import AdaRoundQuantizer
from methods.quant.attention import QuantAttnProcessor
from methods.quant.base import Quantizer
from methods.quant.group_search import APQWeightQuantizer, GroupMixtureQuantizer
from methods.quant.layers import QuantLayer, quantizers_disabled
from methods.quant.quantizer import UniformQuantizer
from methods.quant.step_table import StepTableQuantizer
from methods.quant.timestep import timestep_context
from methods.tdq import TDQActQuantizer, TDQStepMLP

torch.set_num_threads(1)


# ---- LSQ: d q / d s against Esser et al. (ICLR 2020) Eq. 3 ----------------------------------------------------
def _step_grads(q: UniformQuantizer, xs: list[float]) -> list[float]:
    grads = []
    for v in xs:
        q.scale.grad = None
        q(torch.tensor([v])).sum().backward()
        grads.append(q.scale.grad.item())
    return grads


def test_lsq_step_gradient_symmetric_closed_form():
    # s = 1.5 / 3 = 0.5 at 3 bits symmetric: levels -4..3, z = 0.
    q = UniformQuantizer(3, symmetric=True, learnable=True)
    q.init_range(torch.tensor([-0.2, 1.5]))
    assert q.scale.item() == 0.5 and q.qmin_qmax == (-4, 3)
    xs = [0.3, -1.1, 0.9, 5.0, -9.0]
    # inside: round(x/s) - x/s: round(0.6) - 0.6 = 0.4; round(-2.2) + 2.2 = 0.2; round(1.8) - 1.8 = 0.2
    # above: qmax = 3; below: qmin = -4
    assert _step_grads(q, xs) == pytest.approx([0.4, 0.2, 0.2, 3.0, -4.0], abs=1e-6)


def test_lsq_step_gradient_asymmetric_closed_form():
    # Range [-1, 0.75] at 3 bits: s = 1.75 / 7 = 0.25, z = round(1 / 0.25) = 4, levels 0..7.
    # q = s * (clamp(round(x/s) + z, 0, 7) - z): inside d q/d s = round(x/s) - x/s as in LSQ; clipped,
    # the code's zero point shifts LSQ's bounds: qmin - z = -4 below, qmax - z = 3 above.
    q = UniformQuantizer(3, symmetric=False, learnable=True)
    q.init_range(torch.tensor([-1.0, 0.75]))
    assert q.scale.item() == 0.25 and q.zero_point.item() == 4.0
    xs = [0.3, -0.45, 0.6, 2.0, -2.0]
    # 0.3/0.25 = 1.2 -> -0.2; -1.8 -> round -2 -> -0.2; 2.4 -> 2 -> -0.4; 8 + 4 > 7 -> 3; -8 + 4 < 0 -> -4
    assert _step_grads(q, xs) == pytest.approx([-0.2, -0.2, -0.4, 3.0, -4.0], abs=1e-6)


def test_lsq_gradient_flows_through_a_negative_step_as_its_magnitude():
    # Training quantizes with |s|: d q / d s flips sign with s (what settle_step relies on).
    q = UniformQuantizer(3, symmetric=True, learnable=True)
    q.init_range(torch.tensor([-0.2, 1.5]))
    with torch.no_grad():
        q.scale.neg_()
    assert _step_grads(q, [0.3, 5.0]) == pytest.approx([-0.4, -3.0], abs=1e-6)


# ---- quantizers_disabled ----------------------------------------------------------------------------------
def _model() -> nn.Module:
    m = nn.Module()
    m.a = QuantLayer(nn.Linear(3, 3), 4, 8)
    m.b = QuantLayer(nn.Linear(3, 3), 4, 16)  # weights only: quant_act starts False
    m.b.quant_weight = False  # a switch already off stays off
    m.attn = QuantAttnProcessor(8, 8)
    m.attn.k_quantizer.enabled = False
    return m


def _flags(m: nn.Module) -> dict[str, bool]:
    out = {}
    for name, mod in m.named_modules():
        if isinstance(mod, QuantLayer):
            out[f"{name}.quant_act"], out[f"{name}.quant_weight"] = mod.quant_act, mod.quant_weight
        if isinstance(mod, Quantizer):
            out[f"{name}.enabled"] = mod.enabled
    return out


@pytest.mark.parametrize("acts,weights", [(True, False), (False, True), (True, True)])
def test_disabled_switches_off_and_restores_exactly_even_on_error(acts, weights):
    m = _model()
    before = _flags(m)
    with pytest.raises(KeyError):
        with quantizers_disabled([m.a, m.b, m.attn], acts=acts, weights=weights):
            inside = _flags(m)
            raise KeyError("boom")
    assert _flags(m) == before
    for key, value in inside.items():
        if key.endswith("quant_act") or (key.startswith("attn.") and key.endswith("enabled")):
            assert value == (before[key] and not acts), key
        elif key.endswith("quant_weight"):
            assert value == (before[key] and not weights), key
        else:  # a QuantLayer's own quantizers: gated by the layer's flags, never switched
            assert value == before[key], key


def test_disabled_nested_and_restored_inner_switches():
    m = _model()
    before = _flags(m)
    with quantizers_disabled(m, acts=True, weights=True) as off:
        with quantizers_disabled(m.a, acts=True):  # nested: restores the outer block's (off) state
            pass
        assert not m.a.quant_act and not m.a.quant_weight
        with off.restored(m.a):  # TDQ's pattern: one layer quantized inside an FP pass
            assert m.a.quant_act and m.a.quant_weight and not m.b.quant_act
        assert not m.a.quant_act and not m.a.quant_weight
    assert _flags(m) == before


# ---- every quantizer: subclass of the base, state_dict into a fresh instance of other sizes ---------------
def _all_quantizer_classes() -> set[type]:
    for info in pkgutil.iter_modules(methods.quant.__path__):
        importlib.import_module(f"methods.quant.{info.name}")
    found, todo = set(), [Quantizer]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("methods.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def _pairs():
    """(trained instance, freshly built instance with differently sized state, input, timestep) per class."""
    g = torch.Generator().manual_seed(0)
    x4 = torch.randn(2, 3, 4, 4, generator=g) * 2
    w = torch.randn(5, 3, generator=g)

    u = UniformQuantizer(4, symmetric=True, channel_axis=0)
    u.init_range(w)  # scale [5, 1]; the fresh one's is []
    yield u, UniformQuantizer(4, symmetric=True, channel_axis=0), w, None

    lsq = UniformQuantizer(4, channel_axis=1, learnable=True)
    lsq.init_range(x4)  # a [1, 3, 1, 1] step parameter; the fresh one's is []
    yield lsq, UniformQuantizer(4, channel_axis=1, learnable=True), x4, None

    table = StepTableQuantizer(4, channel_axis=1)
    lo = -torch.rand(2, 3, generator=g) - 0.5
    table.set_ranges(lo, -lo, [700, 300])  # [2, 3] tables; the fresh ones are empty
    yield table, StepTableQuantizer(4, channel_axis=1), x4, (1, 300, 2)

    base = UniformQuantizer(4, False, 0)
    base.init_range(w)
    ada = AdaRoundQuantizer(base, w)
    ada.harden()
    small = UniformQuantizer(4, False, 0)
    small.init_range(w[:2])
    yield ada, AdaRoundQuantizer(small, w[:2]), w, None  # soft [2, 3] -> hardened [5, 3]

    soft_small = AdaRoundQuantizer(small, w[:2])
    yield AdaRoundQuantizer(base, w), soft_small, w, None  # soft [2, 3] -> soft [5, 3]

    mix = GroupMixtureQuantizer(4, num_steps=2, groups=3, channels=3, channel_axis=1)
    mix.calibrating = True
    with timestep_context(1, 300, 2):
        mix(x4)
    mix.calibrating = False
    with torch.no_grad():
        mix.logits.normal_(generator=g)
    yield mix, GroupMixtureQuantizer(4, num_steps=5, groups=3, channels=7, channel_axis=1), x4, (1, 300, 2)

    mlp = TDQStepMLP(0.1, 3.0, enc_dim=8, hidden=8, depth=1)
    with torch.no_grad():
        mlp.net[-1].weight.normal_(generator=g)
    yield TDQActQuantizer(4, mlp), TDQActQuantizer(4, TDQStepMLP(enc_dim=8, hidden=8, depth=1)), x4, (0, 300, 2)

    apq = APQWeightQuantizer(4)
    apq.init_range(w)  # [5, 1] step and clamp bounds; the fresh one's are []
    yield apq, APQWeightQuantizer(4), w, None


def test_every_quantizer_derives_from_the_base_and_is_covered_here():
    covered = {type(q) for q, *_ in _pairs()}
    assert covered == _all_quantizer_classes()
    for cls in covered:
        q = next(q for q, *_ in _pairs() if type(q) is cls)
        assert isinstance(q.bits, int) and isinstance(q.symmetric, bool) and q.enabled and q.active


@pytest.mark.parametrize("index", range(8))
def test_state_dict_round_trip_into_fresh_instance_of_other_size(index):
    q, fresh, x, step = list(_pairs())[index]
    sd = q.state_dict()
    assert any(fresh.state_dict().get(k, torch.empty(0)).shape != v.shape for k, v in sd.items()) or \
        type(q) is TDQActQuantizer  # (TDQ's state is its MLP's: same sizes by construction)
    fresh.load_state_dict(sd)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    if step is None:
        assert torch.equal(fresh(x), q(x))
    else:
        with timestep_context(*step):
            assert torch.equal(fresh(x), q(x))


def test_resize_keeps_a_learnable_step_a_parameter():
    q = UniformQuantizer(4, channel_axis=0, learnable=True)
    q.init_range(torch.randn(3, 2))
    fresh = UniformQuantizer(4, channel_axis=0, learnable=True)
    fresh.load_state_dict(q.state_dict())
    assert isinstance(fresh.scale, nn.Parameter) and fresh.scale.shape == (3, 1)
    assert [n for n, _ in fresh.named_parameters()] == ["scale"]


def test_fast_params_static_forms():
    u = UniformQuantizer(4)
    assert u.fast_params() is None  # not initialised: the identity
    u.init_range(torch.tensor([-1.0, 2.0]))
    p = u.fast_params()
    assert (p.qmin, p.qmax, p.per_step, p.reciprocal) == (0, 15, False, True)
    assert p.scale.item() == pytest.approx(0.2) and p.zero_point.item() == 5.0
    u.enabled = False
    assert u.fast_params() is None
    table = StepTableQuantizer(8)
    table.set_tables(torch.tensor([0.1, 0.2]), torch.zeros(2), [900, 100])
    p = table.fast_params([900, 100])
    assert p.per_step and not p.reciprocal and p.scale.tolist() == pytest.approx([0.1, 0.2])
    with pytest.raises(TypeError):
        table.fast_params([999, 0])  # fitted on another schedule
    # TDQ's export: a table with the step-size MLP as fallback. On the table's own schedule the eager
    # path never calls the MLP, so the table is the static form; elsewhere it stays eager.
    exported = TDQActQuantizer(4, TDQStepMLP()).export([900, 100])
    assert exported.fallback is not None
    p = exported.fast_params([900, 100])
    assert p.per_step and torch.equal(p.scale, exported.scale)
    with pytest.raises(TypeError):
        exported.fast_params([999, 0])
    with pytest.raises(TypeError):
        TDQActQuantizer(4, TDQStepMLP()).fast_params([900, 100])  # no static form until exported
