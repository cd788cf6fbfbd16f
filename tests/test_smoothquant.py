"""SmoothQuant on tiny random models of each family: outputs unchanged, activation outliers tamed."""

import pytest
import torch
from conftest import PTQ_FAMILIES as FAMILIES, tiny_family as tiny, token_batches
from torch import nn

from squeeze.compress.calibration import collect_stats
from squeeze.compress.smoothquant import apply_smoothing, smooth, smoothing_pairs, smoothing_scales
from squeeze.errors import SqueezeError


def _outputs(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def _with_outliers(model):
    """Real LLMs carry a few input channels 10-100× the others; random init does not, so make some."""
    for producer, _ in smoothing_pairs(model):
        width = producer.weight.shape[0] if not hasattr(producer, "nf") else producer.nf
        boost = torch.ones(width)
        boost[:3] = 1 / 40  # apply_smoothing divides the producer by its scales: ×40 on three channels
        apply_smoothing(producer, [], boost)
    return model


def _spread(model, batches):
    """max / median of the per-channel input abs-max of every smoothed consumer, worst layer."""
    consumers = {n: m for n, m in model.named_modules() if any(m is ls[0] for _, ls in smoothing_pairs(model))}
    stats = collect_stats(model, batches, consumers, hessian=False)
    return max(float(s.absmax.max() / s.absmax.median()) for s in stats.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_keeps_outputs_and_shrinks_the_activation_range(family):
    model = _with_outliers(tiny(family))
    batches = token_batches(padded=True)
    before, spread_before = _outputs(model, batches), _spread(model, batches)
    scales = smooth(model, batches, alpha=0.5)
    after, spread_after = _outputs(model, batches), _spread(model, batches)
    assert scales and all(s.min() > 0 for s in scales.values())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    assert spread_after < 0.5 * spread_before


def test_pairs_follow_each_family():
    gpt2 = tiny("gpt2")
    assert [ls[0] for _, ls in smoothing_pairs(gpt2)] == [gpt2.transformer.h[0].attn.c_attn, gpt2.transformer.h[0].mlp.c_fc,
                                                           gpt2.transformer.h[1].attn.c_attn, gpt2.transformer.h[1].mlp.c_fc]
    llama = tiny("llama")
    norm, linears = smoothing_pairs(llama)[0]
    attn = llama.model.layers[0].self_attn
    assert norm is llama.model.layers[0].input_layernorm and linears == [attn.q_proj, attn.k_proj, attn.v_proj]
    mlp = llama.model.layers[0].mlp
    assert (mlp.up_proj, [mlp.down_proj]) in [(p, ls) for p, ls in smoothing_pairs(llama)]
    bert = tiny("bert")
    producer, linears = smoothing_pairs(bert)[0]
    # Post-norm BERT: its LayerNorms also feed the residual, so only value → output.dense folds exactly.
    assert producer is bert.bert.encoder.layer[0].attention.self.value
    assert linears == [bert.bert.encoder.layer[0].attention.output.dense]


def test_scales_follow_the_formula():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.5, 1.0, -4.0]]))
    act = torch.tensor([16.0, 1.0, 0.0])
    s = smoothing_scales(act, [layer], alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([16 ** 0.5 / 1 ** 0.5, 1 / 2 ** 0.5, 1.0]))  # dead channel: 1


def test_bad_settings_name_the_fix():
    model = tiny("gpt2")
    with pytest.raises(SqueezeError, match=r"alpha=1.5 must be in \[0, 1\]"):
        smooth(model, token_batches(1), alpha=1.5)
    model.config.model_type = "mamba"
    with pytest.raises(SqueezeError, match="does not know the 'mamba' architecture"):
        smooth(model, token_batches(1))
