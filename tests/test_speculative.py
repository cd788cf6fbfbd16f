"""Speculative decoding: same greedy output as plain decoding, acceptance counted, bad drafts refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FAST, compose_cfg, fast, read_result, run_cli
from transformers import AutoTokenizer

from squeeze import assets, formats, run
from squeeze.compress import quantization as q
from squeeze.errors import SqueezeError
from squeeze.measure.speculative import (
    PROMPT_LOOKUP,
    check_decode,
    check_draft,
    check_same_tokenizer,
    check_settings,
    first_layers,
    load_draft,
    measure_speculative,
)

PROMPTS = ["User: hello there, how are you?\nBot:", "Persona: I like tea.\nUser: what do you drink?\nBot:"]


@pytest.fixture(scope="module")
def llama(tiny_model):
    model, tokenizer = tiny_model("tiny_llama", "causal_lm", layers=4, max_position_embeddings=256)
    # float64: greedy decoding compares near-equal logits; doubles keep the one-token and the
    # several-token forward passes from rounding a near-tie differently.
    return model.double(), tokenizer


@pytest.fixture(scope="module")
def gpt2(tiny_model):
    model, tokenizer = tiny_model("tiny_gpt2", "causal_lm", layers=3, seed=1, n_positions=256)
    return model.double(), tokenizer


def test_first_layers_cuts_a_copy(llama, gpt2):
    for model, _ in (llama, gpt2):
        total = model.config.num_hidden_layers
        draft = first_layers(model, 1)
        assert draft.config.num_hidden_layers == 1 and model.config.num_hidden_layers == total
        kept = dict(draft.named_parameters())
        assert kept and all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in kept.items())
        assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in model.parameters())
        with pytest.raises(SqueezeError, match=f"keeps 1 to {total - 1}"):
            first_layers(model, total)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_greedy_output_is_the_targets_own_and_acceptance_is_counted(which, llama, gpt2):
    model, tokenizer = llama if which == "llama" else gpt2
    # The same model as its own draft: every drafted token must be accepted.
    same = measure_speculative(model, copy.deepcopy(model), tokenizer, PROMPTS, max_new_tokens=8,
                               num_assistant_tokens=3, warmup=0)
    assert same["same_output"] == 1.0
    assert same["speculative"]["drafted"] > 0
    assert same["speculative"]["acceptance_rate"] == 1.0
    assert same["plain"]["new_tokens"] == same["speculative"]["new_tokens"] > 0
    # 3 drafted + 1 own token per target pass (less at the end, where the budget runs out).
    assert same["speculative"]["tokens_per_target_pass"] > 2
    # A truncated draft: same output whatever it proposes; acceptance in [0, 1].
    cut = measure_speculative(model, first_layers(model, 1), tokenizer, PROMPTS, max_new_tokens=8,
                              num_assistant_tokens=3, warmup=0)
    assert cut["same_output"] == 1.0
    assert 0.0 <= cut["speculative"]["acceptance_rate"] <= 1.0
    assert cut["speculative"]["accepted"] <= cut["speculative"]["drafted"]
    for key in ("ms_per_token", "tokens_per_s"):
        assert cut["plain"][key] > 0 and cut["speculative"][key] > 0
    assert cut["speedup"] == pytest.approx(cut["plain"]["ms_per_token"] / cut["speculative"]["ms_per_token"])
    assert cut["draft_layers"] == 1 and cut["target_layers"] == model.config.num_hidden_layers


def test_a_draft_with_another_tokenizer_is_refused(llama, gpt2):
    (model, llama_tok), (_, gpt2_tok) = llama, gpt2
    with pytest.raises(SqueezeError, match=r"does not share the target's tokenizer \(vocabularies differ"):
        check_same_tokenizer(llama_tok, gpt2_tok)
    with pytest.raises(SqueezeError, match="does not share the target's tokenizer"):
        measure_speculative(model, first_layers(model, 1), llama_tok, PROMPTS, draft_tokenizer=gpt2_tok)
    check_same_tokenizer(llama_tok, AutoTokenizer.from_pretrained(str(assets.locate("smollm2"))))


def test_a_saved_draft_directory_is_checked_and_loaded(tmp_path, llama, gpt2):
    (model, llama_tok), (gpt2_model, gpt2_tok) = llama, gpt2
    good = tmp_path / "good"
    first_layers(model, 2).save_pretrained(str(good))
    llama_tok.save_pretrained(str(good))
    draft = load_draft(str(good), model, llama_tok)
    assert draft.config.num_hidden_layers == 2 and next(draft.parameters()).dtype == torch.float64
    bad = tmp_path / "bad"
    gpt2_model.save_pretrained(str(bad))
    gpt2_tok.save_pretrained(str(bad))
    with pytest.raises(SqueezeError, match=f"draft {bad} does not share the target's tokenizer"):
        load_draft(str(bad), model, llama_tok)
    with pytest.raises(SqueezeError, match="nothing does not exist; give a layer count"):
        load_draft(str(tmp_path / "nothing"), model, llama_tok)
    assert load_draft("1", model, llama_tok).config.num_hidden_layers == 1


def test_decode_settings_are_checked():
    check_decode(None, None, "sequence_classification")
    check_decode("plain", None, "causal_lm")
    check_decode("speculative", 2, "causal_lm")
    with pytest.raises(SqueezeError, match="decode=speculative needs draft="):
        check_decode("speculative", None, "causal_lm")
    with pytest.raises(SqueezeError, match="decode='beam' is not one of"):
        check_decode("beam", 2, "causal_lm")
    with pytest.raises(SqueezeError, match="draft=2 is only used by decode=speculative"):
        check_decode("plain", 2, "causal_lm")
    with pytest.raises(SqueezeError, match="needs a causal-LM task .* head is sequence_classification"):
        check_decode("speculative", 2, "sequence_classification")
    with pytest.raises(SqueezeError, match="an evaluate.py option: train first"):
        check_decode("speculative", 2, "causal_lm", evaluating=False)


# -- prompt lookup: no draft model -----------------------------------------------------------------
# Prompts whose continuation a random-init model tends to take from the prompt (repeated n-grams).
REPEATING = ["User: hello there, how are you? hello there, how are you?\nBot:", "a b c d a b c d a b c d a b"]


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_prompt_lookup_gives_the_targets_own_output_and_counts_acceptance(which, llama, gpt2):
    model, tokenizer = llama if which == "llama" else gpt2
    result = measure_speculative(model, PROMPT_LOOKUP, tokenizer, REPEATING + PROMPTS, max_new_tokens=12,
                                 num_assistant_tokens=[1, 4], warmup=0)
    assert result["draft_kind"] == PROMPT_LOOKUP and result["draft_params"] == 0 and result["draft_layers"] is None
    assert result["max_matching_ngram_size"] == 2  # transformers' default
    assert result["same_output"] == 1.0  # greedy: the target's own output, whatever the lookup proposed
    assert [t["num_assistant_tokens"] for t in result["tries"]] == [1, 4]
    for t in result["tries"]:
        spec = t["speculative"]
        assert t["same_output"] == 1.0 and spec["new_tokens"] == result["plain"]["new_tokens"] > 0
        assert spec["drafted"] > 0 and 0.0 <= spec["acceptance_rate"] <= 1.0
        assert spec["acceptance_rate"] == spec["accepted"] / spec["drafted"]
        # Each target pass keeps the drafted tokens it accepted plus one of its own.
        assert spec["new_tokens"] == spec["accepted"] + spec["target_passes"]
        assert t["speedup"] == pytest.approx(result["plain"]["ms_per_token"] / spec["ms_per_token"])
    assert result["tries"][0]["speculative"]["drafted"] <= result["tries"][0]["speculative"]["target_passes"]
    best = min(result["tries"], key=lambda t: t["speculative"]["ms_per_token"])
    assert result["num_assistant_tokens"] == best["num_assistant_tokens"] and result["speedup"] == best["speedup"]
    assert result["speculative"] == best["speculative"]


def test_prompt_lookup_settings_are_checked(llama):
    model, tokenizer = llama
    assert load_draft(PROMPT_LOOKUP, model, tokenizer) == PROMPT_LOOKUP
    check_draft(PROMPT_LOOKUP, model, tokenizer)
    check_decode("speculative", PROMPT_LOOKUP, "causal_lm", settings={"num_assistant_tokens": [2, 4]})
    check_settings(PROMPT_LOOKUP, max_matching_ngram_size=3)
    for settings, message in [
        ({"schedule": "heuristic"}, "draft=prompt_lookup drafts a fixed number of tokens"),
        ({"confidence_threshold": 0.4}, "confidence_threshold=0.4 apply to a draft model only"),
        ({"max_matching_ngram_size": 0}, "max_matching_ngram_size=0 must be 1 or more"),
        ({"num_assistant_tokens": 0}, r"num_assistant_tokens=0 must be a number >= 1 or a list"),
        ({"num_assistant_tokens": [2, 2]}, r"num_assistant_tokens=\[2, 2\] must be"),
        ({"num_assistant_tokens": []}, "num_assistant_tokens=.* must be"),
        ({"num_assistant_tokens": "many"}, "num_assistant_tokens=many must be"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 must be 1 or more"),
    ]:
        with pytest.raises(SqueezeError, match=message):
            check_decode("speculative", PROMPT_LOOKUP, "causal_lm", settings=settings)
    with pytest.raises(SqueezeError, match="max_matching_ngram_size=3 is used by draft=prompt_lookup only"):
        check_settings(2, max_matching_ngram_size=3)
    with pytest.raises(SqueezeError, match="schedule=heuristic"):
        measure_speculative(model, PROMPT_LOOKUP, tokenizer, PROMPTS, schedule="heuristic")
    with pytest.raises(SqueezeError, match="neither a model nor 'prompt_lookup'"):
        measure_speculative(model, "prompt-lookup", tokenizer, PROMPTS)


# -- a quantized draft: a dq or int8wo run directory ------------------------------------------------
def _quantized_run(tmp_path, model, tokenizer, compressor, name: str):
    """A run directory as a run leaves a compress=<int8wo | dq> run: result.json and the quantized model/."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "result.json").write_text(json.dumps({
        "status": "ok", "choices": {"compress": name},
        "config": {"model": {"name": name, "kind": "decoder"}, "task": {"head": "causal_lm"}}}))
    compressor.name = name
    quantized = copy.deepcopy(model).float()
    compressor.prepare_model(quantized, tokenizer)
    formats.save(compressor.finalize(quantized), tokenizer, run_dir / "model")
    return run_dir


