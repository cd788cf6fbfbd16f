"""One-shot pruning with calibration: Wanda and SparseGPT (exact sparsity, N:M patterns, output error)."""

import pytest
import torch
from conftest import PTQ_FAMILIES as FAMILIES, tiny_family as tiny, token_batches

from squeeze.arch.linear import as_out_in, is_transposed
from squeeze.compress.calibration import layer_stack, linear_layers
from squeeze.compress.sparsegpt import sparsegpt_model, sparsegpt_prune
from squeeze.compress.sparsity_pattern import follows_nm
from squeeze.compress.wanda import wanda_mask, wanda_model
from squeeze.errors import SqueezeError

PATTERNS = [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", None), ("4:8", None)]


def correlated_inputs(n=2048, width=256, seed=0):
    """Correlated channels (a low-rank mix plus noise) with a few outlier channels, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g) @ torch.randn(32, width, generator=g) + 0.3 * torch.randn(n, width, generator=g)
    scale = torch.ones(width)
    scale[torch.randperm(width, generator=g)[:12]] = 8.0
    return x * scale


def _case(seed=0, width=256, out=64):
    x = correlated_inputs(width=width, seed=seed)
    w = torch.randn(out, width, generator=torch.Generator().manual_seed(seed + 1)) / width ** 0.5
    return x, w, 2 * x.t() @ x / len(x)


def _error(x, w, approx):
    return float((x @ (w - approx).t()).norm())


def _semi_structured_layout_ok(mask):
    """torch.sparse.to_sparse_semi_structured's rule for float weights [out, in] (as F.linear takes them):
    at most 2 nonzeros in every 4 consecutive entries of a row (shape minimums — rows % 32, cols % 64 for
    fp16 — are the caller's; the kernel itself needs a GPU, not available here)."""
    rows, cols = mask.shape
    return cols % 4 == 0 and bool((mask.reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


@pytest.mark.parametrize("pattern,sparsity", PATTERNS)
def test_exact_sparsity_and_pattern(pattern, sparsity):
    x, w, h = _case()
    norms = x.norm(dim=0)
    wanda = wanda_mask(w, norms, sparsity, pattern)
    sgpt, updated = sparsegpt_prune(w, h, sparsity, pattern)
    # Wanda prunes round(sparsity·in) of every row; SparseGPT round(sparsity·n) of the matrix.
    expected = {"wanda": w.shape[0] * round(sparsity * w.shape[1]) if sparsity else None,
                "sparsegpt": round(sparsity * w.numel()) if sparsity else None}
    for method, mask in (("wanda", wanda), ("sparsegpt", sgpt)):
        assert mask.dtype == torch.bool and mask.shape == w.shape
        if pattern == "unstructured":
            assert int((~mask).sum()) == expected[method]
        else:
            n, m = map(int, pattern.split(":"))
            assert follows_nm(mask, n, m) and int(mask.sum()) == w.numel() * n // m
    if pattern == "unstructured":  # Wanda compares within each output row: every row the same count
        assert torch.all((~wanda).sum(1) == round(sparsity * w.shape[1]))
    assert torch.all(updated[~sgpt] == 0)
    if pattern == "2:4":
        assert _semi_structured_layout_ok(wanda) and _semi_structured_layout_ok(sgpt)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_output_error_sparsegpt_below_wanda_below_magnitude(seed, pattern):
    x, w, h = _case(seed)
    magnitude = wanda_mask(w, torch.ones(w.shape[1]), 0.5 if pattern == "unstructured" else None, pattern)
    wanda = wanda_mask(w, x.norm(dim=0), 0.5 if pattern == "unstructured" else None, pattern)
    _, sgpt = sparsegpt_prune(w, h, 0.5 if pattern == "unstructured" else None, pattern)
    e_mag, e_wanda, e_sgpt = _error(x, w, w * magnitude), _error(x, w, w * wanda), _error(x, w, sgpt)
    # Measured margins over seeds 0-3: wanda/magnitude 0.49-0.57, sparsegpt/magnitude 0.17-0.28.
    assert e_sgpt < 0.8 * e_wanda and e_wanda < 0.8 * e_mag


def test_bad_settings_name_the_fix():
    x, w, h = _case()
    with pytest.raises(SqueezeError, match=r"sparsity=1.2 must be in \(0, 1\)"):
        wanda_mask(w, x.norm(dim=0), 1.2)
    with pytest.raises(SqueezeError, match="0 < N < M"):
        sparsegpt_prune(w, h, None, "4:4")
    with pytest.raises(SqueezeError, match="contradicts pattern='2:4'"):
        sparsegpt_prune(w, h, 0.7, "2:4")
    with pytest.raises(SqueezeError, match="not one of unstructured"):
        wanda_mask(w, x.norm(dim=0), 0.5, "half")
    with pytest.raises(SqueezeError, match="divisible by 8"):
        wanda_mask(w[:, :252], x.norm(dim=0)[:252], None, "4:8")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_model_drivers_prune_every_block_layer(family, method):
    model = tiny(family)
    batches = token_batches(n=4, batch=2, length=16, padded=True)
    run = wanda_model if method == "wanda" else sparsegpt_model
    masks = run(model, batches, pattern="2:4")
    stack = {id(m) for m in linear_layers(layer_stack(model)).values()}
    assert set(masks) == {n for n, m in model.named_modules() if id(m) in stack}
    for name, mask in masks.items():
        module = model.get_submodule(name)
        assert mask.shape == module.weight.shape  # the stored orientation (GPT-2's Conv1D: [in, out])
        assert torch.all(module.weight[~mask] == 0)
        assert follows_nm(mask.t() if is_transposed(module) else mask, 2, 4)
        assert torch.equal(as_out_in(module) != 0, (mask.t() if is_transposed(module) else mask)
                           & (as_out_in(module) != 0))
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()
