"""AWQ: the scale search never loses to round-to-nearest on its objective and wins where a few input channels carry
large activations; the clipping search likewise; whole models keep their float function until rounding, beat RTN
on outlier-heavy activations, save packed and reload bit-identically; runs through evaluate.py; bad settings and
[smoothquant,awq] are one line."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAST, LM_FAST, compose_cfg, read_result
from conftest import PTQ_FAMILIES as FAMILIES, tiny_family as tiny, token_batches

from squeeze import formats, run
from squeeze.compress.awq import AWQ, output_error, search_clip, search_scales, weight_mean
from squeeze.compress.gptq import rtn_quantize
from squeeze.compress.quantization import WeightOnlyQuantization
from squeeze.errors import SqueezeError
from squeeze.formats.quantized_layers import QuantizedLinear
from squeeze.run.build import chain as build_chain

RUN = [*FAST, "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "perf=null",
       "calibration.samples=8", "calibration.seq_len=32"]
LM = [*RUN, *LM_FAST, "task=austen"]


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                   unk_token="[UNK]", pad_token="[UNK]")


def _outlier_case(width=128, out=96, seed=0):
    """Inputs whose first 4 channels are 30x the others (what AWQ is for), and weights of one scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, width, generator=g)
    x[:, :4] *= 30
    w = torch.randn(out, width, generator=g) / width ** 0.5
    return x, w, 2 * x.t() @ x / len(x)


def test_scale_search_beats_round_to_nearest_where_channels_are_salient():
    x, w, h = _outlier_case()
    found = search_scales([w], x.abs().mean(0), h, bits=4, group_size=32)
    rtn = rtn_quantize(w, 4, 32).dequantized
    assert found["rtn_error"] == pytest.approx(output_error(rtn - w, h), rel=1e-5)  # alpha 0 is RTN
    assert found["alpha"] > 0 and found["error"] < 0.7 * found["rtn_error"]
    s = found["scales"]
    assert s[:4].min() > s[4:].max()  # the salient channels are scaled up
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-4)  # normalised as the reference does


def test_duo_scaling_weighs_in_the_weights_and_both_takes_the_better_per_alpha():
    x, w, h = _outlier_case(seed=2)
    w = w.clone()
    w[:, 10] *= 0.05  # a channel whose weights use little of their groups' ranges
    m = weight_mean([w], 32)
    assert m.shape == (128,) and 0 < m.min() and m.max() <= 1 and m[10] < 0.2 * m.median()
    found = {duo: search_scales([w], x.abs().mean(0), h, bits=4, group_size=32, duo_scaling=duo)
             for duo in (False, True, "both")}
    assert found[False]["rtn_error"] == found[True]["rtn_error"] == found["both"]["rtn_error"]  # α = 0: rounding
    assert found[True]["error"] <= found[True]["rtn_error"] and found[False]["duo"] is False
    assert found["both"]["error"] <= min(found[False]["error"], found[True]["error"])
    s = found[True]["scales"]
    if found[True]["duo"]:  # the little-used channel's scale rises with the weight term
        assert s[10] > s[11:].median()


def test_clip_search_never_worse_than_the_full_range_and_stays_within_it():
    x, w, h = _outlier_case(seed=1)
    w = w.clone()
    w[::7, 5] = 1.5  # a few large weights take their groups' ranges
    clipped = search_clip(w, h, bits=4, group_size=32, grid=20, max_shrink=0.5)
    full = rtn_quantize(w, 4, 32).dequantized
    shrunk = rtn_quantize(clipped, 4, 32).dequantized
    assert output_error(shrunk - w, h) < output_error(full - w, h)
    ratio = clipped.reshape(96, 4, 32).abs().amax(-1) / w.reshape(96, 4, 32).abs().amax(-1)
    assert ratio.min() >= 0.55 - 1e-6 and ratio.max() <= 1 + 1e-6 and ratio.min() < 1


