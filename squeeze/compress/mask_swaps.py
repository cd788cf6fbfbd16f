"""A pruning mask improved by swaps, without touching the weights (issue 28 §2).

Wanda picks each row's mask from a per-weight score and never looks at how the pruned weights' errors add up: two
pruned weights whose inputs are correlated can cancel or compound. With H = the calibration inputs' XᵀX, row i's
output error is dᵢ H dᵢᵀ, dᵢ the row's pruned weights (zeros elsewhere). Reviving weight j and pruning weight k of the
same row changes it by

    Δ = −2 w_j g_j + w_j² H_jj + 2 w_k g_k + w_k² H_kk − 2 w_j w_k H_jk,   g = dᵢ H,

so each step takes, in every row at once, the revival that lowers the error most and the pruning that raises it
least, and keeps the pair where Δ < 0. Every row keeps its count of pruned weights, so the sparsity the mask was
chosen for is unchanged; an N:M pattern stays N:M: the pair is taken inside one group of M (each group's best pair,
then the group whose pair gains most). The idea is DSnoT's
(Zhang et al. 2024, which uses only the inputs' mean and variance); here the layer's exact squared output error on
the calibration inputs is the objective, as the Hessian is at hand.
"""

from __future__ import annotations

import torch

from squeeze.errors import SqueezeError


@torch.no_grad()
def swap_refine(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, max_swaps: int,
                nm: tuple[int, int] | None = None) -> tuple[torch.Tensor, int]:
    """(refined keep-mask [out, in], swaps made) for a weight [out, in], its keep-mask and its inputs' Hessian;
    at most `max_swaps` swaps per row."""
    w = weight.detach().float()
    rows, cols = w.shape
    if keep.shape != w.shape or hessian.shape != (cols, cols):
        raise SqueezeError(f"mask swaps: mask {tuple(keep.shape)} / Hessian {tuple(hessian.shape)} do not fit a "
                           f"weight {tuple(w.shape)}")
    h = hessian.detach().float().to(w.device)
    keep = keep.clone().bool().to(w.device)
    g = (w * ~keep) @ h  # h is symmetric
    diag_term = w * w * h.diagonal().unsqueeze(0)
    active = torch.arange(rows, device=w.device)
    made = 0
    inf = torch.tensor(float("inf"), device=w.device)
    for _ in range(max_swaps):
        wa, ga, ka = w[active], g[active], keep[active]
        revive = torch.where(ka, inf, diag_term[active] - 2 * wa * ga)
        prune = torch.where(ka, diag_term[active] + 2 * wa * ga, inf)
        if nm is None:
            j, k = revive.argmin(1), prune.argmin(1)
        else:  # the best pair inside each group of M, then the group whose pair gains most
            m = nm[1]
            j = revive.view(len(active), -1, m).argmin(2)
            k = prune.view(len(active), -1, m).argmin(2)
            base = torch.arange(0, cols, m, device=w.device).unsqueeze(0)
            j, k = j + base, k + base
            gain = (revive.gather(1, j) + prune.gather(1, k)
                    - 2 * wa.gather(1, j) * wa.gather(1, k) * h[j, k])
            best = gain.argmin(1, keepdim=True)
            j, k = j.gather(1, best)[:, 0], k.gather(1, best)[:, 0]
        wj, wk = wa.gather(1, j[:, None])[:, 0], wa.gather(1, k[:, None])[:, 0]
        delta = revive.gather(1, j[:, None])[:, 0] + prune.gather(1, k[:, None])[:, 0] - 2 * wj * wk * h[j, k]
        error = (ga * wa * ~ka).sum(1)
        better = delta < -1e-7 * error.clamp_min(0)  # a real gain, not rounding
        if not bool(better.any()):
            break
        r, j, k, wj, wk = active[better], j[better], k[better], wj[better], wk[better]
        keep[r, j], keep[r, k] = True, False
        g[r] += wk[:, None] * h[k] - wj[:, None] * h[j]
        made += int(r.numel())
        active = r
    return keep, made