@pytest.mark.parametrize("which, compressor", [("gpt2", q.WeightOnlyQuantization), ("llama", q.DynamicQuantization)])
def test_a_quantized_run_directory_is_a_draft(which, compressor, llama, gpt2, tmp_path):
    model, tokenizer = llama if which == "llama" else gpt2
    run_dir = _quantized_run(tmp_path, model, tokenizer, compressor(), compressor.__name__)
    draft = load_draft(str(run_dir), model, tokenizer)
    assert formats.has_quantized_weights(draft)  # loaded in its saved, integer form
    # It keeps the precision it was saved in (float32 around its integers) under a float64 target.
    assert {p.dtype for p in draft.parameters() if p.is_floating_point()} == {torch.float32}
    result = measure_speculative(model, draft, tokenizer, PROMPTS, max_new_tokens=8, num_assistant_tokens=3,
                                 warmup=0)
    assert result["same_output"] == 1.0
    # The target quantized: it mostly proposes what the target would say.
    assert result["speculative"]["drafted"] > 0 and 0.5 <= result["speculative"]["acceptance_rate"] <= 1.0


# -- evaluate.py decode=speculative -----------------------------------------------------------------
DIALOG = ["task=chatterbot", "task.data.max_examples.train=32", "task.data.max_examples.validation=4",
          "task.data.max_examples.test=4", "task.data.num_candidates=5", "task.module.hits_at=[1,5]",
          "task.data.eval_batch_size=10", "task.module.generate.max_new_tokens=4", "task.module.bertscore=null",
          "trainer.limit_val_batches=1", "perf=null"]