def _with_outliers(family):
    """A tiny model whose norms make a few activation channels large."""
    model = tiny(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name.lower() or "ln_" in name) and name.endswith("weight"):
                p[:3] *= 25
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_beats_round_to_nearest_and_reloads_bit_identically(family, tmp_path):
    model = _with_outliers(family)
    batches = token_batches(n=8, batch=4, length=32)
    with torch.no_grad():
        reference = torch.cat([model(**b).logits for b in batches])
    awq = AWQ(group_size=16)
    awq.name = "awq"
    quantized = awq.use_batches(batches).finalize(copy.deepcopy(model))
    rtn = WeightOnlyQuantization(bits=4, group_size=16, weights="affine", embeddings=False, lm_head=False,
                                 cpu_kernel="dequantize")  # the same int4 scheme, round-to-nearest
    rtn.name = "int4wo"
    rounded = rtn.finalize(copy.deepcopy(model))
    layers = [m for m in quantized.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == awq.summary()["quantized_modules"] > 0 and all(m.bits == 4 for m in layers)
    with torch.no_grad():
        got = torch.cat([quantized(**b).logits for b in batches])
        base = torch.cat([rounded(**b).logits for b in batches])
    assert (got - reference).norm() < (base - reference).norm()
    summary = awq.summary()
    assert summary["scaled_groups"] > 0 and summary["mean_error_vs_rtn"] <= 1.0
    directory = tmp_path / "model"
    formats.save(quantized, _tokenizer(), directory)
    back = formats.load(directory, "sequence_classification" if family == "bert" else "causal_lm")
    with torch.no_grad():
        again = torch.cat([back(**b).logits for b in batches])
    assert torch.equal(again, got)


def test_awq_divides_the_inputs_of_layers_whose_scales_cannot_fold(tmp_path):
    """BERT is post-norm: only value → output folds, so q/k/v and the FFN get their scales as a per-channel
    divisor of their input, which lowers the error of the whole model, saves packed and reloads exactly."""
    from squeeze.formats import compressed_tensors_refuses
    from squeeze.formats.float_layers import float_layer

    model = _with_outliers("bert")
    batches = token_batches(n=8, batch=4, length=32)

    def encoded(m):
        with torch.no_grad():
            return torch.cat([m(**b, output_hidden_states=True).hidden_states[-1] for b in batches])

    reference = encoded(model)
    errors, divided = {}, {}
    for unfoldable in (True, False):
        awq = AWQ(group_size=16, scale_unfoldable=unfoldable)
        awq.name = "awq"
        quantized = awq.use_batches(batches).finalize(copy.deepcopy(model))
        divided[unfoldable] = {n for n, m in quantized.named_modules()
                               if isinstance(m, QuantizedLinear) and m.input_divisor is not None}
        assert awq.summary()["divided_layers"] == len(divided[unfoldable])
        errors[unfoldable] = float((encoded(quantized) - reference).norm())
        if unfoldable:
            kept = quantized
    assert not divided[False]
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in divided[True]} >= {
        "self.query", "self.key", "self.value", "intermediate.dense"}
    assert not any(n.endswith("attention.output.dense") for n in divided[True])  # folded into value's rows
    assert errors[True] < 0.85 * errors[False]  # 0.74 when written
    layer = kept.get_submodule(sorted(divided[True])[0])
    x = torch.randn(5, layer.in_features) * 3
    layer.set_kernel(layer.kernel, "dequantize")
    with torch.no_grad():  # the float twin (export, requantizing) computes the same function
        torch.testing.assert_close(float_layer(layer, torch.float32)(x), layer(x), rtol=1e-4, atol=1e-4)
    assert "divided per channel" in compressed_tensors_refuses(layer)
    formats.save(kept, _tokenizer(), tmp_path / "model")
    assert formats.saved_format(tmp_path / "model") == "squeeze-packed"
    back = formats.load(tmp_path / "model", "sequence_classification")
    assert {n for n, m in back.named_modules() if getattr(m, "input_divisor", None) is not None} == divided[True]
    with torch.no_grad():
        assert torch.equal(torch.cat([back(**b).logits for b in batches]), torch.cat([kept(**b).logits for b in batches]))


def test_awq_leaves_q_and_k_unclipped_on_llama():
    awq = AWQ(group_size=16)
    awq.name = "awq"
    awq.use_batches(token_batches(n=4, batch=2, length=16)).finalize(_with_outliers("llama"))
    assert awq.summary()["clipped_layers"] == 2 * (7 - 2)  # 2 blocks × (q,k,v,o,gate,up,down − q,k)


