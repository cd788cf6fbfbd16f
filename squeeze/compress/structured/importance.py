"""Importance scores for structured pruning: which heads, head dims and MLP neurons matter least.

Heads: by weight magnitude, or by Michel et al.'s gradient importance on training batches.
Head dims and neurons: by weight magnitude only (the product of the norms of what writes and reads them).
All read weights through the family adapter, as [out, in].
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from squeeze.arch import Adapter
from squeeze.arch.linear import as_out_in
from squeeze.errors import SqueezeError


def magnitude_head_scores(adapter: Adapter, layer) -> torch.Tensor:
    """Per KV group: Σ over its query heads of ‖W_V,kv‖·‖W_O,h‖. Attention rows sum to one, so this
    bounds what a head can add to the residual stream (the q/k weights only decide where it looks)."""
    s = adapter.shape(layer)
    _, _, v, o = adapter.qkvo(layer)
    d = s.head_dim
    v_norm = v.detach().float().reshape(s.kv_heads, d, -1).norm(dim=(1, 2))
    o_norm = o.detach().float().reshape(o.shape[0], s.heads, d).norm(dim=(0, 2))
    return (o_norm.reshape(s.kv_heads, s.group) * v_norm[:, None]).sum(dim=1)


def gradient_head_scores(adapter: Adapter, model, batches: Iterable[dict]) -> list[torch.Tensor]:
    """Michel et al. 2019: a gate ξ_h = 1 on each head's output, importance Σ_batches |∂L/∂ξ_h|,
    summed per KV group. Only the gates take gradients: the weights' .grad is left untouched."""
    layers = [layer for _, layer in adapter.layers(model)]
    shapes = [adapter.shape(layer) for layer in layers]
    device = next(model.parameters()).device
    gates = [torch.ones(s.heads, device=device, requires_grad=True) for s in shapes]
    totals = [torch.zeros(s.heads, device=device) for s in shapes]

    def gate_hook(gate, head_dim):
        def hook(module, args):
            x = args[0]
            gated = x.unflatten(-1, (-1, head_dim)) * gate[:, None].to(x.dtype)
            return (gated.flatten(-2), *args[1:])
        return hook

    handles = [adapter.o_proj(layer).register_forward_pre_hook(gate_hook(g, s.head_dim))
               for layer, g, s in zip(layers, gates, shapes)]
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    seen = 0
    try:
        model.eval()  # no dropout: the gradient of the model that will be kept
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in batches:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss = model(**batch).loss
                if loss is None:
                    raise SqueezeError("gradient head importance needs batches with labels (the model returned no loss)")
                loss.backward()
                for gate, total in zip(gates, totals):
                    total += gate.grad.abs()
                    gate.grad = None
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise SqueezeError("gradient head importance got no batches; the training split is empty")
    return [total.reshape(s.kv_heads, s.group).sum(dim=1).cpu() for total, s in zip(totals, shapes)]


def head_dim_scores(adapter: Adapter, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """([heads, head_dim] q/k scores ‖q_i‖·‖k_i‖ (their product is what dim i adds to a score),
    [heads, head_dim] v scores ‖v_i‖·‖o_i‖)."""
    s = adapter.shape(layer)
    wq, wk, wv, wo = (w.detach().float() for w in adapter.qkvo(layer))
    qk = (wq.norm(dim=1) * wk.norm(dim=1)).reshape(s.heads, s.head_dim)
    v = (wv.norm(dim=1) * wo.norm(dim=0)).reshape(s.heads, s.head_dim)
    return qk, v


def neuron_scores(adapter: Adapter, layer) -> torch.Tensor:
    """Per MLP neuron: ‖its input rows‖ (all of them, e.g. Llama's gate and up) · ‖its output column‖."""
    ins, (out_parent, out_name) = adapter.mlp(layer)
    in_norm = sum(as_out_in(getattr(p, n)).detach().float().norm(dim=1) ** 2 for p, n in ins) ** 0.5
    out_norm = as_out_in(getattr(out_parent, out_name)).detach().float().norm(dim=0)
    return in_norm * out_norm
