"""Dialog task: input building, distractors, Hits@k, bad input, and real runs on tiny models."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST, build_tiny, compose_cfg, read_result, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from squeeze import assets, run
from squeeze.errors import SqueezeError
from squeeze.tasks.base import IGNORE_INDEX
from squeeze.tasks.dialog.corpora import choose_splits, drop_duplicates, read_chatterbot, sample_distractors
from squeeze.tasks.dialog.data import DialogData
from squeeze.tasks.dialog.encoding import encode_dialog
from squeeze.tasks.dialog.metrics import HitsAtK, hits_at_k, reply_scores
from squeeze.tasks.dialog.module import DialogModule


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return tiny_tokenizer("tiny_gpt2")


@pytest.fixture(scope="module")
def llama_tokenizer():
    return tiny_tokenizer("tiny_llama")


def build_input(tokenizer, persona, history, reply: str, **settings) -> dict[str, list]:
    """One reply's input from encode_dialog (the gold row of candidate_rows): input_ids, labels (-100
    outside the reply) and a segment (persona, each turn's speaker, "reply") for each token."""
    encoded = encode_dialog(tokenizer, persona, history, [reply], **settings)
    context, reply_ids = encoded["context"], encoded["candidates"][0]
    return {
        "input_ids": context + reply_ids,
        "labels": [IGNORE_INDEX] * len(context) + reply_ids,
        "segments": encoded["segments"] + ["reply"] * len(reply_ids),
    }


def _corpus(directory: Path, conversations: list, categories=("pets",), name: str = "pets.yml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(yaml.safe_dump({"categories": list(categories), "conversations": conversations}))
    return directory


def _many(n: int) -> list[list[str]]:
    return [[f"question number {i}?", f"answer number {i}."] for i in range(n)]


# -- input construction ---------------------------------------------------------------------------
def test_input_has_speakers_segments_and_labels_only_on_the_reply(gpt2_tokenizer):
    tok = gpt2_tokenizer
    x = build_input(tok, ["I have a dog."], ["hi there", "hello! who are you?", "just a user"], "I am a bot.")
    text = tok.decode(x["input_ids"])
    assert text == ("Persona: I have a dog.\nUser: hi there\nBot: hello! who are you?\nUser: just a user\n"
                    "Bot: I am a bot.<|endoftext|>")
    assert len(x["input_ids"]) == len(x["labels"]) == len(x["segments"])
    reply = [i for i, s in enumerate(x["segments"]) if s == "reply"]
    assert reply == list(range(reply[0], len(x["input_ids"])))  # the reply is the tail
    assert tok.decode([x["input_ids"][i] for i in reply]) == " I am a bot.<|endoftext|>"
    for i, (token, label) in enumerate(zip(x["input_ids"], x["labels"])):
        assert label == (token if i in reply else IGNORE_INDEX)
    # Each line's tokens carry its speaker; the reply speaker's prefix is the reply speaker's.
    spans = {}
    for token, segment in zip(x["input_ids"], x["segments"]):
        spans.setdefault(segment, []).append(token)
    assert tok.decode(spans["persona"]) == "Persona: I have a dog.\n"
    assert tok.decode(spans["User"]) == "User: hi there\nUser: just a user\n"
    assert tok.decode(spans["Bot"]) == "Bot: hello! who are you?\nBot:"


def test_llama_tokenizer_and_truncation_keep_the_reply(llama_tokenizer):
    tok = llama_tokenizer
    history = [f"turn number {i} is quite a long sentence with many words" for i in range(10)]
    x = build_input(tok, ["I like tea."], history, "sure.", max_length=40, max_history=8, max_reply_tokens=8)
    assert len(x["input_ids"]) <= 40
    text = tok.decode(x["input_ids"])
    assert text.endswith("Bot: sure." + tok.eos_token)
    assert "turn number 9" in text and "turn number 0" not in text  # the oldest turns went first
    assert sum(label != IGNORE_INDEX for label in x["labels"]) == len(tok(" sure.")["input_ids"]) + 1
    long_reply = build_input(tok, [], ["q"], "word " * 50, max_length=64, max_reply_tokens=8)
    assert sum(label != IGNORE_INDEX for label in long_reply["labels"]) == 8  # cut, no EOS
    with pytest.raises(SqueezeError, match="max_length=8 leaves no room"):
        build_input(tok, [], ["q"], "a", max_length=8, max_reply_tokens=8)


# -- reading, splitting, distractors --------------------------------------------------------------
def test_chatterbot_reader_and_the_real_corpus():
    conversations = read_chatterbot(sorted(assets.locate("chatterbot").glob("*.yml")), skip_malformed=True)
    assert len(conversations) > 1900
    assert all(len(c["turns"]) >= 2 for c in conversations)
    assert all("\n" not in t for c in conversations for t in c["turns"])  # one line per turn
    greetings = next(c for c in conversations if c["where"].startswith("greetings.yml"))
    assert greetings["personality"] == ["I like to talk about greetings."]


def test_splits_are_whole_conversations_and_seeded():
    conversations = [{"id": i} for i in range(100)]
    a = choose_splits({"train": conversations}, {"train": "train", "validation": None, "test": None},
                      {"validation": 0.1, "test": 0.2}, seed=3)
    b = choose_splits({"train": conversations}, {"train": "train", "validation": None, "test": None},
                      {"validation": 0.1, "test": 0.2}, seed=3)
    # As squeeze.tasks.sources.load_splits carves: test first, then validation from what is left.
    assert a == b and [len(a[s]) for s in ("train", "validation", "test")] == [72, 8, 20]
    ids = [c["id"] for s in a.values() for c in s]
    assert sorted(ids) == list(range(100))


def test_repeated_conversations_are_dropped_and_an_opening_stays_in_one_split():
    def conversation(opening, reply):
        return {"personality": [], "turns": [opening, reply], "where": ""}
    conversations = [conversation(f"q{i % 10}", f"a{i}") for i in range(60)]  # 10 openings, 6 replies each
    conversations += [conversation("q0", "a0")] * 5  # word-for-word repeats
    unique = drop_duplicates(conversations)
    assert len(unique) == 60
    parts = choose_splits({"train": unique}, {"train": "train", "validation": None, "test": None},
                          {"validation": 0.1, "test": 0.2}, seed=0, group=lambda c: c["turns"][0])
    openings = {s: {c["turns"][0] for c in parts[s]} for s in parts}
    assert not openings["train"] & openings["test"] and not openings["train"] & openings["validation"]
    assert len(parts["test"]) == 12 and sum(map(len, parts.values())) == 60


def test_distractors_come_from_other_conversations_and_never_equal_the_reply():
    examples = [{"reply": "Good.", "conversation": 0, "where": "x"}, {"reply": "Fine", "conversation": 1, "where": "y"}]
    pool = [("Good.", 0), ("good", 2), ("Fine", 1), ("Great", 3), ("Okay", 4), ("Not bad", 5), ("Fine!", 6)]
    sample_distractors(examples, pool, 3, random.Random(0))
    for example in examples:
        assert len(example["distractors"]) == 3 == len(set(example["distractors"]))
        assert all(d.lower().strip(".!") != example["reply"].lower().strip(".!") for d in example["distractors"])
    assert "Fine" not in examples[1]["distractors"] and "Fine!" not in examples[1]["distractors"]
    again = [dict(e, distractors=[]) for e in examples]
    sample_distractors(again, pool, 3, random.Random(0))
    assert [e["distractors"] for e in again] == [e["distractors"] for e in examples]
    with pytest.raises(SqueezeError, match="only 4 distractor replies available.*num_candidates"):
        sample_distractors(examples[:1], pool, 5, random.Random(0))


def test_data_module_rows_batches_and_prompts(tmp_path, gpt2_tokenizer):
    corpus = _corpus(tmp_path / "corpus", _many(40) + [["how are you?", "good.", "and you?", "fine."]])
    data = DialogData(gpt2_tokenizer, source="chatterbot", data_files=[str(p) for p in corpus.glob("*.yml")],
                      splits={"train": "train", "validation": None, "test": None},
                      carve={"validation": 0.2, "test": 0.2}, num_candidates=4, train_candidates=2,
                      batch_size=4, eval_batch_size=8, max_length=64, seed=1)
    data.setup()
    for split, per_example in (("train", 2), ("validation", 4), ("test", 4)):
        for feature, example in zip(data.datasets[split], data.examples[split]):
            rows = feature["rows"]
            assert len(rows) == per_example
            context = rows[-1]["input_ids"][: feature["context_length"]]
            assert all(r["input_ids"][: len(context)] == context for r in rows)  # one shared context
            assert all(all(x == IGNORE_INDEX for x in r["labels"]) for r in rows[:-1])  # distractors unlabelled
            gold = [t for t in rows[-1]["labels"] if t != IGNORE_INDEX]
            assert gpt2_tokenizer.decode(gold) == " " + example["reply"] + "<|endoftext|>"
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # only what a causal LM takes
    assert batch["input_ids"].shape[0] == 8  # 8 rows = 2 examples x 4 candidates
    assert next(iter(data.train_dataloader()))["input_ids"].shape[0] == 4
    prompts = data.generation_prompts("test", 2)
    assert gpt2_tokenizer.decode(prompts[0]).endswith("\nBot:")
    assert next(iter(data.perf_dataloader()))["input_ids"].shape[0] == min(8, len(data.datasets["test"]))


def test_local_convai2_json(tmp_path, gpt2_tokenizer):
    def conversation(i):
        return {"personality": [f"i am person {i}.", "i like tea."],
                "utterances": [{"history": ["hello"], "candidates": [f"wrong {i} {j}" for j in range(4)] + ["hi!"]},
                               {"history": ["hello", "hi!", "how are you?"],
                                "candidates": [f"bad {i} {j}" for j in range(4)] + ["great."]}]}
    path = tmp_path / "personachat.json"
    path.write_text(json.dumps({"train": [conversation(i) for i in range(10)],
                                "valid": [conversation(i) for i in range(10, 13)]}))
    data = DialogData(gpt2_tokenizer, source="convai2", data_files=str(path),
                      splits={"train": "train", "validation": None, "test": "validation"}, carve={"validation": 0.2},
                      num_candidates=5, train_candidates=2, max_length=96)
    data.setup()
    assert [len(data.datasets[s]) for s in ("train", "validation", "test")] == [16, 4, 6]
    rows = data.datasets["test"][1]["rows"]
    text = gpt2_tokenizer.decode(rows[-1]["input_ids"])
    assert text == ("Persona: i am person 10.\nPersona: i like tea.\nUser: hello\nBot: hi!\nUser: how are you?\n"
                    "Bot: great.<|endoftext|>")
    assert gpt2_tokenizer.decode(rows[0]["input_ids"]).endswith("Bot: bad 10 0<|endoftext|>")
    train_rows = data.datasets["train"][0]["rows"]  # the distractor nearest the gold, then the gold
    assert gpt2_tokenizer.decode(train_rows[0]["input_ids"]).rsplit("Bot: ", 1)[1].startswith(("wrong", "bad"))


# -- Hits@k and scoring ---------------------------------------------------------------------------
def test_hits_at_k_on_hand_made_scores():
    scores = torch.tensor([
        [0.1, 0.2, 0.3, 0.9],   # gold (last) best: rank 1
        [0.9, 0.1, 0.2, 0.5],   # one above: rank 2
        [0.9, 0.8, 0.7, 0.1],   # worst: rank 4
        [0.5, 0.5, 0.5, 0.5],   # all tied: ties count against the gold
    ])
    hits = hits_at_k(scores, [1, 2, 4])
    assert hits[1].tolist() == [True, False, False, False]
    assert hits[2].tolist() == [True, True, False, False]
    assert hits[4].tolist() == [True, True, True, True]
    metric = HitsAtK([1, 2])
    metric.update(scores[:2])
    metric.update(scores[2:])
    assert {k: float(v) for k, v in metric.compute().items()} == {"hits@1": 0.25, "hits@2": 0.5}


def test_hits_at_k_refuses_fewer_candidates_than_k():
    with pytest.raises(SqueezeError, match="Hits@10 needs at least 10 candidates per example, the data has 4"):
        hits_at_k(torch.zeros(2, 4), [1, 10])
    with pytest.raises(SqueezeError, match="Hits@10 needs at least 10 candidates.*num_candidates=5"):
        DialogModule(build_tiny("tiny_gpt2", "causal_lm")[0], eval_candidates=5, bertscore=None)


def test_reply_scores_are_mean_log_likelihood_of_the_reply_tokens():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 3, 0, 0]])  # context 5 6 7; replies 8 9 / 3
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[1, 3] = 3  # the gold is the last row
    logits = torch.randn(2, 6, 11)
    logp = logits.log_softmax(-1)
    expected = torch.tensor([[(logp[0, 2, 8] + logp[0, 3, 9]) / 2, logp[1, 2, 3]]])
    got = reply_scores(logits, {"input_ids": ids, "attention_mask": mask, "labels": labels}, candidates=2)
    assert torch.allclose(got, expected)


