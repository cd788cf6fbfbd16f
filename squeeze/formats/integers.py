"""Integer math for quantization: pure functions on 2-D tensors whose rows are output channels (a
Linear's weight, an Embedding's token rows).

`choose_qparams` picks one scale (and, affine, a zero point) per tensor, per row, or per group of
`group_size` entries of a row; `quantize` / `dequantize` map to integers and back. Symmetric (Q8BERT:
S = max|W| / 127, clamp to ±127) suits weights; affine (a zero point, so an asymmetric range is not
wasted) suits biases and LayerNorm parameters (the CS229S finding). The integer layers
(quantized_layers.py), the formats and the quantization compressors all use these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_TINY = 1e-12  # scale floor: an all-zero block quantizes to zeros instead of dividing by zero


# -- the math: pure functions ----------------------------------------------------------------------
@dataclass(frozen=True)
class Scheme:
    """How a tensor maps to integers: bits, symmetric or affine, and which entries share a scale."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"  # one scale per row ("channel") or for the whole tensor
    group_size: int | None = None  # with "channel": one scale per `group_size` entries of a row

    @property
    def qmin(self) -> int:
        # Symmetric drops the most negative code so the range is ±(2^(b-1) - 1) (Q8BERT: ±127).
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def blocks(self, shape: Sequence[int]) -> tuple[int, int]:
        """(rows, groups) of the scale tensor for a 2-D tensor of `shape`."""
        rows, cols = shape
        if self.granularity == "tensor":
            return 1, 1
        return rows, cols // (self.group_size or cols)

    def describe(self) -> str:
        where = "per-tensor" if self.granularity == "tensor" else (
            f"group {self.group_size}" if self.group_size else "per-channel")
        return f"int{self.bits} {'symmetric' if self.symmetric else 'affine'} {where}"


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme):
    """Scale and zero point (None when symmetric) that cover [lo, hi] (elementwise tensors)."""
    if scheme.symmetric:
        return (torch.maximum(lo.abs(), hi.abs()) / scheme.qmax).clamp(min=_TINY), None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # zero stays exactly representable (padding, ReLU zeros)
    scale = ((hi - lo) / (scheme.qmax - scheme.qmin)).clamp(min=_TINY)
    zero_point = (scheme.qmin - torch.round(lo / scale)).clamp(scheme.qmin, scheme.qmax).to(torch.int8)
    return scale, zero_point


def choose_qparams(t: torch.Tensor, scheme: Scheme):
    """Scale [rows, groups] (float32) and zero point (int8, affine only) of a 2-D tensor."""
    b = t.detach().float().reshape(*scheme.blocks(t.shape), -1)
    return qparams_from_range(b.amin(-1), b.amax(-1), scheme)


def quantize(t: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """Integer codes (int8 storage, whatever the bits) of a 2-D tensor, in its shape."""
    q = torch.round(t.detach().float().reshape(*scale.shape, -1) / scale.unsqueeze(-1))
    if zero_point is not None:
        q = q + zero_point.unsqueeze(-1)
    return q.clamp(scheme.qmin, scheme.qmax).to(torch.int8).reshape(t.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Float32 values of integer codes; the scale's shape says how entries share it."""
    b = q.reshape(*scale.shape, -1).float()
    if zero_point is not None:
        b = b - zero_point.unsqueeze(-1).float()
    return (b * scale.unsqueeze(-1)).reshape(q.shape)


class _StraightThrough(torch.autograd.Function):
    """Forward the quantized values, pass the gradient through unchanged (the STE of Q8BERT)."""

    @staticmethod
    def forward(ctx, t, quantized):
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quant(t: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """`t` quantized and dequantized (same dtype), with a straight-through gradient."""
    scale, zero_point = choose_qparams(t, scheme)
    values = dequantize(quantize(t, scale, zero_point, scheme), scale, zero_point)
    return _StraightThrough.apply(t, values.to(t.dtype))


def fake_quant_any(t: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """fake_quant for a tensor of any rank: 1-D (biases, norms) as one row, Conv1D's [in, out] transposed."""
    if t.dim() == 1:
        return fake_quant(t.unsqueeze(0), scheme).squeeze(0)
    return fake_quant(t, scheme)


def fake_quant_with(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: Scheme):
    """An activation quantized with a given per-tensor scale (and zero point), straight-through."""
    scale = scale.reshape(1, 1)
    zero_point = None if zero_point is None else zero_point.reshape(1, 1)
    values = dequantize(quantize(x.reshape(1, -1), scale, zero_point, scheme), scale, zero_point)
    return _StraightThrough.apply(x, values.reshape(x.shape).to(x.dtype))


def quantization_error_bound(scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """scale / 2 for every entry of a 2-D tensor: no entry in range is further than that from its code."""
    rows, cols = shape
    return (scale.unsqueeze(-1) / 2).expand(*scale.shape, rows * cols // scale.numel()).reshape(rows, cols)
