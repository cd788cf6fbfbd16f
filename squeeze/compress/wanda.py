"""Wanda (Sun et al. 2023): one-shot pruning by |W_ij| · ||X_j||₂, without weight updates.

Magnitude pruning ignores that an input channel carrying large activations makes all of its weights
matter more; Wanda weighs each weight by its input's L2 norm over calibration tokens, and compares
weights within an output row (each output keeps the same fraction), which the paper found better
than one comparison per layer for LLMs. No weight updates: one pass of statistics.

The paper's mask stops there; squeeze then improves each row's mask by swaps that lower the layer's output error
on the calibration inputs (`swaps`, squeeze/compress/mask_swaps.py), which needs the inputs' Hessian XᵀX as
SparseGPT does (in² floats per layer while its block is calibrated). `swaps=0` is the paper's Wanda.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from squeeze.arch.linear import as_out_in, is_transposed
from squeeze.compress.calibration import LayerStats, prune_layer_stack
from squeeze.compress.mask_swaps import swap_refine
from squeeze.compress.oneshot import OneShotPruner
from squeeze.compress.sparsity_pattern import check_width, nm_mask, resolve_sparsity, row_mask
from squeeze.errors import SqueezeError


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W| · ||X_j||₂ for a weight [out, in] and input norms [in]."""
    if norms.shape != (weight.shape[1],):
        raise SqueezeError(f"wanda: {norms.numel()} input norms for a weight taking {weight.shape[1]} inputs")
    return weight.detach().abs().float() * norms.float().to(weight.device).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, sparsity: float | None = 0.5,
               pattern: str = "unstructured") -> torch.Tensor:
    """Keep-mask [out, in]: per row, the lowest-scoring round(sparsity·in) weights pruned, or N of every M kept."""
    sparsity, nm = resolve_sparsity(sparsity, pattern)
    check_width(weight.shape[1], nm)
    scores = wanda_scores(weight, norms)
    return row_mask(scores, sparsity) if nm is None else nm_mask(scores, *nm)


@torch.no_grad()
def prune_layer(module: nn.Module, stats: LayerStats, sparsity: float | None = 0.5,
                pattern: str = "unstructured", swaps: int = 0, changed: dict | None = None) -> torch.Tensor:
    """Wanda-prune one Linear/Conv1D in place; its keep-mask in the weight's stored orientation. `swaps`: then at
    most that many mask swaps per row (mask_swaps.py; needs `stats.hessian`); `changed` (if given) counts the
    weights whose kept/pruned state the swaps changed ("weights") of all ("of")."""
    mask = wanda_mask(as_out_in(module), stats.norms, sparsity, pattern)
    if swaps:
        refined, _ = swap_refine(as_out_in(module), mask, stats.hessian, swaps, resolve_sparsity(sparsity, pattern)[1])
        if changed is not None:
            changed["weights"] = changed.get("weights", 0) + int((refined != mask).sum())
            changed["of"] = changed.get("of", 0) + mask.numel()
        mask = refined
    mask = mask.t() if is_transposed(module) else mask
    module.weight.mul_(mask.to(module.weight.dtype))
    return mask


def wanda_model(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], sparsity: float | None = 0.5,
                pattern: str = "unstructured", errors: dict[str, float] | None = None,
                block_sparsity: Sequence[float] | None = None, within_block: bool = False,
                swaps: int = 0, changed: dict | None = None) -> dict[str, torch.Tensor]:
    """Wanda on every Linear/Conv1D of the layer stack, block by block on the pruned model's own inputs
    (as the paper's code does); keep-masks by layer name, in each weight's stored orientation.
    `block_sparsity`: one sparsity per block (layer_sparsity's OWL) instead of `sparsity` everywhere;
    `swaps`/`changed`: prune_layer's (the inputs' Hessians are then accumulated too)."""
    _, nm = resolve_sparsity(sparsity, pattern)
    prune_one = lambda module, stats, s: prune_layer(module, stats, s or sparsity, pattern, swaps,  # noqa: E731
                                                     changed)
    return prune_layer_stack(model, batches, prune_one, nm, hessian=swaps > 0, errors=errors,
                             block_sparsity=block_sparsity, within_block=within_block)


class Wanda(OneShotPruner):
    """One-shot Wanda pruning (`compress=wanda`): `sparsity` of every layer-stack Linear/Conv1D, per output
    row, or `pattern=2:4|4:8`; no weight updates. Calibration: the run's `calibration:` settings; per-block
    amounts and sequential calibration: squeeze/compress/oneshot.py."""

    method = "wanda"

    # OWL with a high outlier threshold is Wanda's default: on SmolLM2 at 50 % it measured 1.660× / 1.675× fp32
    # perplexity (two calibration seeds) against uniform's 1.716× / 1.719× (benchmarks/sparsity_study.py); mask
    # swaps on top of it (swaps=64): 1.356× / 1.368×, uniform with swaps 1.368×, swaps=16 1.396×, 1000 1.363×; 2:4
    # 2.292× with swaps, 4.036× without (benchmarks/ptq_quality.py --only wanda)
    def __init__(self, sparsity: float | None = 0.5, pattern: str = "unstructured", allocation: str = "auto",
                 owl_threshold: float = 20.0, owl_spread: float = 0.08, sequential: str = "blocks", swaps: int = 64):
        super().__init__(sparsity, pattern, allocation, owl_threshold, owl_spread, sequential)
        check_swaps(swaps, f"compress.{self.method}")
        self.swaps = swaps
        self._changed: dict = {}

    @classmethod
    def check_values(cls, name: str, settings: dict) -> None:
        super().check_values(name, settings)
        default = inspect.signature(cls.__init__).parameters["swaps"].default
        check_swaps(settings.get("swaps", default), f"compress.{name}")

    def prune(self, model, batches, block_sparsity, within_block):
        self._changed = {}
        return wanda_model(model, batches, self.sparsity, self.pattern, errors=self.layer_error,
                           block_sparsity=block_sparsity, within_block=within_block, swaps=self.swaps,
                           changed=self._changed)

    def summary(self):
        changed = self._changed.get("weights", 0) / max(self._changed.get("of", 0), 1)
        return {**super().summary(), "swaps": self.swaps,
                **({"mask_changed_by_swaps": round(changed, 6)} if self.swaps else {}),
                "layer_error_kind": "relative output error on the calibration inputs" if self.swaps
                else "relative output error, diagonal estimate"}


def check_swaps(swaps, where: str) -> None:
    if not isinstance(swaps, int) or isinstance(swaps, bool) or swaps < 0:
        raise SqueezeError(f"{where}.swaps={swaps!r} must be a whole number ≥ 0 (mask swaps per row; 0: Wanda's "
                           "mask as published)")
