"""Activation range fitting sees every calibration step (the L_p search's uniform subsample)."""

import torch

from methods.quant.calibrate import Reservoir, init_activation_ranges
from methods.quant.layers import QuantLayer

torch.set_num_threads(1)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = QuantLayer(torch.nn.Linear(64, 4), 8, 8)

    def forward(self, x, t, cond=None):
        return self.lin(x)


def _samples(late_scale: float, steps: int = 20, per_step: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * per_step, 64, generator=g)
    step = torch.arange(steps).repeat_interleave(per_step)
    x[step >= steps // 2] *= late_scale  # late (clean) steps: a wider distribution
    return {"x": x, "t": 999 - 50 * step, "step": step, "cond": None}


def test_reservoir_sees_late_steps():
    ranges = []
    for late in (1.0, 8.0):
        net = _Toy()
        net.lin.init_weight_range("minmax")
        # 1,024 values out of 5,120: the search must still see the late half of the steps
        init_activation_ranges(net, {"lin": net.lin}, _samples(late), 20, method="mse", batch_size=4,
                               max_values=1024)
        ranges.append(float(net.lin.act_quantizer.scale))
    assert ranges[1] > 3 * ranges[0]


def test_reservoir_is_uniform_over_the_stream():
    gen = torch.Generator().manual_seed(0)
    r = Reservoir(2000, gen)
    for i in range(20):  # batch i holds the value i
        r.add(torch.full((500,), float(i)))
    counts = torch.bincount(r.values.long(), minlength=20).float()
    assert r.values.numel() == 2000 and counts.min() > 60 and counts.max() < 140  # 100 expected per batch


def test_reservoir_keeps_exactly_the_smallest_keys_of_the_whole_stream():
    r = Reservoir(700, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)  # the same key stream, drawn by hand
    keys, values = [], []
    for i in range(12):
        x = torch.arange(300, dtype=torch.float32) + 1000 * i
        r.add(x)
        keys.append(torch.rand(300, generator=replay))
        values.append(x)
    order = torch.cat(keys).argsort()[:700]
    assert torch.equal(r.keys.sort().values, torch.cat(keys)[order])
    assert torch.equal(r.values.sort().values, torch.cat(values)[order].sort().values)
