"""Multiple choice (squeeze/tasks/choice.py) and few-shot prompts (squeeze/tasks/prompts.py, LAMBADA's too):
endings scored by their summed log-likelihood as lm-evaluation-harness scores them, checked by hand on a bigram
over characters and against a plain forward per (context, ending) on tiny GPT-2 and Llama; demonstrations drawn,
dropped and recorded; HellaSwag and StoryCloze end to end from local files; each bad input named."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import datasets
import pytest
import torch

from squeeze import run
from squeeze.errors import SqueezeError
from squeeze.tasks.base import IGNORE_INDEX
from squeeze.tasks.choice import MultipleChoiceData, MultipleChoiceLM, ending_log_likelihoods
from squeeze.tasks.lm import LastWordData

from conftest import build_tiny, compose_cfg, fast, read_result, tiny_tokenizer

# test_lambada's character "tokenizer" (4 is end-of-text and padding) and the bigram table P[prev][next] it scores with.
from test_lambada import CHARS, EOS, P, CharTokenizer  # noqa: E402


class Bigram(torch.nn.Module):
    config = SimpleNamespace(n_positions=64)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return SimpleNamespace(logits=P.log()[input_ids], loss=torch.tensor(0.0))


ITEMS = [
    {"ctx": "A man is sitting on a roof. He", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."]},
    {"ctx": "A woman is outside with a bucket and a dog. The dog is running around trying to avoid a bath. She",
     "endings": ["rinses the bucket off with soap and blow dry the dog's head.", "uses a hose to keep it from getting soapy.",
                 "gets the dog wet, then it runs away again.", "gets into a bath tub with the dog."], "label": 2},
    {"ctx": "A boy is running down a track. The boy", "label": 2,
     "endings": ["runs into a car.", "gets in a mat.", "lifts his body above the height of a pole.",
                 "stands on his hands and springs."]},
    {"ctx": "The people are in a kitchen making cookies. They", "label": 0,
     "endings": ["put the dough on a tray.", "eat a car.", "fly away.", "paint the wall blue and then sing a song."]},
]
POOL = [{"ctx": f"Story {n}: the {animal} walked to the", "endings": ["river.", "moon."], "label": 0}
        for n, animal in enumerate(["cat", "dog", "fox", "owl", "bee", "elk"])]
STORIES = [
    ("Karen was assigned a roommate her first year of college.", "Her roommate asked her to go to a concert.",
     "Karen agreed happily.", "The show was absolutely exhilarating.", "Karen became good friends with her roommate.",
     "Karen hated her roommate.", 1),
    ("Jim got his first credit card in college.", "He didn't have a job so he bought everything on his card.",
     "After he graduated he had a large debt.", "Jim realized that he was foolish.", "Jim devised a plan to repay it.",
     "Jim decided to open another credit card.", 1),
    ("Gina misplaced her phone at her grandparents.", "It wasn't anywhere in the living room.",
     "She realized she was in the car before.", "She grabbed her dad's keys and ran outside.",
     "She didn't want her phone anymore.", "She found her phone in the car.", 2),
    ("Bob loved to cook.", "He bought a new pan.", "He made eggs for breakfast.", "The eggs were delicious.",
     "Bob threw the pan away.", "Bob cooked eggs again the next day.", 2),
]
STORY_COLUMNS = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                 "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _stories_csv(path, rows=STORIES):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(STORY_COLUMNS)
        writer.writerows([f"story{i}", *row] for i, row in enumerate(rows))
    return str(path)


def _has(record: dict, **entries) -> bool:
    return record.items() >= entries.items()


def m_ok(value: float, examples: int) -> bool:
    """A fraction of `examples` examples."""
    return 0 <= value <= 1 and value * examples == round(value * examples)


def _gpt2():
    return tiny_tokenizer("tiny_gpt2")


# -- scoring ---------------------------------------------------------------------------------------
def test_accuracy_and_accuracy_norm_match_hand_computation():
    # Example 1, context "c", right ending 1; each ending's tokens follow the delimiter " ":
    #   "b":     " "|c .1, b|" " .1                                 -> ln .01    = -4.61  (-4.61 per character)
    #   "ca ca": " "|c .1, c|" " .5, a|c .5, " "|a .6, c|" " .5, a|c .5 -> ln .00375  = -5.59  (-1.12 per character)
    # acc picks the short wrong ending, acc_norm the long right one. Example 2, context "a", right ending 1:
    #   "b": " "|a .6, b|" " .1 -> ln .06;  "c": " "|a .6, c|" " .5 -> ln .3: both pick it.
    rows = datasets.Dataset.from_list([{"ctx": "c", "endings": ["b", "ca ca"], "label": 1},
                                       {"ctx": "a", "endings": ["b", "c"], "label": 1}])
    data = MultipleChoiceData(CharTokenizer(), source="json")
    batch = data.collate(data.encode(rows, "test"))
    assert batch["choice_example"].tolist() == [0, 0, 1, 1] and batch["choice_gold"].tolist() == [0, 1, 0, 1]
    assert batch["ending_chars"].tolist() == [1, 5, 1, 1]
    # The model's own loss is the right endings' tokens only.
    assert [row[row != IGNORE_INDEX].tolist() for row in batch["labels"]] == [[], [0, 3, 1, 0, 3, 1], [], [0, 3]]
    module = MultipleChoiceLM(Bigram())
    outputs = module(batch)  # the forward pass drops the scoring keys
    expected = [math.log(.01), math.log(.00375), math.log(.06), math.log(.3)]
    assert ending_log_likelihoods(outputs.logits, batch).tolist() == pytest.approx(expected, rel=1e-5)
    module.update_metrics(module.metrics["test"], batch, outputs)
    out = module.compute_metrics(module.metrics["test"])
    assert out["accuracy"].item() == pytest.approx(0.5) and out["accuracy_norm"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_batched_padded_scores_equal_a_plain_forward_per_pair(family):
    model, tokenizer = build_tiny(family, "causal_lm")
    data = MultipleChoiceData(tokenizer, source="json")
    batch = data.collate(data.encode(datasets.Dataset.from_list(ITEMS), "test"))
    assert batch["input_ids"].shape[0] == 16 and (batch["attention_mask"] == 0).any()  # rows of unequal length
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    batched = ending_log_likelihoods(logits, batch)
    plain = []
    for item in ITEMS:
        context = tokenizer(item["ctx"], add_special_tokens=False)["input_ids"]
        for ending in item["endings"]:
            whole = tokenizer(item["ctx"] + " " + ending, add_special_tokens=False)["input_ids"]
            ids = context + whole[len(context):]  # the ending's tokens: the whole text's beyond the context's
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            plain.append(sum(logprobs[t - 1, ids[t]].item() for t in range(len(context), len(ids))))
    assert batched.tolist() == pytest.approx(plain, abs=1e-4)


def test_training_rows_are_solved_examples_every_token_scored():
    tokenizer = _gpt2()
    data = MultipleChoiceData(tokenizer, source="json")
    train = data.encode(datasets.Dataset.from_list(ITEMS[:2]), "train")
    for item, row in zip(ITEMS[:2], train):
        assert tokenizer.decode(row["input_ids"]) == item["ctx"] + " " + item["endings"][item["label"]]
        assert row["labels"] == row["input_ids"]
    batch = data.collate(train)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # model inputs only: any compressor reads them


# -- end to end ------------------------------------------------------------------------------------
def test_evaluate_scores_a_local_hellaswag_jsonl(tmp_path):
    file = _jsonl(tmp_path / "items.jsonl", ITEMS)
    cfg = compose_cfg("eval", ["model=tiny_gpt2", "task=hellaswag", *fast("hellaswag"), "perf=null",
                               "callbacks.energy=null", f"task.data.data_files={file}"], tmp_path / "run")
    run.evaluate(cfg)
    record = read_result(tmp_path / "run")
    assert record["status"] == "ok", record["error"]
    m = record["metrics"]
    assert set(m) == {"test/accuracy", "test/accuracy_norm", "test/loss"} and math.isfinite(m["test/loss"])
    assert m_ok(m["test/accuracy"], 4) and m_ok(m["test/accuracy_norm"], 4)
    choice = record["perplexity"]["multiple_choice"]
    assert (choice["examples"], choice["endings"], choice["shots"], choice["truncated"]) == (4, 16, 0, 0)
    assert choice["max_length"] == 512  # tiny_gpt2's context
    assert record["cost"]["inference"]["unit"] == "examples" and record["cost"]["inference"]["count"] == 4


def test_train_then_score_storycloze_csvs_with_one_shot(tmp_path):
    train = _stories_csv(tmp_path / "val.csv", STORIES * 3)  # the 2016 val CSV: demonstrations and training
    test = _stories_csv(tmp_path / "test.csv")
    cfg = compose_cfg("train", ["model=tiny_llama", "task=storycloze", *fast("storycloze"), "perf=null",
                                "callbacks.energy=null", "trainer.max_steps=2", "task.data.shots=1",
                                f"task.data.data_files={{train: {train}, test: {test}}}"], tmp_path)
    run.train(cfg)
    record = read_result(tmp_path)
    assert record["status"] == "ok", record["error"]
    assert record["validation"]["monitor"] == "val/accuracy" and record["train_tokens"] > 0
    assert m_ok(record["metrics"]["test/accuracy"], 4) and m_ok(record["metrics"]["test/accuracy_norm"], 4)
    choice = record["perplexity"]["multiple_choice"]
    assert (choice["examples"], choice["endings"], choice["shots"], choice["shots_from"]) == (4, 8, 1, "train")


# -- shots -----------------------------------------------------------------------------------------
def _shot_data(tmp_path, seed=0, shots=2, **kwargs):
    files = {"train": _jsonl(tmp_path / "train.jsonl", POOL), "validation": _jsonl(tmp_path / "val.jsonl", ITEMS[:1]),
             "test": _jsonl(tmp_path / "test.jsonl", ITEMS)}
    data = MultipleChoiceData(_gpt2(), source="json", data_files=files, shots=shots, seed=seed, **kwargs)
    data.setup("fit")
    return data


def _solved(item):
    return item["ctx"] + " " + item["endings"][item["label"]]


def test_the_prompt_holds_exactly_k_demonstrations_from_train_never_the_item(tmp_path):
    data = _shot_data(tmp_path, seed=3)
    tokenizer = data.tokenizer
    for item, example in zip(ITEMS, data.datasets["test"]):
        shown = [_solved(POOL[j]) for j in example["demonstrations"]]
        assert len(shown) == 2 and len(set(shown)) == 2 and _solved(item) not in shown
        assert tokenizer.decode(example["prompt"]) == "\n\n".join([*shown, item["ctx"]])
        for ending, ids in zip(item["endings"], example["endings"]):  # the endings as zero-shot
            assert tokenizer.decode(ids) == " " + ending
    assert _has(data.protocol_record["multiple_choice"], shots=2, shots_from="train", fewer_shots=0)
    same = _shot_data(tmp_path, seed=3)
    other = _shot_data(tmp_path, seed=4)
    drawn = [x["demonstrations"] for x in data.datasets["test"]]
    assert [x["demonstrations"] for x in same.datasets["test"]] == drawn  # deterministic for a seed
    assert [x["demonstrations"] for x in other.datasets["test"]] != drawn


def test_one_file_draws_from_itself_leaving_the_item_out(tmp_path):
    file = _jsonl(tmp_path / "items.jsonl", ITEMS)
    data = MultipleChoiceData(_gpt2(), source="json", data_files=file, shots=3)
    data.setup("test")  # evaluate.py scoring one file: nothing else is loaded
    for i, example in enumerate(data.datasets["test"]):
        assert sorted(example["demonstrations"]) == [j for j in range(4) if j != i]
    assert data.protocol_record["multiple_choice"]["shots_from"] == "test"


def test_too_long_prompts_lose_demonstrations_first_then_context_from_the_left(tmp_path):
    tokenizer = _gpt2()
    full = _shot_data(tmp_path, seed=1, max_length=None).datasets["validation"][0]  # ITEMS[0], two demonstrations
    longest = max(len(e) for e in full["endings"])
    context = tokenizer(ITEMS[0]["ctx"], add_special_tokens=False)["input_ids"]

    one = _shot_data(tmp_path, seed=1, max_length=len(full["prompt"]) + longest - 1)
    example = one.datasets["validation"][0]
    assert example["demonstrations"] == full["demonstrations"][1:]  # the farthest went first
    assert tokenizer.decode(example["prompt"]) == _solved(POOL[full["demonstrations"][1]]) + "\n\n" + ITEMS[0]["ctx"]
    assert _has(one.choices["validation"], fewer_shots=1, truncated=0)

    cut = _shot_data(tmp_path, seed=1, max_length=len(context) + longest - 2)
    example = cut.datasets["validation"][0]
    assert example["demonstrations"] == [] and example["prompt"] == context[2:]  # context cut from the left
    assert example["endings"] == full["endings"]  # endings are never cut
    assert _has(cut.choices["validation"], fewer_shots=1, truncated=1)


PASSAGES = [
    "the old man walked down to the harbour every morning to watch the boats come in , and the boats",
    "she opened the letter slowly , read it twice , and then handed it to her sister",
    "when the rain stopped they went out into the garden and found the little dog asleep under the tree",
    "he had promised to bring the book back by friday , so on friday he brought the book",
]


def test_lambada_one_shot_prompts_score_only_the_passage(tmp_path):
    file = _jsonl(tmp_path / "passages.jsonl", [{"text": t} for t in PASSAGES])
    tokenizer = _gpt2()
    zero = LastWordData(tokenizer, source="json", data_files=file, max_length=512)
    zero.setup("test")
    one = LastWordData(tokenizer, source="json", data_files=file, max_length=512, shots=1, seed=5)
    one.setup("test")
    assert _has(one.passages["test"], shots=1, shots_from="test", fewer_shots=0, truncated=0)
    for passage, plain, shot in zip(PASSAGES, zero.datasets["test"], one.datasets["test"]):
        text = tokenizer.decode(shot["input_ids"])
        demonstration, separator, rest = text.partition("\n\n")
        assert separator and rest == passage and demonstration in PASSAGES and demonstration != passage
        own = len(plain["input_ids"])  # the passage's tokens, as zero-shot; the demonstration is context only
        assert shot["input_ids"][-own:] == plain["input_ids"] and shot["target_mask"][-own:] == plain["target_mask"]
        assert set(shot["labels"][:-own]) == {IGNORE_INDEX} and shot["labels"][-own:] == plain["labels"]
    assert one.scored_tokens["test"] == zero.scored_tokens["test"] + len(PASSAGES)  # the first token has context now


def test_evaluate_lambada_with_one_shot_on_a_local_file(tmp_path):
    file = _jsonl(tmp_path / "passages.jsonl", [{"text": t} for t in PASSAGES])
    cfg = compose_cfg("eval", ["model=tiny_gpt2", "task=lambada", *fast("lambada"), "perf=null",
                               "callbacks.energy=null", "task.data.shots=1", f"task.data.data_files={file}"],
                      tmp_path / "run")
    run.evaluate(cfg)
    record = read_result(tmp_path / "run")
    assert record["status"] == "ok", record["error"]
    assert m_ok(record["metrics"]["test/last_word_accuracy"], 4)
    words = record["perplexity"]["last_word"]
    assert (words["passages"], words["shots"], words["shots_from"], words["fewer_shots"]) == (4, 1, "test", 0)


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, settings, message", [
    ([{"context": "a", "endings": ["b", "c"], "answer": 0}], {},
     r"no column 'ctx' \(task.data.context_columns\), 'label' \(task.data.label_column\)"),
    ([{"ctx": "a", "endings": ["b", "c"], "label": 2}], {}, r"label 2 is out of range for its 2 endings"),
    ([{"ctx": "a", "endings": ["b", "c"], "label": 0}], {"label_base": 1}, r"labels run 1\.\.2"),
    ([{"ctx": "a", "endings": ["b", "c"], "label": ""}], {}, r"not an ending's number"),
    ([{"ctx": "a", "endings": ["b"], "label": 0}], {}, r"1 ending\(s\); multiple choice needs at least 2"),
    ([{"ctx": "a", "endings": ["b", "c"], "label": 0}] * 2, {"shots": 3}, r"task.data.shots=3 is more than the 2"),
    ([{"ctx": "a", "endings": ["b", "c"], "label": 0}, {"ctx": "c", "endings": ["b", "c"], "label": 0}],
     {"shots": 2}, r"more than the 1 solved examples .* left once the scored example is left out"),
])
def test_bad_multiple_choice_input_is_named(tmp_path, rows, settings, message):
    file = _jsonl(tmp_path / "items.jsonl", rows)
    data = MultipleChoiceData(CharTokenizer(), source="json", data_files=file, **settings)
    with pytest.raises(SqueezeError, match=message):
        data.setup("test")


def test_bad_shots_and_missing_files_are_refused_before_loading(tmp_path):
    for shots in (-1, 1.5, True):
        with pytest.raises(SqueezeError, match="task.data.shots=.* must be a whole number"):
            MultipleChoiceData(CharTokenizer(), source="json", shots=shots)
    with pytest.raises(SqueezeError, match="task.data.shots=2 is more than the 1 solved examples"):
        data = LastWordData(CharTokenizer(), source="json", shots=2,
                            data_files=_jsonl(tmp_path / "p.jsonl", [{"text": "ab ca"}, {"text": "b cab"}]))
        data.setup("test")
    cfg = compose_cfg("eval", ["model=tiny_gpt2", "task=storycloze", *fast("storycloze")], tmp_path / "run")
    with pytest.raises(SqueezeError, match=r"manual download .*set task.data.data_files"):
        run.evaluate(cfg)
    assert read_result(tmp_path / "run")["status"] == "failed"
