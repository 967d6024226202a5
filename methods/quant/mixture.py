"""ADP-DM's group mixture ``sum_g w[g] * fake_quant(x; scale[g], zp[g])`` as one autograd function.

Written out by autograd, the mixture keeps about ten ``[G, *x.shape]`` intermediates per call
(divide, round, the STE's subtract and add, zero point, clamp, subtract, scale, weight); over
eight groups that makes the search's forward and backward several times the FP model's cost.
This function computes the same values in place on one ``[G, *x.shape]`` buffer and keeps only
the fake-quantized groups and the clamp mask for the backward pass.

Same numbers, not an approximation: the forward is :func:`methods.quant.base.fake_quant`'s
arithmetic (its STE ``(round(y) - y) + y`` equals ``round(y)`` exactly), and the backward repeats,
operation for operation, what autograd derives from that expression: the weight gradient
``(g * q)`` summed to the weight's shape, and the input gradient ``((g * w) * scale``, zeroed
unless strictly inside the clamp range, ``/ scale)`` summed over groups (the STE passes the gradient through
the rounding). The ranges come from the candidates (no gradient), as in the search.
``tests/test_group_mixture.py`` checks values and gradients against the autograd form with
``torch.equal``.
"""

from __future__ import annotations

import torch


class GroupMixtureFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                qmin: int, qmax: int) -> torch.Tensor:
        # scale, zero_point: [G, 1, ...] against x [...]; w: [G, ...] broadcastable to [G, *x.shape]
        a = (x.unsqueeze(0) / scale).round_().add_(zero_point)
        # where torch's clamp backward passes the gradient: strictly inside the range (an integer level
        # on qmin or qmax gets none, as tests/test_group_mixture.py checks against autograd)
        inside = (a > qmin) & (a < qmax)
        q = a.clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
        ctx.save_for_backward(q, inside, w, scale)
        return (q * w).sum(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, inside, w, scale = ctx.saved_tensors
        g = grad.unsqueeze(0)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g * q).sum_to_size(w.shape)
        if ctx.needs_input_grad[0]:
            grad_x = (g * w).mul_(scale).masked_fill_(~inside, 0).div_(scale).sum(0)
        return grad_x, grad_w, None, None, None, None


def group_mixture(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  qmin: int, qmax: int) -> torch.Tensor:
    """``sum_g w[g] * fake_quant(x; scale[g], zero_point[g], qmin, qmax)`` (STE on the rounding)."""
    return GroupMixtureFakeQuant.apply(x, w, scale, zero_point, qmin, qmax)
