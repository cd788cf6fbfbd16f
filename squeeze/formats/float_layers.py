"""squeeze's integer layers back to the float layers they replaced, for a model that must load where squeeze's
classes do not exist (squeeze.export): QuantizedLinear → nn.Linear (GPT-2's Conv1D where it was one),
QuantizedEmbedding → nn.Embedding, each holding its dequantized weight (integers × scales, less zero points:
the very values the integer layer computes with; an AWQ input divisor is divided into the weight's columns,
which computes the same function). What is lost is the storage (4 bytes a weight again) and, for
layers that quantized their inputs (dq, qat), the input rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from squeeze.arch.linear import linear_to_conv1d, replace_module
from squeeze.formats.common import share, ties
from squeeze.formats.quantized_layers import QuantizedEmbedding, QuantizedLinear

INTEGER_LAYERS = (QuantizedLinear, QuantizedEmbedding)


@torch.no_grad()
def float_layer(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The float twin of one integer layer, with its dequantized weight (and bias) in `dtype`."""
    weight = (layer.float_weight() if isinstance(layer, QuantizedLinear) else layer.dequantized()).to(dtype)
    if isinstance(layer, QuantizedEmbedding):
        out = nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx,
                           dtype=getattr(torch, layer.out_dtype))
        out.weight.copy_(weight)
        return out
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
    out.weight.copy_(weight)
    if layer.bias is not None:
        out.bias.copy_(layer.bias.to(dtype))
    return linear_to_conv1d(out) if layer.from_conv1d else out


def dequantize_layers(model: nn.Module, which: Callable[[str, nn.Module], bool] | None = None) -> list[str]:
    """Replace the integer layers (all, or those `which(name, layer)` picks, together with any layer sharing their
    weight: a tied LM head) by float ones, in place; their names. Ties between replaced layers are kept."""
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    dtype = floats[0] if floats else torch.float32
    layers = {n: m for n, m in model.named_modules() if isinstance(m, INTEGER_LAYERS)}
    chosen = {n for n, m in layers.items() if which is None or which(n, m)}
    tied = {a.rsplit(".", 1)[0]: b.rsplit(".", 1)[0] for a, b in ties(model).items()
            if a.endswith(".weight") and b.endswith(".weight")}
    for a, b in tied.items():  # a tie goes whole or not at all
        if {a, b} & chosen:
            chosen |= {a, b} & set(layers)
    for name in sorted(chosen):
        replace_module(model, name, float_layer(layers[name], dtype))
    for a, b in tied.items():
        if a in chosen and b in chosen:
            share(model, f"{a}.weight", f"{b}.weight")
    return sorted(chosen)