SPECULATIVE = ["decode=speculative", "speculative.prompts=3", "speculative.max_new_tokens=8",
               "speculative.num_assistant_tokens=3", "speculative.warmup=0"]


@pytest.fixture(scope="module")
def dialog_run(tmp_path_factory):
    """A tiny GPT-2 trained a few steps on chatterbot, and a tiny Llama run (another tokenizer)."""
    runs = tmp_path_factory.mktemp("runs")
    for model, steps in (("tiny_gpt2", 3), ("tiny_llama", 0)):
        overrides = FAST + DIALOG + [f"model={model}", f"trainer.max_steps={steps}", "trainer.limit_train_batches=3"]
        record = run.train(compose_cfg("train", overrides, runs / model))
        assert record["status"] == "ok", record["error"]
    return runs


def test_evaluate_cli_times_speculative_decoding_with_a_cut_draft(dialog_run, tmp_path):
    done = run_cli("evaluate.py", ["model=tiny_gpt2", f"ckpt={dialog_run / 'tiny_gpt2'}", *FAST, *DIALOG, *SPECULATIVE,
                                   "draft=1", f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    record = read_result(tmp_path / "eval")
    result = record["speculative"]
    assert result["same_output"] == 1.0  # greedy: the target's own output, whatever the draft proposed
    assert 0.0 <= result["speculative"]["acceptance_rate"] <= 1.0 and result["speculative"]["drafted"] > 0
    assert result["target_layers"] == 2 and result["draft_layers"] == 1 and result["prompts"] == 3
    for key in ("ms_per_token", "tokens_per_s"):
        assert result["plain"][key] > 0 and result["speculative"][key] > 0
    assert result["speedup"] == pytest.approx(result["plain"]["ms_per_token"] / result["speculative"]["ms_per_token"])
    assert {"test/hits@1", "test/bleu"} <= set(record["metrics"])  # the usual evaluation ran too


def test_evaluate_cli_refuses_a_draft_with_another_tokenizer(dialog_run, tmp_path):
    done = run_cli("evaluate.py", ["model=tiny_gpt2", f"ckpt={dialog_run / 'tiny_gpt2'}", *FAST, *DIALOG,
                                   *SPECULATIVE, f"draft={dialog_run / 'tiny_llama'}",
                                   f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path)
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error: draft ") and "does not share the target's tokenizer (vocabularies differ" in error
    record = read_result(tmp_path / "eval")
    assert record["status"] == "failed" and record["eval_seconds"] is None  # refused before testing


def test_a_run_draft_on_a_language_modelling_task(dialog_run, tmp_path):
    # Any causal-LM task: austen prompts are the first tokens of test blocks. The trained dialog run
    # is its own draft here, so every drafted token is the target's own choice.
    target = dialog_run / "tiny_gpt2"
    overrides = [*fast("austen"), "task=austen", "model=tiny_gpt2", f"ckpt={target}", "perf=null",
                 "task.data.max_examples.test=8", *SPECULATIVE, "speculative.prompt_tokens=12", f"draft={target}"]
    record = run.evaluate(compose_cfg("eval", overrides, tmp_path))
    assert record["status"] == "ok", record["error"]
    result = record["speculative"]
    assert result["draft"] == str(target) and result["draft_layers"] == result["target_layers"]
    assert result["same_output"] == 1.0 and result["speculative"]["acceptance_rate"] == 1.0
    assert "test/perplexity" in record["metrics"]


def test_prompt_lookup_from_evaluate_tries_each_draft_length(dialog_run, tmp_path):
    target = dialog_run / "tiny_gpt2"
    overrides = [*fast("austen"), "task=austen", "model=tiny_gpt2", f"ckpt={target}", "perf=null",
                 "task.data.max_examples.test=8", *SPECULATIVE, "speculative.prompt_tokens=12",
                 f"draft={PROMPT_LOOKUP}", "speculative.num_assistant_tokens=[2,5]",
                 "speculative.max_matching_ngram_size=3"]
    record = run.evaluate(compose_cfg("eval", overrides, tmp_path))
    assert record["status"] == "ok", record["error"]
    result = record["speculative"]
    assert result["draft"] == PROMPT_LOOKUP and result["draft_kind"] == PROMPT_LOOKUP
    assert result["max_matching_ngram_size"] == 3 and result["prompts"] >= 1
    assert [t["num_assistant_tokens"] for t in result["tries"]] == [2, 5]
    for t in result["tries"]:
        assert t["same_output"] == 1.0 and t["speedup"] > 0
        rate = t["speculative"]["acceptance_rate"]
        assert rate is None or 0.0 <= rate <= 1.0  # None: no n-gram of these prompts recurred


def test_bad_speculative_settings_fail_before_testing(tmp_path):
    cfg = compose_cfg("eval", [*fast("austen"), "task=austen", "model=tiny_gpt2", "decode=speculative",
                               f"draft={PROMPT_LOOKUP}", "speculative.schedule=heuristic"], tmp_path)
    with pytest.raises(SqueezeError, match="draft=prompt_lookup drafts a fixed number of tokens"):
        run.evaluate(cfg)
    assert read_result(tmp_path)["eval_seconds"] is None


def test_speculative_decoding_is_refused_where_it_cannot_run(tmp_path):
    cfg = compose_cfg("eval", [*fast("rotten_tomatoes"), "model=tiny_gpt2", "decode=speculative", "draft=1"], tmp_path)
    with pytest.raises(SqueezeError, match="needs a causal-LM task"):
        run.evaluate(cfg)
    assert read_result(tmp_path)["status"] == "failed"
    cfg = compose_cfg("eval", [*fast("austen"), "task=austen", "model=tiny_gpt2", "decode=speculative", "draft=2"],
                      tmp_path / "too_deep")
    with pytest.raises(SqueezeError, match="a draft cut from a 2-layer target keeps 1 to 1"):
        run.evaluate(cfg)


def test_train_refuses_speculative_decoding(tmp_path):
    cfg = compose_cfg("train", [*fast("austen"), "task=austen", "model=tiny_gpt2", "decode=speculative"], tmp_path)
    with pytest.raises(SqueezeError, match="decode=speculative is an evaluate.py option: train first"):
        run.train(cfg)
