"""Linear-or-Conv1D orientation, the one place that knows GPT-2's Conv1D stores its weight as [in, out].

Every technique that reads or rewrites a projection (pruning rows, removing heads, quantizing channels,
saving packed integers) asks here instead of testing for Conv1D itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def projection_kind(module: nn.Module) -> str | None:
    """"linear" for an nn.Linear, "conv1d" for GPT-2's Conv1D, None for anything else. Exact types: a
    subclass (MultiheadAttention's out_proj, a scaled layer) computes more than the projection, which a
    technique that rewrites or replaces the layer would drop."""
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is Conv1D:
        return "conv1d"
    return None


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


def linear_to_conv1d(linear: nn.Linear) -> Conv1D:
    """The Conv1D computing exactly what `linear` computes (GPT-2's layer again, e.g. for a stock checkpoint)."""
    w = linear.weight
    conv = Conv1D(linear.out_features, linear.in_features).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        conv.weight.copy_(w.detach().t())
        conv.bias.copy_(linear.bias.detach() if linear.bias is not None else torch.zeros_like(conv.bias))
    conv.train(linear.training)
    return conv


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def convert_conv1d(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Replace Conv1D layers (all, or those named) by equivalent Linear layers; their names."""
    chosen = [n for n, m in model.named_modules() if isinstance(m, Conv1D) and (names is None or n in names)]
    for name in chosen:
        replace_module(model, name, conv1d_to_linear(model.get_submodule(name)))
    return chosen


def sliced(module: nn.Module, index: torch.Tensor, out: bool) -> nn.Module:
    """A copy of a Linear or Conv1D keeping only the output (`out`) or input features in `index`."""
    w = module.weight.detach()
    transposed = is_transposed(module)
    out_dim = 1 if transposed else 0  # Conv1D's weight is [in, out]
    index = index.to(w.device)
    weight = w.index_select(out_dim if out else 1 - out_dim, index).clone()
    bias = None
    if module.bias is not None:
        bias = module.bias.detach().index_select(0, index).clone() if out else module.bias.detach().clone()
    with torch.device("meta"):  # shapes only; the sliced tensors replace the parameters below
        if transposed:
            new = Conv1D(weight.shape[1], weight.shape[0])
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=module.bias.requires_grad)
    return new
