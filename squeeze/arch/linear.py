"""Linear-or-Conv1D orientation, the one place that knows GPT-2's Conv1D stores its weight as [in, out].

Every technique that reads or rewrites a projection (pruning rows, removing heads, quantizing channels,
saving packed integers) asks here instead of testing for Conv1D itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def is_transposed(module: nn.Module) -> bool:
    """True for a layer whose weight is stored [in_features, out_features] (GPT-2's Conv1D)."""
    return isinstance(module, Conv1D)


def as_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features], a view (no copy)."""
    return module.weight.t() if is_transposed(module) else module.weight


def features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    if is_transposed(module):
        return module.nf, module.nx
    return tuple(module.weight.shape)


def conv1d_to_linear(conv: Conv1D) -> nn.Linear:
    """The nn.Linear computing exactly what `conv` computes: Conv1D's weight is [in, out], Linear's [out, in]."""
    w = conv.weight
    linear = nn.Linear(conv.nx, conv.nf, bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.detach().t())
        linear.bias.copy_(conv.bias.detach())
    linear.train(conv.training)
    return linear


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def convert_conv1d(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Replace Conv1D layers (all, or those named) by equivalent Linear layers; their names."""
    chosen = [n for n, m in model.named_modules() if isinstance(m, Conv1D) and (names is None or n in names)]
    for name in chosen:
        replace_module(model, name, conv1d_to_linear(model.get_submodule(name)))
    return chosen