# -- bad input ------------------------------------------------------------------------------------
def test_conversation_without_a_reply_turn_is_refused(tmp_path, gpt2_tokenizer):
    corpus = _corpus(tmp_path / "bad", _many(30) + [["a lonely statement"]])
    with pytest.raises(SqueezeError, match=r"pets.yml conversation 31 has no reply turn.*skip_malformed=true"):
        read_chatterbot(list(corpus.glob("*.yml")))
    assert len(read_chatterbot(list(corpus.glob("*.yml")), skip_malformed=True)) == 30
    good = {"personality": ["x"], "utterances": [{"history": ["hi"], "candidates": ["no", "yes"]}]}
    path = tmp_path / "convai2.json"
    path.write_text(json.dumps({"train": [good] * 3 + [{"personality": ["x"], "utterances": []}] + [good] * 6}))
    data = DialogData(gpt2_tokenizer, source="convai2", data_files=str(path), num_candidates=2,
                      splits={"train": "train", "validation": None, "test": None})
    with pytest.raises(SqueezeError, match=r"convai2.json train conversation 4 has no reply turn \(empty"):
        data.setup()


def test_too_few_candidates_for_the_configured_count(tmp_path, gpt2_tokenizer):
    conversations = [{"personality": ["x"], "utterances": [{"history": ["hi"], "candidates": ["a", "b", "gold"]}]}
                     for _ in range(10)]
    path = tmp_path / "convai2.json"
    path.write_text(json.dumps({"train": conversations}))
    data = DialogData(gpt2_tokenizer, source="convai2", data_files=str(path), num_candidates=10,
                      splits={"train": "train", "validation": None, "test": None})
    with pytest.raises(SqueezeError, match="has 3 candidates, 10 needed.*num_candidates"):
        data.setup()