def test_evaluate_runs_awq_and_reloads(tmp_path):
    plain = tmp_path / "plain"
    record = run.train(compose_cfg("train", [*LM, "model=tiny_llama", "trainer.max_steps=1"], plain))
    assert record["status"] == "ok", record["error"]
    overrides = [*LM, "model=tiny_llama", f"ckpt={plain}", "compress=awq", "compress.awq.group_size=16"]
    evaluated = run.evaluate(compose_cfg("eval", overrides, tmp_path / "awq"))
    assert evaluated["status"] == "ok", evaluated["error"]
    saved = read_result(tmp_path / "awq")["compress"]["awq"]
    assert saved["calibration"]["samples"] == 8 and saved["quantized_modules"] == 14
    again = run.evaluate(compose_cfg("eval", [*LM, "model=tiny_llama", f"ckpt={tmp_path / 'awq'}"], tmp_path / "again"))
    assert again["status"] == "ok", again["error"]
    assert again["metrics"]["test/perplexity"] == pytest.approx(evaluated["metrics"]["test/perplexity"], rel=1e-6)


def test_awq_scales_alone_keep_the_function_and_let_gptq_quantize(tmp_path):
    model = _with_outliers("llama")
    batches = token_batches(n=4, batch=2, length=16)
    with torch.no_grad():
        reference = torch.cat([model(**b).logits for b in batches])
    cfg = compose_cfg("train", [*RUN, "model=tiny_llama", "task=austen", "compress=[awq,gptq]",
                                "compress.awq.quantize=false", "compress.awq.group_size=16",
                                "compress.gptq.group_size=16", "compress.gptq.symmetric=false"], tmp_path)
    awq, gptq = build_chain(cfg.compress)
    awq.use_batches(batches).finalize(model)
    with torch.no_grad():  # the scales are folded exactly: the float model computes the same function
        scaled = torch.cat([model(**b).logits for b in batches])
    torch.testing.assert_close(scaled, reference, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert awq.summary()["quantize"] is False and awq.summary()["scaled_groups"] > 0
    gptq.use_batches(batches).finalize(model)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    with pytest.raises(SqueezeError, match="gptq works on float weights but comes after awq, which has already turned "
                                           "them into integers; keep one of them, or leave awq's weights float with "
                                           "compress.awq.quantize=false"):
        build_chain(compose_cfg("train", [*RUN, "model=tiny_llama", "task=austen", "compress=[awq,gptq]"],
                                tmp_path / "b").compress)


@pytest.mark.parametrize("overrides, message", [
    (["compress=awq", "compress.awq.bits=3"], "awq bits=3: only 4 or 8 bits"),
    (["compress=awq", "compress.awq.group_size=48"], "group_size=48 does not divide in_features=64"),
    (["compress=awq", "compress.awq.grid=0"], "awq grid=0 must be a positive integer"),
    (["compress=awq", "compress.awq.max_shrink=1.0"], r"max_shrink=1.0 must be in \[0, 1\)"),
    (["compress=awq", "compress.awq.quantize=maybe"], "awq quantize='maybe' must be true or false"),
    (["compress=awq", "compress.awq.scale_unfoldable=no"], "awq scale_unfoldable='no' must be true or false"),
    (["compress=awq", "compress.awq.duo_scaling=maybe"], "awq duo_scaling='maybe' must be true, false or both"),
    (["compress=[smoothquant,awq]"], "smoothquant and awq both fold per-channel scales"),
    (["compress=[awq,smoothquant]"], "awq and smoothquant both fold per-channel scales"),
    (["compress=[awq,imp]"], "imp trains the model but comes after awq"),
])
def test_bad_settings_fail_with_one_line(overrides, message, tmp_path):
    cfg = compose_cfg("train", [*RUN, "model=tiny_llama", "task=austen", *overrides], tmp_path)
    with pytest.raises(SqueezeError, match=message) as error:
        chain = build_chain(cfg.compress)
        for c in chain:
            c.calibrate_with(None, cfg.calibration)
            c.prepare_model(tiny("llama"), None)
    assert "\n" not in str(error.value)
