"""Quantized attention matmuls (Q-Diffusion's ``QuantQKMatMul`` / ``QuantSMVMatMul``) as a diffusers processor.

:class:`QuantAttnProcessor` computes the same attention as diffusers' ``AttnProcessor``
but fake-quantizes the inputs of both matmuls: ``q`` and ``k`` before ``Q K^T``, the
softmax probabilities and ``v`` before ``softmax · V``. Each input has its own per-tensor
:class:`~methods.quant.quantizer.UniformQuantizer` (activation bits; the softmax bits
are separate, 16 keeps the probabilities in full precision as Q-Diffusion does for
Stable Diffusion with ``--sm_abit 16``). The processor is an ``nn.Module`` set with
``attn.set_processor``, so its quantizers live in the model's state dict and move with
``.to(device)``; it holds all per-call state itself (no patched forwards).

Range initialisation: :class:`AttentionRangeObserver` switches the matmul quantizers
off, records what they would see during a calibration pass (min/max, and a uniform random
subsample of all values, :class:`~methods.quant.calibrate.Reservoir`, for the L_p search) and fits
the ranges on exit; it can share one pass with
:func:`methods.quant.calibrate.init_activation_ranges`.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.quant.base import OFF_BITS
from methods.quant.calibrate import Reservoir
from methods.quant.layers import quantizers_disabled
from methods.quant.quantizer import UniformQuantizer

MATMUL_INPUTS = ("q", "k", "probs", "v")


class QuantAttnProcessor(nn.Module):
    """Attention with fake-quantized matmul inputs; ranges per tensor, asymmetric by default."""

    def __init__(self, a_bits: int = 8, softmax_bits: int = 8, symmetric: bool = False,
                 softmax_symmetric: bool = False) -> None:
        super().__init__()
        self.q_quantizer = UniformQuantizer(a_bits, symmetric, None)
        self.k_quantizer = UniformQuantizer(a_bits, symmetric, None)
        self.v_quantizer = UniformQuantizer(a_bits, symmetric, None)
        # Probabilities are in [0, 1]: an asymmetric grid uses all 2^b levels, a symmetric one (Q-Diffusion's
        # softmax quantizer under --a_sym) only the 2^(b-1) non-negative ones.
        self.probs_quantizer = UniformQuantizer(softmax_bits, softmax_symmetric, None)
        self.observer = None  # callable(name, tensor) during range calibration

    def quantizers(self) -> dict[str, UniformQuantizer]:
        return {"q": self.q_quantizer, "k": self.k_quantizer, "probs": self.probs_quantizer, "v": self.v_quantizer}

    def _quant(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(name, x)
        return self.quantizers()[name](x)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        query = self._quant("q", attn.head_to_batch_dim(query))
        key = self._quant("k", attn.head_to_batch_dim(key))
        value = self._quant("v", attn.head_to_batch_dim(value))
        probs = self._quant("probs", attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def extra_repr(self) -> str:
        return f"qk=a{self.q_quantizer.bits}, smv=a{self.probs_quantizer.bits}/a{self.v_quantizer.bits}"


def _attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}


def quantize_attention(unet: nn.Module, a_bits: int, softmax_bits: int | None = None, symmetric: bool = False,
                       softmax_symmetric: bool = False) -> int:
    """Give every diffusers ``Attention`` of ``unet`` a :class:`QuantAttnProcessor`; return how many."""
    if a_bits >= OFF_BITS:
        return 0
    softmax_bits = a_bits if softmax_bits is None else softmax_bits
    count = 0
    for attn in _attention_modules(unet).values():
        attn.set_processor(QuantAttnProcessor(a_bits, softmax_bits, symmetric, softmax_symmetric))
        count += 1
    return count


def attention_processors(unet: nn.Module) -> dict[str, QuantAttnProcessor]:
    """``{attention module name: processor}`` for every quantized attention."""
    return {n: m.processor for n, m in _attention_modules(unet).items() if isinstance(m.processor, QuantAttnProcessor)}


def attention_summary(unet: nn.Module) -> dict[str, str]:
    """Coverage entries (``QuantSummary.extra``): ``name.qk`` / ``name.smv`` -> bits."""
    out = {}
    for name, p in attention_processors(unet).items():
        out[f"{name}.qk"] = f"a{p.q_quantizer.bits}"
        out[f"{name}.smv"] = f"a{p.probs_quantizer.bits}(softmax)/a{p.v_quantizer.bits}(v)"
    return out


class AttentionRangeObserver:
    """Context manager: record matmul inputs during a calibration pass, fit the ranges on exit."""

    def __init__(self, unet: nn.Module, method: str = "minmax", p: float = 2.4, max_values: int = 1 << 20) -> None:
        self.procs = attention_processors(unet)
        self.method, self.p, self.max_values = method, p, max_values
        self.lo: dict[str, torch.Tensor] = {}
        self.hi: dict[str, torch.Tensor] = {}
        self.reservoir: dict[str, Reservoir] = {}
        self.gen = torch.Generator().manual_seed(0)

    def _observer(self, proc_name: str):
        def observe(name: str, x: torch.Tensor) -> None:
            key = f"{proc_name}/{name}"
            x = x.detach().float()
            lo, hi = x.amin(), x.amax()
            self.lo[key] = torch.minimum(self.lo[key], lo) if key in self.lo else lo
            self.hi[key] = torch.maximum(self.hi[key], hi) if key in self.hi else hi
            if self.method != "minmax":
                self.reservoir.setdefault(key, Reservoir(self.max_values, self.gen)).add(x)

        return observe

    def __enter__(self) -> AttentionRangeObserver:
        # The observer records what the matmuls see unquantized; the layers' own switches are
        # not touched (init_activation_ranges handles those when both share one pass).
        self._off = quantizers_disabled(list(self.procs.values()), acts=True)
        self._off.__enter__()
        for name, proc in self.procs.items():
            proc.observer = self._observer(name)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._off.__exit__(exc_type, exc, tb)
        for name, proc in self.procs.items():
            proc.observer = None
            for qname, q in proc.quantizers().items():
                key = f"{name}/{qname}"
                if exc_type is not None or key not in self.lo:
                    continue
                if self.method != "minmax":
                    q.init_range(self.reservoir[key].values, method=self.method, p=self.p)
                else:
                    q.set_range(self.lo[key], self.hi[key])

