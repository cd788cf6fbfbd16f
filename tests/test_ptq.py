"""The post-training compressors wired into runs: smoothquant, gptq, wanda, sparsegpt through train.py's and
evaluate.py's in-process paths on tiny BERT, GPT-2 (Conv1D) and Llama; reloads with the same outputs;
[smoothquant] is the same float function; [wanda, imp] keeps the one-shot zeros; bad settings, one line."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAST, LM_FAST, compose_cfg, read_result
from conftest import PTQ_FAMILIES as FAMILIES, tiny_family as tiny, token_batches

from squeeze import formats, run
from squeeze.run.build import chain as build_chain
from squeeze.compress.gptq import GPTQ
from squeeze.compress.smoothquant import SmoothQuant
from squeeze.compress.sparsegpt import SparseGPT
from squeeze.compress.sparsity_pattern import follows_nm, to_semi_structured
from squeeze.compress.wanda import Wanda
from squeeze.errors import SqueezeError
from squeeze.formats.quantized_layers import QuantizedLinear

RUN = [*FAST, "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "perf=null",
       "calibration.samples=8", "calibration.seq_len=32"]
LM = [*RUN, *LM_FAST, "task=austen"]
HEAD = {"bert": "sequence_classification", "gpt2": "causal_lm", "llama": "causal_lm"}
LINEARS = {"bert": 12, "gpt2": 8, "llama": 14}  # Linear/Conv1D layers in the 2-layer stack


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches])


def _tokenizer():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                   unk_token="[UNK]", pad_token="[UNK]")


# -- the compressors on their own: calibrated on given batches, saved and reloaded ---------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_keeps_the_float_function(family):
    model, batches = tiny(family), token_batches(padded=True)
    before = _logits(model, batches)
    SmoothQuant(alpha=0.8).use_batches(batches).finalize(model)
    after = _logits(model, batches)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_saves_packed_integers_that_reload_bit_identically(family, tmp_path):
    model, batches = tiny(family), token_batches()
    gptq = GPTQ(bits=4, group_size=32).use_batches(batches)
    gptq.name = "gptq"
    gptq.finalize(model)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == gptq.quantized == LINEARS[family] and all(m.bits == 4 for m in layers)
    summary = gptq.summary()
    assert summary["calibration"]["samples"] == 8 and summary["calibrate_seconds"] > 0
    assert len(summary["layer_error"]) == LINEARS[family] and 0 < summary["mean_layer_error"] < 0.5
    formats.save(model, _tokenizer(), tmp_path)
    again = formats.load(tmp_path, HEAD[family]).eval()
    assert torch.equal(_logits(again, batches), _logits(model, batches))


@pytest.mark.parametrize("method", [Wanda, SparseGPT])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_shot_pruners_save_sparse_and_2_4_masks_hold(method, family, tmp_path):
    model, batches = tiny(family), token_batches()
    pruner = method(sparsity=None, pattern="2:4").use_batches(batches)
    pruner.finalize(model)
    summary = pruner.summary()
    assert summary["sparsity"] == 0.5 and summary["semi_structured"] and len(summary["layer_error"]) == LINEARS[family]
    for name in summary["layer_sparsity"]:
        w = model.get_submodule(name).weight
        w = w.t() if family == "gpt2" else w  # Conv1D stores [in, out]
        assert follows_nm(w != 0, 2, 4)
    formats.save(model, _tokenizer(), tmp_path)
    again = formats.load(tmp_path, HEAD[family]).eval()
    assert torch.equal(_logits(again, batches), _logits(model, batches))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse kernels need a GPU")
def test_2_4_weights_run_on_torch_semi_structured_kernels():
    model, batches = tiny("llama"), token_batches(length=64)
    pruner = Wanda(sparsity=None, pattern="2:4").use_batches(batches)
    pruner.finalize(model)
    model = model.half().cuda()
    dense = _logits(model, [{k: v.cuda() for k, v in b.items()} for b in batches])
    assert to_semi_structured(model, pruner.summary()["layer_sparsity"]) == 14
    sparse = _logits(model, [{k: v.cuda() for k, v in b.items()} for b in batches])
    torch.testing.assert_close(sparse.float(), dense.float(), rtol=2e-2, atol=2e-2)


# -- through the run: train.py chains and evaluate.py ckpt= compress= ---------------------------------
def test_train_smoothquant_dq_on_bert(tmp_path):
    record = run.train(compose_cfg("train", [*RUN, "model=tiny_bert", "task=rotten_tomatoes",
                                             "compress=[smoothquant,dq]", "trainer.max_steps=2"], tmp_path))
    assert record["status"] == "ok", record["error"]
    saved = read_result(tmp_path)["compress"]["smoothquant"]
    assert saved["smoothed_layers"] == 2 and saved["calibration"]["samples"] == 8
    assert saved["calibration"]["source"] == "train split" and saved["calibration"]["applied"] == "after training"
    again = run.evaluate(compose_cfg("eval", [*RUN, "model=tiny_bert", "task=rotten_tomatoes", f"ckpt={tmp_path}"],
                                     tmp_path / "again"))
    assert again["metrics"]["test/accuracy"] == pytest.approx(record["metrics"]["test/accuracy"], abs=1e-6)


def test_train_wanda_then_imp_keeps_the_one_shot_zeros(tmp_path, monkeypatch):
    from squeeze.compress import pruning

    seen = {}
    bind = pruning.IterativeMagnitudePruning._bind

    def spy(self, model):  # the mask imp starts from, and the zeros wanda left
        bind(self, model)
        seen["masks"] = {n: m.clone() for n, m in self.masks.items()}

    monkeypatch.setattr(pruning.IterativeMagnitudePruning, "_bind", spy)
    record = run.train(compose_cfg("train", [*LM, "model=tiny_llama", "compress=[wanda,imp]", "trainer.max_steps=3",
                                             "compress.imp.target=0.7", "compress.imp.end_step=2",
                                             "compress.imp.frequency=1"], tmp_path))
    assert record["status"] == "ok", record["error"]
    saved = read_result(tmp_path)["compress"]
    assert saved["wanda"]["calibration"]["applied"] == "before training" and saved["wanda"]["sparsity"] == 0.5
    start = seen["masks"]
    assert sum(int((~m).sum()) for m in start.values()) / sum(m.numel() for m in start.values()) == pytest.approx(
        0.5, abs=0.01)
    model = formats.load(tmp_path / "model", "causal_lm")
    weights = dict(model.named_parameters())
    for name, keep in start.items():  # every one-shot zero is still zero after fine-tuning
        assert not weights[name][~keep].any()
    assert record["sparsity"] == pytest.approx(0.7, abs=0.01)


@pytest.fixture(scope="module")
def trained_gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    record = run.train(compose_cfg("train", [*LM, "model=tiny_gpt2", "trainer.max_steps=1"], path))
    assert record["status"] == "ok", record["error"]
    return path


@pytest.mark.parametrize("chain, key", [("gptq", "gptq"), ("[sparsegpt,int8wo]", "sparsegpt"),
                                        ("wanda", "wanda")])
def test_evaluate_applies_post_training_methods_and_reloads(chain, key, trained_gpt2, tmp_path):
    overrides = [*LM, "model=tiny_gpt2", f"ckpt={trained_gpt2}", f"compress={chain}", "compress.gptq.group_size=32"
                 if chain == "gptq" else "calibration.batch_size=4"]
    evaluated = run.evaluate(compose_cfg("eval", overrides, tmp_path / "ptq"))
    assert evaluated["status"] == "ok", evaluated["error"]
    saved = read_result(tmp_path / "ptq")
    assert saved["compress"][key]["calibration"]["samples"] == 8 and saved["compress"][key]["layer_error"]
    again = run.evaluate(compose_cfg("eval", [*LM, "model=tiny_gpt2", f"ckpt={tmp_path / 'ptq'}"], tmp_path / "again"))
    assert again["status"] == "ok", again["error"]
    assert again["metrics"]["test/perplexity"] == pytest.approx(evaluated["metrics"]["test/perplexity"], rel=1e-6)
    assert evaluated["metrics"]["test/perplexity"] != read_result(trained_gpt2)["metrics"]["test/perplexity"]


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["compress=gptq", "compress.gptq.bits=3"], "gptq bits=3: only 4 or 8 bits"),
    (["compress=gptq", "compress.gptq.group_size=48"], "group_size=48 does not divide in_features=64"),
    (["compress=wanda", "compress.wanda.pattern=4:2"], "0 < N < M"),
    (["compress=sparsegpt", "compress.sparsegpt.pattern=2:4", "compress.sparsegpt.sparsity=0.6"],
     "sparsity=0.6 contradicts pattern=.2:4."),
    (["compress=smoothquant", "compress.smoothquant.alpha=1.5"], r"alpha=1.5 must be in \[0, 1\]"),
    (["compress=[dq,smoothquant]"], "smoothquant works on float weights but comes after dq"),
    (["compress=[gptq,wanda]"], "wanda works on float weights but comes after gptq"),
    (["compress=[gptq,imp]"], "imp trains the model but comes after gptq"),
    (["compress=gptq", "+calibration.sample=4"], "calibration.sample is not a calibration setting"),
])
def test_bad_settings_fail_with_one_line(overrides, message, tmp_path):
    cfg = compose_cfg("train", [*RUN, "model=tiny_llama", "task=austen", *overrides], tmp_path)
    with pytest.raises(SqueezeError, match=message) as error:
        chain = build_chain(cfg.compress)
        for c in chain:
            c.calibrate_with(None, cfg.calibration)
            c.prepare_model(tiny("llama"), None)
    assert "\n" not in str(error.value)
