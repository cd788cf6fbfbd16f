"""How much of each block a one-shot pruner removes: the same everywhere (uniform), or OWL's allocation
(outlier-weighted layer-wise sparsity, Yin et al. 2024).

OWL's observation: LLM blocks differ in how many of their weights are "outliers" (Wanda score |W_ij|·||X_j||₂
far above the block's mean), and those weights are the ones a uniform cut damages. A block's outlier ratio
(the fraction of its scores above `threshold` × the block's mean score, measured once on the dense model)
sets its density: ratios are mapped linearly onto [0, 2·spread], centred on the target density 1 − sparsity,
so the mean sparsity over blocks stays the target (exactly, as every block of a stack has the same size)
and no block moves more than `spread` from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from squeeze.arch.linear import as_out_in
from squeeze.compress.calibration import collect_stats, layer_stack, linear_layers
from squeeze.errors import SqueezeError

ALLOCATIONS = ("auto", "uniform", "owl")  # auto: owl where sparsity is unstructured, uniform with an N:M pattern


def check_allocation(allocation: str, threshold: float, spread: float, sparsity: float, where: str) -> None:
    if allocation not in ALLOCATIONS:
        raise SqueezeError(f"{where}.allocation={allocation!r} is not one of {' | '.join(ALLOCATIONS)}")
    if not (isinstance(threshold, (int, float)) and threshold > 1):
        raise SqueezeError(f"{where}.owl_threshold={threshold!r} must be a number above 1 (an outlier scores that "
                           "many times the block's mean; the OWL paper uses 5, squeeze's wanda 20)")
    if not (isinstance(spread, (int, float)) and 0 <= spread < min(sparsity, 1 - sparsity) + 1e-12):
        raise SqueezeError(f"{where}.owl_spread={spread!r} must be in [0, {min(sparsity, 1 - sparsity):g}): how far a "
                           f"block's sparsity may move from {sparsity:g} (OWL uses 0.08)")


@torch.no_grad()
def outlier_ratios(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], threshold: float = 5.0) -> list[float]:
    """Per block of the layer stack, the fraction of its layers' Wanda scores above threshold × their mean
    (one pass of the batches through the dense model)."""
    stack = layer_stack(model)
    layers = {f"{i}.{name}": m for i, block in enumerate(stack) for name, m in linear_layers(block).items()}
    stats = collect_stats(model, batches, layers, hessian=False)
    ratios = []
    for i in range(len(stack)):
        scores = torch.cat([(as_out_in(m).detach().abs().float() * stats[n].norms.to(m.weight.device)).reshape(-1)
                            for n, m in layers.items() if n.split(".", 1)[0] == str(i)])
        ratios.append(float((scores > threshold * scores.mean()).float().mean()))
    return ratios


def owl_sparsities(ratios: Sequence[float], sparsity: float, spread: float = 0.08) -> list[float]:
    """Per-block sparsity from outlier ratios: more outliers, less pruned; mean `sparsity`, within ±`spread`."""
    r = torch.tensor(ratios, dtype=torch.float64)
    if len(r) < 2 or float(r.max() - r.min()) == 0.0:
        return [float(sparsity)] * len(r)
    density = (r - r.min()) / (r.max() - r.min()) * 2 * spread
    density = density - density.mean() + (1 - sparsity)
    return [float(1 - d) for d in density]


def block_sparsities(model: nn.Module, batches, sparsity: float, allocation: str = "uniform", threshold: float = 5.0,
                     spread: float = 0.08) -> tuple[list[float] | None, dict]:
    """(per-block sparsity or None for uniform, what result.json records about the allocation)."""
    if allocation == "uniform":
        return None, {"allocation": "uniform"}
    ratios = outlier_ratios(model, batches, threshold)
    sparsities = owl_sparsities(ratios, sparsity, spread)
    return sparsities, {"allocation": "owl", "owl_threshold": threshold, "owl_spread": spread,
                        "outlier_ratio": [round(r, 6) for r in ratios],
                        "block_sparsity": [round(s, 6) for s in sparsities]}