def test_mc_loss_needs_distractors():
    with pytest.raises(SqueezeError, match="mc_coef>0 needs distractors"):
        DialogModule(build_tiny("tiny_gpt2", "causal_lm")[0], train_candidates=1, bertscore=None)


# -- real runs ------------------------------------------------------------------------------------
DIALOG_FAST = ["task=chatterbot", "task.data.max_examples.train=48", "task.data.max_examples.validation=6",
               "task.data.max_examples.test=4", "task.data.num_candidates=5", "task.module.hits_at=[1,5]",
               "task.data.eval_batch_size=10", "task.module.generate.max_new_tokens=6", "trainer.max_steps=4",
               "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "perf.batch_sizes=[1]",
               "perf.repeats=1", "perf.warmup=0"]


def _logged(run_dir: Path, name: str) -> list[float]:
    rows = [line.split(",") for line in next((run_dir / "csv").rglob("metrics.csv")).read_text().splitlines()]
    column = rows[0].index(name)
    return [float(r[column]) for r in rows[1:] if r[column]]


def test_train_chatterbot_tiny_gpt2_learns_and_writes_generation_metrics(tmp_path):
    # 8 candidates, so Hits@5 can miss the gold (with 5 it is 1.0 whatever the model does).
    dialog = [o for o in DIALOG_FAST if not o.startswith(("task.data.num_candidates=", "task.data.eval_batch_size="))]
    overrides = FAST + ["model=tiny_gpt2", "task.module.bertscore=null", "optimizer.lr=3e-3"] + dialog + [
        "task.data.num_candidates=8", "task.data.eval_batch_size=16"]
    cfg = compose_cfg("train", overrides + ["trainer.max_steps=6", "trainer.limit_train_batches=6"], tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record["error"]
    saved = read_result(tmp_path)
    metrics = saved["metrics"]
    for name in ("test/loss", "test/perplexity", "test/hits@1", "test/hits@5", "test/bleu", "test/ter"):
        assert name in metrics, name
    assert 0 <= metrics["test/hits@1"] <= metrics["test/hits@5"] <= 1
    for k in (1, 5):  # a fraction of the 4 test examples, each ranked once among its 8 candidates
        assert metrics[f"test/hits@{k}"] * 4 == pytest.approx(round(metrics[f"test/hits@{k}"] * 4))
    assert metrics["test/ter"] > 0 and 0 <= metrics["test/bleu"] <= 100
    assert saved["validation"]["monitor"] == "val/perplexity" and saved["validation"]["best"] > 1
    assert saved["config"]["task"]["module"]["generate"]["max_new_tokens"] == 6  # settings in the record
    # Both losses were trained and logged as parts, and the reply loss went down.
    lm, mc, total = (_logged(tmp_path, f"train/{n}") for n in ("lm_loss", "mc_loss", "loss"))
    assert len(lm) == len(mc) == 6
    assert total[0] == pytest.approx(2.0 * lm[0] + 1.0 * mc[0], rel=1e-4)  # lm_coef · lm + mc_coef · mc
    assert sum(lm[-2:]) / 2 < sum(lm[:2]) / 2
    # The saved model is a plain causal LM with its tokenizer, loadable without squeeze.
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "model"))) == model.config.vocab_size


