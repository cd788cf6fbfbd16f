"""GPTQ: lower output error than round-to-nearest, integers in range, dequantized = codes × scale."""

import pytest
import torch
from conftest import PTQ_FAMILIES as FAMILIES, tiny_family as tiny, token_batches

from squeeze.arch.linear import as_out_in
from squeeze.compress.calibration import layer_stack, linear_layers
from squeeze.compress.gptq import gptq_model, gptq_quantize, output_error, rtn_quantize
from squeeze.errors import SqueezeError


def correlated_inputs(n=2048, width=256, seed=0):
    """Inputs whose channels are strongly correlated (a low-rank mix plus noise) with uneven scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(32, width, generator=g)
    x = torch.randn(n, 32, generator=g) @ mix + 0.1 * torch.randn(n, width, generator=g)
    return x * torch.linspace(0.2, 3.0, width)


def _case(width=256, out=64, seed=0):
    x = correlated_inputs(width=width, seed=seed)
    w = torch.randn(out, width, generator=torch.Generator().manual_seed(seed + 1)) / width ** 0.5
    return x, w, 2 * x.t() @ x / len(x)


@pytest.mark.parametrize("bits,group_size,act_order,symmetric", [
    (4, None, False, True), (4, 64, False, True), (4, 64, True, True), (4, 32, False, False),
    (8, None, True, False), (4, 96, False, True),  # 96: groups straddle the 128-column blocks
])
def test_gptq_beats_round_to_nearest(bits, group_size, act_order, symmetric):
    width = 192 if group_size == 96 else 256
    x, w, h = _case(width)
    got = gptq_quantize(w, h, bits, group_size, act_order, symmetric)
    rtn = rtn_quantize(w, bits, group_size, symmetric)
    assert output_error(x, w, got.dequantized) < 0.8 * output_error(x, w, rtn.dequantized)
    lo, hi = (-(2 ** (bits - 1)) + symmetric, 2 ** (bits - 1) - 1)
    assert got.codes.dtype == torch.int8 and lo <= int(got.codes.min()) and int(got.codes.max()) <= hi
    groups = width // (group_size or width)
    assert got.scale.shape == (64, groups)
    expand = lambda t: t.float().repeat_interleave(width // groups, dim=1)  # noqa: E731
    if symmetric:
        assert got.zero_point is None
        assert torch.equal(got.dequantized, got.codes.float() * expand(got.scale))
    else:
        assert torch.equal(got.dequantized, (got.codes.float() - expand(got.zero_point)) * expand(got.scale))


def test_act_order_helps_with_uneven_curvature():
    x, w, h = _case()
    plain = gptq_quantize(w, h, 4, None, act_order=False)
    ordered = gptq_quantize(w, h, 4, None, act_order=True)
    # Low-rank inputs with uneven channel scales: most of the error is compensable once the big columns go first.
    assert output_error(x, w, ordered.dequantized) < 0.5 * output_error(x, w, plain.dequantized)


def test_dead_inputs_are_zeroed():
    x, w, h = _case()
    h[5, :] = 0
    h[:, 5] = 0
    got = gptq_quantize(w, h, 4, 64)
    assert torch.all(got.dequantized[:, 5] == 0)


def test_bad_settings_name_the_fix():
    _, w, h = _case()
    with pytest.raises(SqueezeError, match="only 4 or 8 bits"):
        gptq_quantize(w, h, bits=3)
    with pytest.raises(SqueezeError, match="does not divide in_features=256"):
        gptq_quantize(w, h, group_size=100)
    with pytest.raises(SqueezeError, match=r"percdamp=0 must be in \(0, 1\)"):
        gptq_quantize(w, h, percdamp=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_model_quantizes_every_block_layer(family):
    model = tiny(family)
    batches = token_batches(n=4, batch=2, length=16)
    lm_head = {n: p.detach().clone() for n, p in model.named_parameters() if "layers" not in n and ".h." not in n
               and "encoder" not in n}
    results = gptq_model(model, batches, bits=4, group_size=32)
    stack_layers = {id(m) for m in linear_layers(layer_stack(model)).values()}
    names = {n for n, m in model.named_modules() if id(m) in stack_layers}
    assert set(results) == names
    for name, r in results.items():
        module = model.get_submodule(name)
        assert torch.equal(as_out_in(module).detach(), r.dequantized)  # Conv1D: stored transposed
    for n, p in model.named_parameters():  # embeddings and heads untouched
        if n in lm_head:
            assert torch.equal(p, lm_head[n])
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()


def test_gptq_model_checks_groups_before_calibrating():
    with pytest.raises(SqueezeError, match="does not divide in_features=64"):
        gptq_model(tiny("llama"), token_batches(1), group_size=48)


@pytest.mark.parametrize("symmetric", [True, False])
def test_integers_load_like_squeeze_quantized_weights(symmetric):
    # The layout contract for packing: quantization.py's dequantize reads the same codes, scales, zero points.
    from squeeze.compress.quantization import dequantize

    _, w, h = _case()
    got = gptq_quantize(w, h, 4, 64, act_order=True, symmetric=symmetric)
    assert torch.equal(dequantize(got.codes, got.scale, got.zero_point), got.dequantized)
