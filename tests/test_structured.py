"""Structured pruning (compress=heads, compress=rows): the pruned model equals the dense model with
the same heads / rows masked, reloads with transformers to identical outputs, is smaller by exactly
what was removed; importance ranks a dead head last; a real run prunes, trains, saves and reloads."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from conftest import FAST, build_tiny, compose_cfg, read_result
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from squeeze import models, run
from squeeze import formats
from squeeze.arch import adapter_for
from squeeze.arch.linear import as_out_in
from squeeze.arch.loading import loading_class
from squeeze.compress.structured import HeadPruning, RowPruning, amounts, importance, surgery
from squeeze.errors import SqueezeError

HIDDEN, HEADS, HEAD_DIM, VOCAB = 64, 4, 16, 100  # conf/model/tiny_*.yaml's sizes; random ids stay below VOCAB
OVERRIDES = {"gpt2": {"n_inner": 128}}  # the MLP width the parameter counts below assume (yaml: 4 × 64)
CASES = [("bert", AutoModelForSequenceClassification), ("gpt2", AutoModelForSequenceClassification),
         ("gpt2", AutoModelForCausalLM), ("llama", AutoModelForCausalLM),
         ("opt", AutoModelForSequenceClassification), ("opt", AutoModelForCausalLM)]
IDS = [f"{kind}-{auto.__name__[12:]}" for kind, auto in CASES]
HEAD = {AutoModelForSequenceClassification: "sequence_classification", AutoModelForCausalLM: "causal_lm"}


def tiny(kind, auto=AutoModelForSequenceClassification, **extra):
    return build_tiny(f"tiny_{kind}", HEAD[auto], **{**OVERRIDES.get(kind, {}), **extra})[0]


def inputs(n=3, length=11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)  # never a special token of any family
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model):
    with torch.no_grad():
        return model(**inputs()).logits


def layers(model):
    layout = adapter_for(model)
    return layout, [layer for _, layer in layout.layers(model)]


def zero_o_columns(model, layer_idx, cols):
    """The masked dense model: the attention output projection ignores these input columns."""
    layout, ls = layers(model)
    o = layout.o_proj(ls[layer_idx])
    with torch.no_grad():
        as_out_in(o)[:, cols] = 0.0


def head_cols(heads, head_dim=HEAD_DIM):
    return [h * head_dim + t for h in heads for t in range(head_dim)]


# -- pure functions ---------------------------------------------------------------------------------
def test_amounts_fractions_counts_and_groups():
    assert amounts.units_to_remove(0.25, 12, 1, "a", "w") == 3
    assert amounts.units_to_remove(0.25, 4, 1, "a", "w") == 1
    assert amounts.units_to_remove(0.25, 2, 2, "a", "w") == 1  # half a KV group rounds up to one
    assert amounts.units_to_remove(0.1, 4, 1, "a", "w") == 0
    assert amounts.units_to_remove(2, 4, 1, "a", "w") == 2
    assert amounts.units_to_remove(6, 3, 3, "a", "w") == 2  # 6 heads = 2 groups of 3


def test_iterative_schedule_reaches_the_target_monotonically():
    for total, n in [(3, 1), (3, 2), (5, 3), (1, 4), (8, 8)]:
        steps = [amounts.removed_by(total, i, n) for i in range(n)]
        assert steps == sorted(steps) and steps[-1] == total and steps[0] >= 0


def test_keep_highest_keeps_original_order():
    assert amounts.keep_highest(torch.tensor([0.5, 0.1, 0.9, 0.3]), 2) == [0, 2]
    assert amounts.keep_highest(torch.tensor([1.0, 2.0]), 0) == [0, 1]


def test_an_optimizer_follows_the_cut_parameters():
    parent = torch.nn.Module()
    parent.fc = torch.nn.Linear(4, 6)
    optimizer = torch.optim.AdamW(parent.parameters(), lr=0.1)
    parent.fc(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    cut = surgery.Surgery()
    cut.keep(parent, "fc", [0, 2, 5], out=True)
    cut.repoint([optimizer])
    assert [p.shape for p in optimizer.param_groups[0]["params"]] == [(3, 4), (3,)]
    assert not optimizer.state  # the old moments had the old shapes
    before = parent.fc.weight.detach().clone()
    parent.fc(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(parent.fc.weight, before)


# -- heads: equal to the masked dense model, reloadable, smaller by what was removed --------------
@pytest.mark.parametrize("kind,auto", CASES, ids=IDS)
def test_pruned_heads_equal_masked_dense_and_reload(kind, auto, tmp_path):
    model = tiny(kind, auto)
    masked = copy.deepcopy(model)
    layout, _ = layers(model)
    before = models.count_params(model)[0]
    if kind == "llama":  # whole KV groups (2 query heads each), the same in every layer
        keep = {0: [1], 1: [0]}
        for i, dropped in ((0, [0, 1]), (1, [2, 3])):
            zero_o_columns(masked, i, head_cols(dropped))
        removed_per_group = (2 + 2 + 1 + 1) * HIDDEN * HEAD_DIM  # q and o of 2 query heads, k and v of 1
        expected = before - 2 * removed_per_group
    else:  # any head, a different number per layer
        keep = {0: [0, 2, 3], 1: [1]}
        zero_o_columns(masked, 0, head_cols([1]))
        zero_o_columns(masked, 1, head_cols([0, 2, 3]))
        per_head = 3 * (HIDDEN * HEAD_DIM + HEAD_DIM) + HEAD_DIM * HIDDEN  # q, k, v rows with bias; o columns
        expected = before - 4 * per_head
    surgery.prune_heads(model, layout, keep, "test")

    assert models.count_params(model)[0] == expected
    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    if kind == "llama":  # stock config fields, plain from_pretrained
        assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == (2, 1, HEAD_DIM)
        reloaded = auto.from_pretrained(tmp_path).eval()
    else:
        assert saved["attention_layout"] == [[3, HEAD_DIM], [1, HEAD_DIM]]
        reloaded = auto.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert models.count_params(reloaded)[0] == expected
    assert torch.equal(logits(reloaded), logits(model))


def test_stock_bert_class_refuses_a_pruned_directory_loudly(tmp_path):
    model = tiny("bert")
    surgery.prune_heads(model, adapter_for(model), {0: [0, 1, 2], 1: [0, 1, 2]}, "test")
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="mismatch"):  # never silently re-initialised
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_squeeze_loads_pruned_directories_with_its_own_classes(tmp_path):
    model = tiny("gpt2", AutoModelForCausalLM)
    surgery.prune_heads(model, adapter_for(model), {0: [0, 1], 1: [2, 3]}, "test")
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    cls = loading_class(config, AutoModelForCausalLM)
    stock = loading_class(tiny("gpt2").config, AutoModelForCausalLM)
    assert cls is type(model) and cls is not stock  # the class that holds fewer heads, not transformers' own
    assert torch.equal(logits(cls.from_pretrained(tmp_path).eval()), logits(model))
    assert stock.__name__ == "GPT2LMHeadModel"


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "opt"])
def test_gradient_importance_ranks_a_dead_head_last(kind):
    model = tiny(kind)
    half_dead = copy.deepcopy(model)
    dead = [2, 3] if kind == "llama" else [2]  # Llama ranks KV groups: group 1 is query heads 2 and 3
    zero_o_columns(model, 0, head_cols(dead))
    layout, ls = layers(model)
    batch = {**inputs(n=4), "labels": torch.tensor([0, 1, 1, 0])}
    scores = importance.gradient_head_scores(layout, model, [batch, batch])
    group = dead[0] // layout.shape(ls[0]).group
    others = [s for i, s in enumerate(scores[0].tolist()) if i != group]
    assert scores[0][group] == min(scores[0].tolist()) == 0
    assert min(others) > scores[0][group]
    assert all(p.grad is None for p in model.parameters())  # the weights' gradients are untouched
    if kind == "llama":  # a group with one dead head keeps its other, live head's importance
        zero_o_columns(half_dead, 0, head_cols([2]))
        assert importance.gradient_head_scores(layout, half_dead, [batch, batch])[0][1] > 0


def test_magnitude_head_pruning_removes_the_weakest_heads():
    model = tiny("bert")
    masked = copy.deepcopy(model)
    for m in (model, masked):
        zero_o_columns(m, 0, head_cols([3]))
        zero_o_columns(m, 1, head_cols([0]))
    pruner = HeadPruning(amount=0.25, method="magnitude")
    pruner.prepare_model(model, tokenizer=None)
    pruner.finalize(model)
    summary = pruner.summary()
    assert summary["heads_per_layer_before"] == [4, 4] and summary["heads_kept_per_layer"] == [3, 3]
    assert summary["params_after"] < summary["params_before"]
    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)


# -- rows -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,auto", CASES, ids=IDS)
def test_rows_equal_masked_dense_keep_divisibility_and_reload(kind, auto, tmp_path):
    model = tiny(kind, auto)
    layout, ls = layers(model)
    weak_neurons = [5, 17, 40, 99]  # made the smallest by magnitude, so they are the ones removed
    weak_dims = [3, 7]  # in every head
    qkv = kind != "llama"
    with torch.no_grad():
        for layer in ls:
            _, (p, n) = layout.mlp(layer)
            as_out_in(getattr(p, n))[:, weak_neurons] *= 1e-3
            if qkv:
                q, _, v, _ = layout.qkvo(layer)
                rows = [h * HEAD_DIM + t for h in range(HEADS) for t in weak_dims]
                q[rows] *= 1e-3
                v[rows] *= 1e-3
    masked = copy.deepcopy(model)
    _, masked_layers = layers(masked)
    with torch.no_grad():
        for layer in masked_layers:
            _, (p, n) = layout.mlp(layer)
            as_out_in(getattr(p, n))[:, weak_neurons] = 0.0
            if qkv:  # q_t = 0 removes q·k's term t; o ignoring v's dim t removes v_t
                rows = [h * HEAD_DIM + t for h in range(HEADS) for t in weak_dims]
                q, _, _, o = layout.qkvo(layer)
                q[rows] = 0.0
                o[:, rows] = 0.0
                q_module = {"bert": lambda: layer.attention.self.query, "gpt2": lambda: layer.attn.c_attn,
                            "opt": lambda: layer.self_attn.q_proj}[kind]()
                q_module.bias[rows] = 0.0  # GPT-2's fused bias starts with q's
    before = models.count_params(model)[0]
    pruner = RowPruning(mlp_amount=len(weak_neurons), qkv_amount=len(weak_dims) if qkv else 0)
    pruner.prepare_model(model, tokenizer=None)

    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)
    for layer in ls:
        s = layout.shape(layer)
        assert s.intermediate == 128 - len(weak_neurons)
        q, k, v, o = layout.qkvo(layer)
        assert s.heads == HEADS and q.shape[0] == o.shape[1] == s.heads * s.head_dim
        assert k.shape[0] == v.shape[0] == s.kv_heads * s.head_dim
        assert s.head_dim == HEAD_DIM - (len(weak_dims) if qkv else 0)
    gated = 2 if kind == "llama" else 1  # Llama's gate and up projections both lose the rows
    mlp_removed = len(weak_neurons) * (HIDDEN * (gated + 1) + (1 if kind != "llama" else 0))
    qkv_removed = HEADS * len(weak_dims) * (3 * (HIDDEN + 1) + HIDDEN) if qkv else 0
    assert models.count_params(model)[0] == before - 2 * (mlp_removed + qkv_removed)

    model.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path, trust_remote_code=qkv).eval()
    assert torch.equal(logits(reloaded), logits(model))


# -- bad input: one clear line each ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"amount": 1.5}, r"amount=1.5 is a fraction outside \[0, 1\)"),
    ({"amount": -0.1}, r"fraction outside \[0, 1\)"),
    ({"amount": -2}, "negative count"),
    ({"amount": "half"}, "neither a fraction"),
    ({"method": "random"}, "method='random' is not one of"),
    ({"iterations": 3}, "every_n_steps ≥ 1"),
    ({"recovery": -0.1}, r"recovery=-0.1 must be a share in \[0, 1\)"),
])
def test_bad_settings_fail_when_built(kwargs, match):
    with pytest.raises(SqueezeError, match=match):
        HeadPruning(**kwargs)


@pytest.mark.parametrize("kind,kwargs,match", [
    ("bert", {"amount": 0.9}, "would leave none of the 4 heads of layer 0"),
    ("bert", {"amount": 4}, "amount=4 is not fewer than the 4 heads of layer 0"),
    ("bert", {"layers": ["*.layer.7"]}, r"pattern '\*.layer.7' matches no layer; layers are numbered 0–1"),
    ("llama", {"amount": 1}, "whole groups of 2"),
    ("llama", {"amount": 0.5, "layers": [0]}, "one num_attention_heads for all layers"),
    ("distilbert", {}, "DistilBERT has no reloadable pruned-attention twin"),
])
def test_bad_requests_fail_before_anything_is_cut(kind, kwargs, match):
    if kind == "distilbert":
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(
            AutoConfig.for_model("distilbert", vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    else:
        model = tiny(kind)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SqueezeError, match=match) as error:
        HeadPruning(method="magnitude", **kwargs).prepare_model(model, tokenizer=None)
    assert "\n" not in str(error.value)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_a_llama_head_count_its_config_cannot_hold_is_refused():
    model = tiny("llama", num_key_value_heads=4)  # 4 heads of 16 dims: keeping 3 would need 64 % 3 == 0
    with pytest.raises(SqueezeError, match=r"hidden_size \(64\) to be a multiple of num_attention_heads"):
        HeadPruning(amount=1, method="magnitude").prepare_model(model, tokenizer=None)


def test_bad_row_requests():
    with pytest.raises(SqueezeError, match="rotary position embeddings"):
        RowPruning(qkv_amount=0.25).prepare_model(tiny("llama"), tokenizer=None)
    with pytest.raises(SqueezeError, match="MLP widths would differ between layers"):
        RowPruning(layers=["0"]).prepare_model(tiny("gpt2"), tokenizer=None)
    with pytest.raises(SqueezeError, match="would leave none of the 16 dims of each head"):
        RowPruning(qkv_amount=0.99).prepare_model(tiny("bert"), tokenizer=None)


# -- the real pipeline ---------------------------------------------------------------------------
SHORT = FAST + ["task=rotten_tomatoes", "trainer.max_steps=3", "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1", "perf=null"]


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_gpt2", "tiny_opt"])
def test_train_with_heads_saves_a_model_that_evaluate_reloads(model, tmp_path):
    cfg = compose_cfg("train", SHORT + [f"model={model}", "compress=heads", "compress.heads.importance_batches=2"],
                      tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record.get("error")
    saved = read_result(tmp_path)
    summary = saved["compress"]["heads"]
    assert summary["method"] == "gradient" and summary["heads_kept_per_layer"] == [3, 3]
    assert summary["params_after"] == saved["params"] < summary["params_before"]
    assert json.loads((tmp_path / "model" / "config.json").read_text())["attention_layout"] == [[3, 16], [3, 16]]

    evaluated = run.evaluate(compose_cfg("eval", SHORT + [f"model={model}", f"ckpt={tmp_path}"], tmp_path / "eval"))
    assert evaluated["status"] == "ok", evaluated.get("error")
    assert evaluated["params"] == saved["params"]
    for key, value in saved["metrics"].items():
        assert evaluated["metrics"][key] == pytest.approx(value, abs=1e-5)


def test_heads_then_rows_on_llama_reload_with_stock_transformers(tmp_path):
    cfg = compose_cfg("train", SHORT + ["model=tiny_llama", "compress=[heads,rows]", "compress.heads.amount=0.5",
                                        "compress.heads.method=magnitude"], tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record.get("error")
    saved = read_result(tmp_path)
    assert saved["compress"]["heads"]["heads_kept_per_layer"] == [2, 2]
    assert saved["compress"]["rows"]["intermediate_after"] == [96, 96]
    assert saved["compress"]["rows"]["reload"] == "stock"
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 96)
    assert "auto_map" not in config
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")  # no trust_remote_code
    assert models.count_params(stock)[0] == saved["params"]

    evaluated = run.evaluate(compose_cfg("eval", SHORT + ["model=tiny_llama", f"ckpt={tmp_path}"], tmp_path / "eval"))
    assert evaluated["status"] == "ok", evaluated.get("error")
    assert evaluated["params"] == saved["params"] == saved["compress"]["rows"]["params_after"]
    for key, value in saved["metrics"].items():
        assert evaluated["metrics"][key] == pytest.approx(value, abs=1e-5)


def test_heads_then_rows_on_opt_reload_with_squeeze_and_with_trust_remote_code(tmp_path):
    cfg = compose_cfg("train", SHORT + ["model=tiny_opt", "compress=[heads,rows]", "compress.heads.amount=1",
                                        "compress.heads.method=magnitude", "compress.rows.qkv_amount=4"], tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record.get("error")
    saved = read_result(tmp_path)
    assert saved["compress"]["heads"]["heads_kept_per_layer"] == [3, 3]
    assert saved["compress"]["rows"]["intermediate_after"] == [96, 96]
    assert saved["compress"]["rows"]["head_dim_after"] == [12, 12]
    assert saved["compress"]["rows"]["reload"] == "trust_remote_code"
    model_dir = tmp_path / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["attention_layout"] == [[3, 12], [3, 12]] and config["ffn_dim"] == 96
    assert (model_dir / "pruned_attention.py").exists()

    # squeeze's loader (its own copy of the classes) and plain transformers (the copy in the directory) agree.
    ours = formats.load(model_dir, "sequence_classification").eval()
    plain = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
    assert models.count_params(ours)[0] == models.count_params(plain)[0] == saved["params"]
    torch.testing.assert_close(logits(plain), logits(ours), rtol=0, atol=0)

    evaluated = run.evaluate(compose_cfg("eval", SHORT + ["model=tiny_opt", f"ckpt={tmp_path}"], tmp_path / "eval"))
    assert evaluated["status"] == "ok", evaluated.get("error")
    for key, value in saved["metrics"].items():
        assert evaluated["metrics"][key] == pytest.approx(value, abs=1e-5)


def test_iterative_pruning_fine_tunes_between_steps(tmp_path):
    # 7 steps, validated every 2: cuts before step 1 and at step 3 (by the deadline, step 4: the last 30% recover),
    # so the validation at step 2 scores the wider model and those at 4 and 6 the final one.
    cfg = compose_cfg("train", SHORT + ["model=tiny_bert", "compress=heads", "compress.heads.method=magnitude",
                                        "compress.heads.amount=2", "compress.heads.iterations=2",
                                        "compress.heads.every_n_steps=3", "trainer.max_steps=7",
                                        "trainer.val_check_interval=2", "task.monitor=val/loss",
                                        "task.monitor_mode=min", "checkpoint.keep_after_success=best"], tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record.get("error")
    saved = read_result(tmp_path)
    summary = saved["compress"]["heads"]
    assert summary["steps_done"] == 2 and summary["heads_kept_per_layer"] == [2, 2]
    assert summary["event_steps"] == [0, 3] and summary["steps_after_last_event"] == 4
    # The model tested is the best validation after the last cut (its shapes), not an earlier, wider one.
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] in (4, 6)
    assert best["state_dict"]["model.bert.encoder.layer.0.attention.self.query.weight"].shape[0] == 2 * HEAD_DIM
    with open(tmp_path / "csv" / "metrics.csv") as f:
        # Lightning logs the validation after optimizer step k at metrics.csv step k - 1
        losses = {int(r["step"]) + 1: float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}
    assert sorted(losses) == [2, 4, 6]
    assert saved["validation"]["best"] == pytest.approx(min(losses[4], losses[6]), rel=1e-6)


def test_iterative_pruning_that_cannot_finish_is_refused(tmp_path):
    cfg = compose_cfg("train", SHORT + ["model=tiny_bert", "compress=heads", "compress.heads.method=magnitude",
                                        "compress.heads.iterations=3", "compress.heads.every_n_steps=10"], tmp_path)
    with pytest.raises(SqueezeError, match=r"comes at step 20, but this run's last 1 of 3 optimizer steps are kept "
                                           r"to recover \(compress.heads.recovery=0.3\), so pruning ends by step 2; "
                                           r"lower every_n_steps to ≤ 1"):
        run.train(cfg)
    # the last step on the run's last step: no step left to recover (4 steps: pruning ends by step 2)
    cfg = compose_cfg("train", SHORT + ["model=tiny_bert", "compress=heads", "compress.heads.method=magnitude",
                                        "compress.heads.iterations=2", "compress.heads.every_n_steps=3",
                                        "trainer.max_steps=4"], tmp_path)
    with pytest.raises(SqueezeError, match="comes at step 3, but .* pruning ends by step 2"):
        run.train(cfg)


def test_a_fraction_that_rounds_to_no_head_says_so(caplog):
    from squeeze.compress.structured.heads import HeadPruning

    model, tokenizer = build_tiny("tiny_llama", "causal_lm")
    groups = model.config.num_key_value_heads
    pruner = HeadPruning(amount=0.4 / groups, method="magnitude")  # under half a group per layer
    with caplog.at_level("WARNING", logger="squeeze"):
        pruner.prepare_model(model, tokenizer)
    assert "removes nothing" in caplog.text
    assert pruner.summary()["heads_per_layer_before"] == [model.config.num_attention_heads] * model.config.num_hidden_layers


def test_rows_in_steps_cut_equal_shares_of_the_original_widths_with_fine_tuning_between(tmp_path):
    """The nanoGPT study's QKV-row schedule, small: fine-tune first, then 3 cuts of the original head dims (and MLP
    neurons), fine-tuning between them; the optimizer follows the new shapes and the saved model has the last ones."""
    cfg = compose_cfg("train", SHORT + ["model=tiny_gpt2", "task=austen", "task.data.block_size=32",
                                        "task.data.max_examples.train=300", "trainer.max_epochs=50",
                                        "compress=rows", "compress.rows.qkv_amount=0.75", "compress.rows.mlp_amount=0.5",
                                        "compress.rows.iterations=3", "compress.rows.every_n_steps=2",
                                        "compress.rows.start_step=2", "compress.rows.recovery=0.2",
                                        "trainer.max_steps=9", "trainer.val_check_interval=2",
                                        "task.monitor=val/loss", "task.monitor_mode=min"], tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record.get("error")
    summary = read_result(tmp_path)["compress"]["rows"]
    d, width = summary["head_dim_before"][0], summary["intermediate_before"][0]
    dims, neurons = int(0.75 * d + 0.5), int(0.5 * width + 0.5)  # in the end, in 3 equal cumulative shares
    assert summary["event_steps"] == [2, 4, 6] and summary["steps_done"] == 3
    assert [e["head_dim"][0] for e in summary["events"]] == [d - int(dims * k / 3 + 0.5) for k in (1, 2, 3)]
    assert [e["intermediate"][0] for e in summary["events"]] == [width - int(neurons * k / 3 + 0.5) for k in (1, 2, 3)]
    params = [e["params"] for e in summary["events"]]
    assert summary["params_before"] > params[0] > params[1] > params[2] == summary["params_after"]
    assert summary["steps_after_last_event"] == 3
    with open(tmp_path / "csv" / "metrics.csv") as f:
        validated = {int(r["step"]) + 1 for r in csv.DictReader(f) if r.get("val/loss")}
        f.seek(0)
        trained = {int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert {2, 4, 6, 8} <= validated and set(range(9)) <= trained  # every step trained, between the cuts too
    reloaded = formats.load(tmp_path / "model", "causal_lm")
    assert reloaded.transformer.h[0].mlp.c_fc.weight.shape[1] == width - neurons
    assert models.count_params(reloaded)[0] == summary["params_after"]


def test_rows_in_steps_that_cannot_finish_before_recovery_are_refused(tmp_path):
    cfg = compose_cfg("train", SHORT + ["model=tiny_bert", "compress=rows", "compress.rows.iterations=3",
                                        "compress.rows.every_n_steps=3", "compress.rows.start_step=2",
                                        "trainer.max_steps=8"], tmp_path)
    with pytest.raises(SqueezeError, match=r"compress.rows: the last of 3 pruning steps every 3 steps comes at step 8, "
                                           r"but .* pruning ends by step 5; lower every_n_steps to ≤ 1"):
        run.train(cfg)