def test_tiny_llama_trains_and_generates(tmp_path):
    overrides = FAST + ["model=tiny_llama", "task.module.bertscore=null"] + DIALOG_FAST + ["perf=null"]
    record = run.train(compose_cfg("train", overrides + ["trainer.max_steps=2", "trainer.limit_train_batches=2"],
                                   tmp_path))
    assert record["status"] == "ok", record["error"]
    assert {"test/bleu", "test/ter", "test/hits@1", "test/perplexity"} <= set(record["metrics"])


COMPRESS_SETTINGS = {"[imp,dq]": ["compress.imp.end_step=2", "compress.imp.frequency=1"], "[rows,qat]": [],
                     "kd": ["compress.kd.student.layers=1"]}  # kd's teacher: the run's own model


@pytest.mark.parametrize("chain", list(COMPRESS_SETTINGS))
def test_compressors_work_on_dialog_and_evaluate_reloads_the_result(chain, tmp_path):
    overrides = FAST + ["model=tiny_gpt2", "task.module.bertscore=null", f"compress={chain}"] + DIALOG_FAST
    record = run.train(compose_cfg("train", overrides + ["perf=null"] + COMPRESS_SETTINGS[chain], tmp_path))
    assert record["status"] == "ok", record["error"]
    assert record["compress"]["chain"] == chain.strip("[]").split(",")
    assert {"test/perplexity", "test/hits@1", "test/bleu", "test/ter"} <= set(record["metrics"])
    summary = record["compress"]
    if chain == "[imp,dq]":
        assert record["sparsity"] > 0 and summary["dq"]["bits"] in (7, 8) and summary["dq"]["activation_bits"] == 8
    elif chain == "[rows,qat]":
        assert summary["rows"]["params_after"] < summary["rows"]["params_before"]
        assert summary["qat"]["quantized_modules"] > 0
    else:
        assert summary["kd"]["student"]["layers"] == 1 < summary["kd"]["teacher"]["layers"]
        assert len(_logged(tmp_path, "train/loss_kd")) == 4
        # The task share is the dialog's own loss, next-utterance (MC) term included.
        lm, mc, task = (_logged(tmp_path, f"train/{n}") for n in ("lm_loss", "mc_loss", "loss_task"))
        assert len(mc) == 4 and all(t == pytest.approx(2.0 * a + b, rel=1e-4) for t, a, b in zip(task, lm, mc))
    # The compressed model on disk is what was tested: evaluate.py reloads it and scores it the same.
    overrides = FAST + ["model=tiny_gpt2", "task.module.bertscore=null", f"ckpt={tmp_path}"] + DIALOG_FAST
    evaluated = run.evaluate(compose_cfg("eval", overrides + ["perf=null"], tmp_path / "eval"))
    assert evaluated["status"] == "ok", evaluated["error"]
    for name in ("test/perplexity", "test/hits@1", "test/bleu"):
        assert evaluated["metrics"][name] == pytest.approx(record["metrics"][name], rel=1e-4), name


