"""The fused group mixture gives exactly the autograd form's values and gradients."""

import pytest
import torch

from methods.quant.base import fake_quant, scale_zero_point
from methods.quant.mixture import group_mixture

G = 8


def _case(shape, channel_axis, per_channel, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    c = shape[channel_axis]
    lo = -torch.rand(G, generator=gen) * 4  # narrow enough that the clamp acts on part of x
    hi = torch.rand(G, generator=gen) * 4
    scale, zp = scale_zero_point(lo, hi, 4, False)
    n = x.dim()
    view = [G] + [1] * n
    w_shape = [G] + [1] * n
    if per_channel:
        w_shape[1 + channel_axis % n] = -1
    logits = torch.randn(G, c if per_channel else 1, generator=gen)
    return x, logits, w_shape, scale.view(view), zp.view(view)


@pytest.mark.parametrize("shape,axis,per_channel", [((2, 6, 5, 5), 1, True), ((2, 6, 5, 5), 1, False),
                                                    ((3, 7), -1, True)])
def test_values_and_gradients_equal_the_autograd_form(shape, axis, per_channel):
    x, logits, w_shape, scale, zp = _case(shape, axis, per_channel, seed=len(shape) + per_channel)
    g_out = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    results = []
    for fused in (False, True):
        xi, li = x.clone().requires_grad_(), logits.clone().requires_grad_()
        w = torch.softmax(li, 0).reshape(w_shape)
        if fused:
            out = group_mixture(xi, w, scale, zp, 0, 15)
        else:
            out = (fake_quant(xi.unsqueeze(0), scale, zp, 0, 15) * w).sum(0)
        out.backward(g_out)
        results.append((out.detach(), xi.grad, li.grad))
    (o0, gx0, gl0), (o1, gx1, gl1) = results
    assert torch.equal(o0, o1) and torch.equal(gx0, gx1) and torch.equal(gl0, gl1)
    assert (gx0 == 0).any() and (gx0 != 0).any()  # the clamp cut some gradients and passed others


def test_no_input_gradient_for_a_detached_input():
    x, logits, w_shape, scale, zp = _case((2, 6, 5, 5), 1, True, seed=0)
    li = logits.clone().requires_grad_()
    out = group_mixture(x, torch.softmax(li, 0).reshape(w_shape), scale, zp, 0, 15)
    out.sum().backward()
    assert li.grad is not None and x.grad is None
