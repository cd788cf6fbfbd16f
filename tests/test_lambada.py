"""LAMBADA: each passage's last word scored from the rest, passage by passage, as lm-evaluation-harness does;
checked by hand on a bigram model over characters, then end to end on tiny_gpt2 from a local JSONL."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from squeeze import run
from squeeze.run import build
from squeeze.errors import SqueezeError
from squeeze.tasks.lm import LastWordData, LastWordLM, encode_last_word, split_last_word

from conftest import compose_cfg, fast, read_result

# A character "tokenizer" (one token per character; 4 is end-of-text and padding) and a bigram model over it:
# P[prev][next], logits log P[prev]. The argmax after each character: " "->c, a->" ", b->" ", c->a, eos->c.
CHARS = {" ": 0, "a": 1, "b": 2, "c": 3}
EOS = 4
P = torch.tensor([
    [0.10, 0.20, 0.10, 0.50, 0.10],
    [0.60, 0.10, 0.10, 0.10, 0.10],
    [0.70, 0.10, 0.10, 0.05, 0.05],
    [0.10, 0.50, 0.30, 0.05, 0.05],
    [0.10, 0.10, 0.10, 0.60, 0.10],
])


class CharTokenizer:
    eos_token_id = pad_token_id = EOS
    bos_token_id = None

    def __call__(self, text, add_special_tokens=False):  # one text or a list of them, as transformers' tokenizers
        if isinstance(text, list):
            return {"input_ids": [[CHARS[c] for c in t] for t in text]}
        return {"input_ids": [CHARS[c] for c in text]}


class Bigram(torch.nn.Module):
    config = SimpleNamespace(n_positions=64)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return SimpleNamespace(logits=P.log()[input_ids], loss=torch.tensor(0.0))


class Rows:
    column_names = ["text"]

    def __init__(self, texts):
        self.texts = texts

    def __getitem__(self, key):
        return self.texts


def ln(x):
    return math.log(x)


def test_split_and_encode_follow_the_harness():
    assert split_last_word("he said to her brother\n") == ("he said to her", " brother")
    assert split_last_word("alone") == ("", " alone")
    tok = CharTokenizer()
    assert encode_last_word(tok, "ab ca", 16) == ([1, 2, 0, 3, 1], 2, False)
    assert encode_last_word(tok, "c", 16) == ([EOS, 0, 3], 1, False)  # no context: end-of-text stands for it
    assert encode_last_word(tok, "ab ca", 4) == ([2, 0, 3, 1], 1, True)  # context cut from the left only
    with pytest.raises(ValueError, match="last word"):
        encode_last_word(tok, "ab ca", 3)  # the word alone fills the window: no context left


def test_last_word_accuracy_and_perplexity_match_hand_computation():
    passages = ["ab ca", "ca cb", "b a", "c"]
    # Target tokens and their probabilities given the gold prefix (argmax hit?):
    #   "ab ca": " "|b .7 (hit)  c|" " .5 (hit)  a|c .5 (hit)   -> right
    #   "ca cb": " "|a .6 (hit)  c|" " .5 (hit)  b|c .3 (miss)  -> wrong
    #   "b a":   " "|b .7 (hit)  a|" " .2 (miss)                -> wrong
    #   "c":     " "|eos .1 (miss) c|" " .5 (hit)               -> wrong
    word_nll = [-(ln(.7) + ln(.5) + ln(.5)), -(ln(.6) + ln(.5) + ln(.3)), -(ln(.7) + ln(.2)), -(ln(.1) + ln(.5))]
    # Every token after each passage's first, for the passages' perplexity.
    token_logp = [ln(.1), ln(.7), ln(.5), ln(.5),  # ab ca
                  ln(.5), ln(.6), ln(.5), ln(.3),  # ca cb
                  ln(.7), ln(.2),                  # b a
                  ln(.1), ln(.5)]                  # <eos> c
    data = LastWordData(CharTokenizer(), source="json", block_size=8)
    examples = data.encode(Rows(passages), "test")
    module = LastWordLM(Bigram())
    metrics = module.metrics["test"]
    for i in range(0, len(examples), 3):  # batches of unequal passages: the padding path
        batch = data.collate(examples[i : i + 3])
        assert set(batch) == {"input_ids", "attention_mask", "labels", "target_mask"}
        module.update_metrics(metrics, batch, module(batch))  # the forward pass drops target_mask
    out = module.compute_metrics(metrics)
    assert out["last_word_accuracy"].item() == pytest.approx(1 / 4)
    assert out["last_word_perplexity"].item() == pytest.approx(math.exp(sum(word_nll) / 4), rel=1e-5)
    assert out["perplexity"].item() == pytest.approx(math.exp(-sum(token_logp) / len(token_logp)), rel=1e-5)
    assert data.scored_tokens["test"] == len(token_logp)
    assert data.passages["test"] == {"passages": 4, "target_tokens": 10, "truncated": 0, "blank_skipped": 0,
                                     "shots": 0, "shots_from": None, "fewer_shots": 0}
    assert data.protocol_record["protocol"] == "last_word"


def test_blank_lines_are_no_passages_and_a_split_of_only_blanks_is_named():
    data = LastWordData(CharTokenizer(), source="json", block_size=8)
    encoded = data.encode(Rows(["ab ca", "   ", "", "b cab"]), "test")  # a text file's blank lines
    assert len(encoded) == 2 and data.passages["test"]["blank_skipped"] == 2
    with pytest.raises(SqueezeError, match="no passage with text"):
        data.encode(Rows(["  ", ""]), "test")


def test_gpt2_tokens_of_the_target_are_the_word_with_its_space(tmp_path):
    cfg = compose_cfg("eval", ["model=tiny_gpt2", "task=lambada"], tmp_path)
    tokenizer = build.prepare(cfg)[1]
    ids, start, cut = encode_last_word(tokenizer, "She looked at her brother", 64)
    assert ids[start:] == tokenizer(" brother", add_special_tokens=False)["input_ids"] and not cut
    assert tokenizer.decode(ids[:start]) == "She looked at her"


PASSAGES = [
    "the old man walked down to the harbour every morning to watch the boats come in , and the boats",
    "she opened the letter slowly , read it twice , and then handed it to her sister",
    "when the rain stopped they went out into the garden and found the little dog asleep under the tree",
    "he had promised to bring the book back by friday , so on friday he brought the book",
    "the children sang while their mother cooked , and the smell of bread filled the whole house",
    "nobody knew where the key was until the youngest girl remembered she had hidden the key",
]


def _jsonl(path):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES), encoding="utf-8")
    return path


def _check_record(record, passages):
    assert record["status"] == "ok", record["error"]
    m = record["metrics"]
    assert 0 <= m["test/last_word_accuracy"] <= 1
    assert math.isfinite(m["test/last_word_perplexity"]) and m["test/last_word_perplexity"] > 1
    assert math.isfinite(m["test/perplexity"]) and "test/loss" in m
    p = record["perplexity"]
    assert p["protocol"] == "last_word" and p["scored_tokens"] > 0
    assert p["last_word"]["passages"] == passages and p["last_word"]["target_tokens"] >= passages
    assert p["last_word"]["truncated"] == 0 and p["last_word"]["max_length"] == 512  # tiny_gpt2's context


def test_evaluate_scores_a_local_jsonl_of_passages(tmp_path):
    file = _jsonl(tmp_path / "passages.jsonl")
    cfg = compose_cfg("eval", ["model=tiny_gpt2", "task=lambada", *fast("lambada"), "perf=null",
                               "callbacks.energy=null", f"task.data.data_files={file}"], tmp_path / "run")
    record = run.evaluate(cfg)
    _check_record(read_result(tmp_path / "run"), len(PASSAGES))
    assert record["metrics"]["test/last_word_accuracy"] == read_result(tmp_path / "run")["metrics"][
        "test/last_word_accuracy"]


def test_train_on_blocks_then_score_passages(tmp_path):
    file = _jsonl(tmp_path / "passages.jsonl")
    files = f"{{train: {file}, validation: {file}, test: {file}}}"
    cfg = compose_cfg("train", ["model=tiny_gpt2", "task=lambada", *fast("lambada"), "perf=null",
                                "callbacks.energy=null", "trainer.max_steps=2", "task.data.block_size=16",
                                f"task.data.data_files={files}"], tmp_path)
    run.train(cfg)
    record = read_result(tmp_path)
    _check_record(record, len(PASSAGES))
    assert record["validation"]["monitor"] == "val/perplexity"