def test_encoder_model_is_refused_for_dialog(tmp_path):
    cfg = compose_cfg("train", FAST + ["model=tiny_bert", "task=chatterbot"], tmp_path)
    with pytest.raises(SqueezeError, match="task=chatterbot needs a causal_lm head"):
        run.train(cfg)


def test_every_dialog_yaml_composes(tmp_path):
    for task in ("chatterbot", "personachat"):
        cfg = compose_cfg("train", ["model=tiny_gpt2", f"task={task}"], tmp_path / task)
        assert cfg.task.module.eval_candidates == cfg.task.data.num_candidates
        assert cfg.task.head == "causal_lm"


@pytest.mark.slow
def test_bertscore_with_the_minilm_encoder(tmp_path):
    cfg = compose_cfg("train", FAST + ["model=tiny_gpt2"] + DIALOG_FAST + ["trainer.max_steps=1",
                                                                         "trainer.limit_train_batches=1"], tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record["error"]
    assert 0 < record["metrics"]["test/bertscore_f1"] <= 1


@pytest.mark.slow
def test_smollm2_zero_shot_replies_on_chatterbot(tmp_path):
    cfg = compose_cfg("train", FAST + ["model=smollm2", "trainer.max_steps=0", "task.module.bertscore=null"]
                      + [o for o in DIALOG_FAST if "max_steps" not in o] + ["perf=null"], tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record["error"]
    # A pretrained LM ranks the real reply above random ones far more often than chance (1/5).
    assert record["metrics"]["test/hits@1"] >= 0.25
    assert record["metrics"]["test/perplexity"] < 1000


# -- evaluation: each context encoded once ----------------------------------------------------------
def _model_and_test_batches(model_name: str, tmp_path: Path, examples: int = 6, rows: int = 60):
    """A seeded random-init model of the config's `model_name` and real chatterbot test batches (20
    candidates each), built as train.py builds them."""
    from hydra.utils import instantiate

    from squeeze import models

    cfg = compose_cfg("train", FAST + [f"model={model_name}", "task=chatterbot", f"task.data.max_examples.test={examples}",
                                       f"task.data.eval_batch_size={rows}", "+model.config.initializer_range=0.2"],
                      tmp_path)
    spec = instantiate(cfg.model, _convert_="all")
    tokenizer = spec.tokenizer()
    data = instantiate(cfg.task.data, tokenizer=tokenizer, seed=cfg.seed, _convert_="all")
    data.setup()
    torch.manual_seed(0)
    model = models.finish_model(spec.build("causal_lm"), tokenizer).eval()
    return model, tokenizer, list(data.test_dataloader())


@pytest.mark.parametrize("model_name,attention", [("tiny_gpt2", "sdpa"), ("tiny_llama", "sdpa"), ("tiny_opt", "sdpa"),
                                                  ("tiny_llama", "eager")])
def test_packed_context_scores_equal_the_full_rows(model_name, attention, tmp_path):
    from squeeze.tasks.dialog.scoring import score_candidates, scores_from_logits

    model, _, batches = _model_and_test_batches(model_name, tmp_path, examples=4, rows=40)
    model.set_attn_implementation(attention)
    module = DialogModule(model, generate_on=[], bertscore=None)
    contexts = set()
    with torch.no_grad():
        for batch in batches:
            full = model(**batch)
            old, new = scores_from_logits(full.logits, batch, 20), score_candidates(model, batch, 20)
            assert (old.scores - new.scores).abs().max() < 1e-4
            assert torch.equal(old.scores.argsort(dim=1), new.scores.argsort(dim=1))  # identical rankings
            assert old.scores.std() > 1e-2  # candidates told apart, so the rankings mean something
            assert torch.equal(old.gold_targets.sort().values, new.gold_targets.sort().values)
            assert new.loss == pytest.approx(full.loss.item(), abs=1e-4)  # the reply LM loss, as logged
            # The same metrics whichever way the scores came (update_metrics takes either).
            module.update_metrics(module.metrics["val"], batch, full)
            module.update_metrics(module.metrics["test"], batch, new)
            contexts.update(int(n) for n in batch["labels"].ne(IGNORE_INDEX).int().argmax(dim=1)[19::20])
    assert len(contexts) > 1  # contexts of different lengths in a batch: packed rows of different lengths
    old_metrics, new_metrics = (module.compute_metrics(module.metrics[s]) for s in ("val", "test"))
    assert set(old_metrics) == set(new_metrics) == {"perplexity", "hits@1", "hits@5", "hits@10"}
    for name, value in old_metrics.items():
        assert new_metrics[name].item() == pytest.approx(value.item(), rel=1e-5), name


def test_generation_is_capped_and_batched(tmp_path, monkeypatch):
    from squeeze.tasks.dialog.scoring import score_candidates

    model, tokenizer, batches = _model_and_test_batches("tiny_gpt2", tmp_path, examples=8, rows=40)  # 2 per batch
    module = DialogModule(model, generate_max_examples=5, generate_batch_size=3, bertscore=None, tokenizer=tokenizer)
    calls = []
    monkeypatch.setattr(module, "generate_replies", lambda prompts: calls.append(len(prompts)) or ["ok"] * len(prompts))
    metrics = module.metrics["test"]
    for batch in batches:
        module.update_metrics(metrics, batch, score_candidates(model, batch, 20))
    assert calls == [3]  # 5 of the 8 examples offered; one full batch of 3 so far
    module.compute_metrics(metrics)  # the epoch's end generates what is queued
    assert calls == [3, 2] and metrics["bleu"].update_count == 2
    for batch in batches[:1]:  # a new epoch starts counting afresh
        module.update_metrics(metrics, batch, score_candidates(model, batch, 20))
    module.compute_metrics(metrics)
    assert calls == [3, 2, 2]
    with pytest.raises(SqueezeError, match="generate_max_examples=-1"):
        DialogModule(model, generate_max_examples=-1, bertscore=None)


def test_bertscore_of_an_empty_reply_counts_zero_not_nan():
    from squeeze.tasks.dialog.module import bertscore_means

    means = bertscore_means({"precision": [float("nan"), 0.8], "recall": [0.0, 0.6], "f1": [0.0, 0.7]})
    assert {k: round(float(v), 4) for k, v in means.items()} == {
        "bertscore_precision": 0.4, "bertscore_recall": 0.3, "bertscore_f1": 0.35}


@pytest.mark.parametrize("smoothing", ["exp", "none"])
def test_bleu_of_short_replies_is_smoothed_unless_asked_not_to(smoothing, tmp_path, monkeypatch):
    """Replies with no 4-gram in common with the reference: plain corpus BLEU is 0 whatever words they share;
    sacreBLEU's exp smoothing, recomputed here by hand from the n-gram counts, is not."""
    from torchmetrics.functional.text import sacre_bleu_score

    from squeeze.tasks.dialog.scoring import score_candidates

    model, tokenizer, batches = _model_and_test_batches("tiny_gpt2", tmp_path, examples=4, rows=40)
    module = DialogModule(model, generate_max_examples=2, generate_batch_size=2, bertscore=None, tokenizer=tokenizer,
                          bleu_smoothing=smoothing)
    gold = batches[0]["labels"][19::20][:2]  # the gold reply is each example's last candidate
    references = [[tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True).strip()] for labels in gold]
    replies = [" ".join(ref.split()[:2] + ["zebra"]) for [ref] in references]  # words in common, no 4-gram
    monkeypatch.setattr(module, "generate_replies", lambda prompts: replies[: len(prompts)])
    metrics = module.metrics["test"]
    for batch in batches:
        module.update_metrics(metrics, batch, score_candidates(model, batch, 20))
    bleu = float(module.compute_metrics(metrics)["bleu"])
    if smoothing == "none":
        assert bleu == 0 == float(sacre_bleu_score(replies, references))
        return
    from collections import Counter
    from torchmetrics.functional.text.sacre_bleu import _SacreBLEUTokenizer

    tokenize = _SacreBLEUTokenizer("13a")
    correct, total, halvings, logs = [0] * 4, [0] * 4, 0, 0.0
    for reply, [ref] in zip(replies, references):
        r, g = tokenize(reply), tokenize(ref)
        for n in range(1, 5):
            have = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            want = Counter(tuple(g[i:i + n]) for i in range(len(g) - n + 1))
            correct[n - 1] += sum(min(c, want[k]) for k, c in have.items())
            total[n - 1] += max(len(r) - n + 1, 0)
    for n in range(4):
        halvings += correct[n] == 0
        logs += math.log(correct[n] / total[n] if correct[n] else 1 / (2 ** halvings * total[n]))
    hyp = sum(len(tokenize(r)) for r in replies)
    ref = sum(len(tokenize(g)) for [g] in references)
    assert bleu > 0
    assert bleu == pytest.approx(100 * min(1.0, math.exp(1 - ref / hyp)) * math.exp(logs / 4), rel=1e-4)
    with pytest.raises(SqueezeError, match="bleu_smoothing='add-one'"):
        DialogModule(model, bleu_smoothing="add-one", bertscore=None)


# -- Hits@k by the multiple-choice head (issue 27: the thesis ranked with the double-heads model's) ----------
def test_mc_ranking_is_the_double_heads_models_multiple_choice_score(tmp_path):
    from transformers import GPT2DoubleHeadsModel

    from squeeze.tasks.dialog.module import last_token_index

    model, _, batches = _model_and_test_batches("tiny_gpt2", tmp_path, examples=4, rows=40)
    module = DialogModule(model, generate_on=[], bertscore=None, hits_rank="mc").eval()
    torch.nn.init.normal_(module.mc_head.weight, std=1.0)  # a head that tells candidates apart
    # The reference: transformers' GPT2DoubleHeadsModel with the same body and the MC head as its summary layer.
    reference = GPT2DoubleHeadsModel(model.config).eval()
    reference.transformer.load_state_dict(model.transformer.state_dict())
    reference.multiple_choice_head.summary.load_state_dict(module.mc_head.state_dict())
    with torch.no_grad():
        for batch in batches:
            ours = module.eval_outputs(batch)
            ids, mask = batch["input_ids"].view(-1, 20, batch["input_ids"].shape[1]), batch["attention_mask"]
            theirs = reference(input_ids=ids, attention_mask=mask.view(ids.shape),
                               mc_token_ids=last_token_index(mask).view(-1, 20)).mc_logits
            assert ours.scores.shape == (ids.shape[0], 20)
            assert (ours.scores - theirs).abs().max() < 1e-4 and ours.scores.std() > 1e-2
            # perplexity stays the LM's whichever ranking: the gold replies' loss as the packed scoring gives it
            packed = DialogModule(model, generate_on=[], bertscore=None).eval_outputs(batch)
            assert ours.loss.item() == pytest.approx(packed.loss.item(), abs=1e-4)


def test_mc_ranking_needs_a_trained_head_and_a_known_name():
    model = build_tiny("tiny_gpt2", "causal_lm")[0]
    with pytest.raises(SqueezeError, match="hits_rank=mc ranks by the MC head, which mc_coef=0 never trains"):
        DialogModule(model, mc_coef=0, hits_rank="mc", bertscore=None)
    with pytest.raises(SqueezeError, match=r"hits_rank='MC' is not one of \['lm', 'mc'\]"):
        DialogModule(model, hits_rank="MC", bertscore=None)
    with pytest.raises(SqueezeError, match="needs the MC head trained with the model: a pretrained model has none"):
        DialogModule(model, hits_rank="mc", bertscore=None).load_task_head(None)


def test_mc_head_is_saved_beside_the_model_and_evaluate_ranks_with_it(tmp_path):
    overrides = FAST + ["model=tiny_gpt2", "task.module.bertscore=null", "task.module.hits_rank=mc",
                        "optimizer.lr=3e-3"] + DIALOG_FAST + ["perf=null", "task.module.generate_on=[]"]
    record = run.train(compose_cfg("train", overrides, tmp_path / "run"))
    assert record["status"] == "ok", record["error"]
    assert record["hits_rank"] == "mc" and (tmp_path / "run" / "model" / "task_head.safetensors").is_file()
    from safetensors.torch import load_file

    width = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model")).config.n_embd
    torch.nn.Linear(width, 1).load_state_dict(load_file(str(tmp_path / "run" / "model" / "task_head.safetensors")))
    # evaluate.py reads the head back: the same Hits@k; a post-training chain on it keeps the head in its save.
    again = FAST + ["task.module.bertscore=null", "task.module.hits_rank=mc", f"ckpt={tmp_path / 'run'}"] + \
        DIALOG_FAST + ["perf=null", "task.module.generate_on=[]"]
    evaluated = run.evaluate(compose_cfg("eval", again, tmp_path / "eval"))
    assert evaluated["status"] == "ok", evaluated["error"]
    for name in ("test/hits@1", "test/hits@5", "test/perplexity"):
        assert evaluated["metrics"][name] == pytest.approx(record["metrics"][name], rel=1e-4), name
    quantized = run.evaluate(compose_cfg("eval", again + ["compress=dq"], tmp_path / "dq"))
    assert quantized["status"] == "ok", quantized["error"]
    assert (tmp_path / "dq" / "model" / "task_head.safetensors").is_file()
    # Without a saved head (a pretrained model) the MC ranking is refused in one line.
    pretrained = FAST + ["model=tiny_gpt2", "task.module.bertscore=null", "task.module.hits_rank=mc"] + \
        DIALOG_FAST + ["perf=null"]
    with pytest.raises(SqueezeError, match="needs the MC head trained with the model: a pretrained model has none"):
        run.evaluate(compose_cfg("eval", pretrained, tmp_path / "zero"))
