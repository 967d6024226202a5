"""StepTableQuantizer: per-step lookup through the timestep context, timestep mapping, persistence."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from methods.quant.step_table import StepTableQuantizer
from methods.quant.timestep import timestep_context

torch.set_num_threads(1)


def _table() -> StepTableQuantizer:
    q = StepTableQuantizer(bits=4, symmetric=False)  # levels 0..15
    q.set_tables(torch.tensor([0.1, 0.5, 1.0]), torch.tensor([0.0, 2.0, 8.0]), [900, 500, 100])
    return q


def test_lookup_per_step_hand_computed():
    q = _table()
    x = torch.tensor([0.26, 10.0, -3.0])
    with timestep_context(0, 900, 3):
        # step 0: s=0.1, z=0: round(2.6)=3 -> 0.3; 100 -> 15 -> 1.5; -30 -> 0 -> 0
        assert torch.allclose(q(x), torch.tensor([0.3, 1.5, 0.0]))
    with timestep_context(1, 500, 3):
        # step 1: s=0.5, z=2: round(0.52)+2=3 -> 0.5; 22 -> 15 -> 6.5; -6+2=-4 -> 0 -> -1.0
        assert torch.allclose(q(x), torch.tensor([0.5, 6.5, -1.0]))


def test_per_channel_broadcast_conv_and_linear():
    q = StepTableQuantizer(bits=8, channel_axis=1)
    q.set_tables(torch.tensor([[1.0, 0.5]]), torch.zeros(1, 2), [10])
    x = torch.full((1, 2, 2, 2), 0.7)
    with timestep_context(0, 10, 1):
        y = q(x)
    assert torch.allclose(y[:, 0], torch.full((1, 2, 2), 1.0)) and torch.allclose(y[:, 1], torch.full((1, 2, 2), 0.5))
    ql = StepTableQuantizer(bits=8, channel_axis=-1)
    ql.set_tables(torch.tensor([[1.0, 0.5]]), torch.zeros(1, 2), [10])
    with timestep_context(0, 10, 1):
        assert torch.allclose(ql(torch.full((3, 4, 2), 0.7))[0, 0], torch.tensor([1.0, 0.5]))


def test_other_step_counts_map_to_nearest_timestep():
    q = _table()
    assert q.row_for(1, 500, 3) == 1  # the calibration schedule itself
    assert q.row_for(0, 100, 7) == 2  # same timestep at another position
    assert q.row_for(3, 480, 7) == 1  # nearest calibrated timestep
    assert q.row_for(0, 999, 7) == 0
    assert q.row_for(6, 0, 7) == 2


class _Fallback(nn.Module):
    def params_at(self, t):
        return t.float() / 1000.0, torch.zeros(t.shape)


def test_fallback_serves_unseen_timesteps():
    q = StepTableQuantizer(bits=8, fallback=_Fallback())
    q.set_tables(torch.tensor([0.1]), torch.tensor([0.0]), [100])
    assert q.row_for(0, 100, 1) == 0 and q.row_for(0, 250, 2) is None
    with timestep_context(0, 250, 2):  # s = 0.25: 0.3 -> round(1.2)=1 -> 0.25
        assert torch.allclose(q(torch.tensor([0.3])), torch.tensor([0.25]))


def test_outside_context_raises():
    with pytest.raises(RuntimeError, match="timestep context"):
        _table()(torch.zeros(2))


def test_state_dict_and_pickle_round_trip():
    q = _table()
    fresh = StepTableQuantizer(bits=4)
    fresh.load_state_dict(q.state_dict())
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.linspace(-2, 8, 50)
    for i, t in enumerate([900, 500, 100]):
        with timestep_context(i, t, 3):
            assert torch.equal(fresh(x), q(x)) and torch.equal(loaded(x), q(x))
