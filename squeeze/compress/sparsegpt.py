"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning that updates the surviving weights so the
layer's output on calibration inputs changes as little as possible (Optimal Brain Surgeon, made
cheap by sharing one inverse Hessian across rows, as GPTQ does for quantization).

With U the upper Cholesky factor of H⁻¹ (H = 2XXᵀ/n), columns are visited left to right; pruning
w_ij costs w_ij² / U_jj² (OBS saliency), and zeroing column j's pruned entries is compensated by
w_{j+1:} −= e_j U_{j,j+1:} with e_j = (w_j − ŵ_j)/U_jj. The mask is chosen block by block
(`block_size` columns at a time, over all rows: "adaptive mask selection"), from the weights as
updated so far; N:M picks, in every M columns, the N weights of each row with the highest saliency.
Unstructured sparsity is exact over the whole matrix: each block prunes its share of round(sparsity·n).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from squeeze.arch.linear import as_out_in, is_transposed
from squeeze.compress.calibration import LayerStats, prune_layer_stack
from squeeze.compress.oneshot import OneShotPruner
from squeeze.compress.sparsity_pattern import check_width, lowest_mask, nm_mask, resolve_sparsity
from squeeze.errors import SqueezeError


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = percdamp × mean diag(H)."""
    h = hessian.clone()
    h.diagonal().add_(percdamp * float(h.diagonal().mean()))
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as err:
        raise SqueezeError(f"the calibration Hessian is not positive definite even with percdamp={percdamp}; raise "
                           "percdamp (e.g. 0.1) or calibrate on more samples") from err


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = 0.5,
                    pattern: str = "unstructured", percdamp: float = 0.01,
                    block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep-mask, updated weight), both [out, in], for a weight [out, in] given its inputs' Hessian."""
    sparsity, nm = resolve_sparsity(sparsity, pattern)
    w = weight.detach().float().clone()
    rows, cols = w.shape
    check_width(cols, nm)
    if not 0 < percdamp < 1:
        raise SqueezeError(f"sparsegpt percdamp={percdamp} must be in (0, 1) (0.01 is the paper's)")
    if block_size < 1:
        raise SqueezeError(f"sparsegpt block_size={block_size} must be a positive integer (128 is the paper's)")
    h = hessian.detach().float().clone().to(w.device)
    if h.shape != (cols, cols):
        raise SqueezeError(f"sparsegpt: the Hessian is {tuple(h.shape)} but the weight takes {cols} inputs")
    dead = h.diagonal() == 0  # an input that never fired: its weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    u = _inverse_cholesky(h, percdamp)

    if nm is not None:  # an N:M group must not straddle two blocks
        block_size = max(nm[1], block_size - block_size % nm[1])
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        saliency = w1 ** 2 / u1.diagonal().unsqueeze(0) ** 2
        if nm is None:  # this block's share of the exact total
            count = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            keep1 = lowest_mask(saliency, min(count, saliency.numel()))
        else:
            keep1 = nm_mask(saliency, *nm)
        for i in range(i2 - i1):
            q = w1[:, i] * keep1[:, i]
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return keep, w * keep


@torch.no_grad()
def prune_layer(module: nn.Module, stats: LayerStats, sparsity: float | None = 0.5, pattern: str = "unstructured",
                percdamp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """SparseGPT one Linear/Conv1D in place; its keep-mask in the weight's stored orientation."""
    keep, updated = sparsegpt_prune(as_out_in(module), stats.hessian, sparsity, pattern, percdamp, block_size)
    as_out_in(module).copy_(updated.to(module.weight.dtype))
    return keep.t() if is_transposed(module) else keep


def sparsegpt_model(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], sparsity: float | None = 0.5,
                    pattern: str = "unstructured", percdamp: float = 0.01,
                    block_size: int = 128, errors: dict[str, float] | None = None,
                    block_sparsity: Sequence[float] | None = None, within_block: bool = False) -> dict[str, torch.Tensor]:
    """SparseGPT on every Linear/Conv1D of the layer stack, block by block on the pruned model's own
    inputs; keep-masks by layer name, in each weight's stored orientation. `block_sparsity`: one sparsity
    per block (layer_sparsity's OWL) instead of `sparsity` everywhere."""
    _, nm = resolve_sparsity(sparsity, pattern)
    prune_one = lambda module, stats, s: prune_layer(module, stats, s or sparsity, pattern, percdamp,  # noqa: E731
                                                     block_size)
    return prune_layer_stack(model, batches, prune_one, nm, hessian=True, errors=errors,
                             block_sparsity=block_sparsity, within_block=within_block)


class SparseGPT(OneShotPruner):
    """One-shot SparseGPT pruning (`compress=sparsegpt`): `sparsity` of every layer-stack Linear/Conv1D
    (or `pattern=2:4|4:8`), the surviving weights updated to keep each layer's output; per-block amounts and
    sequential calibration: squeeze/compress/oneshot.py."""

    method = "sparsegpt"

    def __init__(self, sparsity: float | None = 0.5, pattern: str = "unstructured", damping: float = 0.01,
                 block_size: int = 128, allocation: str = "uniform", owl_threshold: float = 5.0,
                 owl_spread: float = 0.08, sequential: str = "blocks"):
        # every setting named (no **kwargs): squeeze.config tells a misspelt one from the signature
        super().__init__(sparsity, pattern, allocation, owl_threshold, owl_spread, sequential)
        self.damping, self.block_size = damping, block_size
        check_sparsegpt(damping, block_size)

    @classmethod
    def check_values(cls, name: str, settings: dict) -> None:
        super().check_values(name, settings)
        check_sparsegpt(settings.get("damping", 0.01), settings.get("block_size", 128))

    def prune(self, model, batches, block_sparsity, within_block):
        return sparsegpt_model(model, batches, self.sparsity, self.pattern, self.damping, self.block_size,
                               errors=self.layer_error, block_sparsity=block_sparsity, within_block=within_block)

    def summary(self):
        return {**super().summary(), "damping": self.damping,
                "layer_error_kind": "relative output error on the calibration inputs"}


def check_sparsegpt(damping, block_size) -> None:
    if not isinstance(damping, (int, float)) or not 0 < damping < 1:
        raise SqueezeError(f"compress.sparsegpt.damping={damping} must be in (0, 1) (0.01 is the paper's)")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise SqueezeError(f"compress.sparsegpt.block_size={block_size!r} must be a positive integer (128)")
