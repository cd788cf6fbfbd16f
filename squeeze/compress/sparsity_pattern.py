"""Which weights a one-shot pruner may remove: `unstructured` (any `sparsity` of each row or block) or
N:M ("2:4", "4:8": in every group of M consecutive input weights of a row, N are kept — the layout
sparse tensor cores run, torch.sparse.to_sparse_semi_structured for 2:4).

Masks are bool, True = kept (as squeeze/compress/pruning.py's), shaped like the weight they prune.
Scores and masks here are [out, in] (rows = output channels, as nn.Linear stores them); a GPT-2
Conv1D's mask is transposed back by the caller, to its stored [in, out].
"""

from __future__ import annotations

import re

import torch

from squeeze.errors import SqueezeError

PATTERNS = "unstructured | N:M (e.g. 2:4, 4:8)"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for unstructured, else (N, M)."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match:
        raise SqueezeError(f"sparsity pattern={pattern!r} is not one of {PATTERNS}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise SqueezeError(f"sparsity pattern={pattern!r}: N:M keeps N of every M weights, so 0 < N < M "
                           "(2:4 keeps half)")
    return n, m


def resolve_sparsity(sparsity: float | None, pattern: str) -> tuple[float, tuple[int, int] | None]:
    """(fraction pruned, N:M or None). N:M fixes the fraction at 1 − N/M; a different `sparsity` is refused."""
    nm = parse_pattern(pattern)
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise SqueezeError(f"sparsity={sparsity} contradicts pattern={pattern!r}, which prunes {implied:g}; "
                               "drop sparsity (null) or set it to that")
        return implied, nm
    sparsity = 0.5 if sparsity is None else sparsity
    if not 0 < sparsity < 1:
        raise SqueezeError(f"sparsity={sparsity} must be in (0, 1): the fraction of weights pruned (0.5 = half)")
    return float(sparsity), None


def check_width(in_features: int, nm: tuple[int, int] | None, where: str = "") -> None:
    if nm is not None and in_features % nm[1]:
        raise SqueezeError(f"pattern {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}, but {where or 'a layer'} "
                           f"takes {in_features}; use pattern=unstructured or exclude that layer")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores of every M consecutive entries of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the round(sparsity × in) lowest scores of every row (Wanda's per-output comparison group)."""
    rows, cols = scores.shape
    pruned = round(sparsity * cols)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if pruned:
        keep.scatter_(1, scores.topk(pruned, dim=1, largest=False).indices, False)
    return keep


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Prune exactly `count` lowest scores of the whole tensor."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count:
        keep[scores.reshape(-1).topk(count, largest=False).indices] = False
    return keep.reshape(scores.shape)


def follows_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of M consecutive entries of each row keeps at most N."""
    rows, cols = mask.shape
    return cols % m == 0 and bool((mask.reshape(rows, cols // m, m).sum(-1) <= n).all())


def masks_summary(masks: dict[str, torch.Tensor], sparsity: float, pattern: str) -> dict:
    """What result.json records for a one-shot pruner: sparsity reached (over the pruned layers), per layer,
    and for 2:4 that the weights are laid out for torch's semi-structured sparse kernels."""
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    nm = parse_pattern(pattern)
    return {"sparsity": round(pruned / total, 6) if total else 0.0, "target": sparsity, "pattern": pattern,
            "pruned_params": total, "layer_sparsity": {n: round(float((~m).float().mean()), 6) for n, m in masks.items()},
            "semi_structured": nm == (2, 4)}


def to_semi_structured(model: torch.nn.Module, names) -> int:
    """Swap the 2:4-pruned nn.Linear weights `names` (module names) of a CUDA fp16/bf16 model for torch's
    semi-structured sparse tensors (torch.sparse.to_sparse_semi_structured: the sparse tensor cores'
    kernels); the count converted. GPT-2's Conv1D is transposed ([in, out]) and is left dense."""
    from torch.sparse import to_sparse_semi_structured

    done = 0
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not torch.nn.Linear or not module.weight.is_cuda:
            continue
        if not follows_nm(module.weight != 0, 2, 4):
            raise SqueezeError(f"{name} is not 2:4 sparse; prune it with pattern=2:4 first")
        module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
        done += 1
    return done
