"""The hub path, offline: every hub model × hub task it can do runs through squeeze's real loading code
(models.Pretrained, data.load_splits, dialog.DialogData) from a Hugging Face cache laid out in a tmp dir
(tests/hub_cache.py), and the model card's command runs as the CLI with the environment pointed there."""

from __future__ import annotations

import csv
import gzip
import json
import math
from pathlib import Path

import datasets
import huggingface_hub
import pytest
from hydra.utils import instantiate

from squeeze import assets, run
from squeeze.errors import SqueezeError
from squeeze.tasks.sources import load_splits

import hub_cache as fake
from conftest import compose_cfg, fast, read_result, run_cli
from hub_cache import hub_cache, offline_hub  # noqa: F401  fixtures

ENCODERS = ["bert-base-uncased", "distilbert-base-uncased"]
HUB_TASKS = ["imdb", "conll2003", "wikitext2", "wikitext103", "c4", "lambada", "personachat"]
CLASSIFICATION = ["imdb", "conll2003"]
# Every cell a hub model can do: encoders have no LM head (arch.HEADS_FOR_KIND).
CELLS = [("gpt2", task) for task in HUB_TASKS] + [(m, t) for m in ENCODERS for t in CLASSIFICATION + ["wikitext103_mlm"]]
TEST_METRICS = {
    "imdb": {"test/accuracy", "test/f1", "test/precision", "test/recall", "test/loss"},
    "conll2003": {"test/precision", "test/recall", "test/f1", "test/token_accuracy", "test/loss"},
    "lambada": {"test/loss", "test/perplexity", "test/last_word_accuracy", "test/last_word_perplexity"},
    "personachat": {"test/loss", "test/perplexity", "test/hits@1", "test/hits@5", "test/hits@10", "test/bleu",
                    "test/ter"},
}
QUIET = ["perf=null", "callbacks.energy=null", "trainer.max_steps=2", "trainer.limit_val_batches=2",
         "trainer.limit_test_batches=2"]
DIALOG = ["task.module.bertscore=null", "task.module.generate.max_new_tokens=4", "task.data.max_examples.train=16",
          "task.data.max_examples.validation=2", "task.data.max_examples.test=2", "task.data.max_length=128"]


def overrides(model: str, task: str) -> list[str]:
    return [f"model={model}", f"task={task}", *fast(task), *QUIET, *(DIALOG if task == "personachat" else [])]


# -- the cache holds the real tokenizers and the shrunk real configs --------------------------------
def test_minilm_asset_has_bert_base_uncased_vocabulary():
    vocab = (assets.locate("minilm") / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 30522
    # bert-base-uncased's ids for these tokens.
    assert {t: vocab.index(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "hello", "world",
                                        "##ing")} == {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102,
                                                      "[MASK]": 103, "the": 1996, "hello": 7592,
                                                      "world": 2088, "##ing": 2075}


@pytest.mark.parametrize("model", ["gpt2", *ENCODERS])
def test_hub_model_loads_from_the_cache_with_its_real_tokenizer_and_shrunk_config(model, offline_hub, tmp_path):
    spec = instantiate(compose_cfg("train", [f"model={model}"], tmp_path).model, _convert_="all")
    tokenizer = spec.tokenizer()
    head = "causal_lm" if model == "gpt2" else "sequence_classification"
    built = spec.build(head, None if model == "gpt2" else ["neg", "pos"])
    real = fake.MODEL_CONFIGS[model]
    assert built.config.model_type == real["model_type"] == spec.model_type()
    assert built.config.vocab_size == real["vocab_size"] == len(tokenizer)
    if model == "gpt2":
        assert (built.config.n_layer, built.config.n_embd, built.config.n_positions) == (2, 64, 1024)
        assert built.config.activation_function == "gelu_new"
        assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2 BPE
        assert tokenizer.eos_token_id == tokenizer.pad_token_id == 50256
    else:
        layers = built.config.num_hidden_layers if model.startswith("bert") else built.config.n_layers
        assert layers == 2 and built.config.max_position_embeddings == 512
        assert tokenizer("Hello World")["input_ids"] == [101, 7592, 2088, 102]  # uncased WordPiece
    # The weights are the cache's (same seed, same init), not drawn anew.
    saved = Path(huggingface_hub.snapshot_download(model))
    assert saved.is_relative_to(offline_hub / "hub") and (saved / "model.safetensors").exists()


@pytest.mark.parametrize("model", ["gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_bigger_gpt2s_are_the_same_hub_path(model, tmp_path):
    # Not in the fake cache (same family as gpt2, too big to matter here): they only compose.
    cfg = compose_cfg("train", [f"model={model}"], tmp_path).model
    assert (cfg._target_, cfg.kind, cfg.name_or_path) == ("squeeze.models.Pretrained", "decoder", model)


def test_hub_model_without_the_cache_names_the_offline_way_out(offline_hub, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    spec = instantiate(compose_cfg("train", ["model=gpt2"], tmp_path).model, _convert_="all")
    with pytest.raises(SqueezeError, match="without network use an offline model"):
        spec.tokenizer()


# -- every hub task reads the rows written, in the repository's splits ------------------------------
def _written(repo_id: str, config: str, split: str, column: str) -> list:
    for repo, name, files, _ in fake.dataset_specs():
        if (repo, name) == (repo_id, config):
            return [x for _, rows in files[split] for x in rows[column]]
    raise KeyError(repo_id)


def _loaded(task: str, tmp_path: Path) -> datasets.DatasetDict:
    d = compose_cfg("train", [f"task={task}", "model=gpt2"], tmp_path).task.data
    return load_splits(d.source, d.get("name"), None, d.splits, d.get("carve"), 42, d.get("hub_files"))


@pytest.mark.parametrize("task,repo,config,column", [
    ("imdb", "stanfordnlp/imdb", "plain_text", "text"),
    ("conll2003", "eriktks/conll2003", "conll2003", "tokens"),
    ("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
    ("wikitext103", "Salesforce/wikitext", "wikitext-103-raw-v1", "text"),
    ("lambada", "cimec/lambada", "plain_text", "text"),
])
def test_hub_dataset_reads_the_rows_written(task, repo, config, column, offline_hub, tmp_path):
    raw = _loaded(task, tmp_path)
    assert list(raw["test"][column]) == _written(repo, config, "test", column)
    if task == "imdb":  # no validation on the hub: carved from train; `unsupervised` (label -1) unused
        carved = list(raw["train"][column]) + list(raw["validation"][column])
        assert sorted(carved) == sorted(_written(repo, config, "train", column))
        assert len(raw["validation"]) == 4 and set(list(raw["train"]["label"])) == {0, 1}
    else:
        assert list(raw["train"][column]) == _written(repo, config, "train", column)  # 103: both shards, in order
        assert list(raw["validation"][column]) == _written(repo, config, "validation", column)
    if task == "conll2003":  # NER tags as the hub's ints, the config's label order
        assert raw["train"].features["ner_tags"].feature.names == list(
            compose_cfg("train", ["task=conll2003"], tmp_path).task.data.labels)
        assert list(raw["train"]["ner_tags"])[0] == [1, 0, 5, 0, 3, 0, 0, 0]


def test_c4_reads_validation_shard_1_to_train_and_0_to_test(offline_hub, tmp_path):
    raw = _loaded("c4", tmp_path)
    shards = {}
    for shard in (0, 1):
        name = offline_hub / "hub" / "datasets--allenai--c4" / "snapshots" / fake.commit("allenai/c4") / "en" / \
            f"c4-validation.{shard:05d}-of-00008.json.gz"
        shards[shard] = [json.loads(line)["text"] for line in gzip.open(name, "rt")]
    assert list(raw["test"]["text"]) == shards[0]
    assert sorted(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == sorted(shards[1])
    assert 1 <= len(raw["validation"]) < len(raw["train"])


def test_hub_data_missing_from_the_cache_is_a_squeeze_error(offline_hub):
    with pytest.raises(SqueezeError, match="could not load dataset 'allenai/c4'"):  # a shard never fetched
        load_splits("allenai/c4", hub_files={"train": "en/c4-validation.00007-of-00008.json.gz"})
    with pytest.raises(SqueezeError, match="could not load dataset 'stanfordnlp/sst2'"):
        load_splits("stanfordnlp/sst2")


def test_personachat_reads_the_conversations_written(offline_hub, tmp_path):
    cfg = compose_cfg("train", ["task=personachat", "model=gpt2"], tmp_path)
    data = instantiate(cfg.task.data, tokenizer=None, seed=cfg.seed, _convert_="all")
    conversations = data.conversations()
    written = fake.persona_rows("validation", 6)
    assert [c["personality"] for c in conversations["test"]] == written["personality"]  # hub validation = test
    assert conversations["test"][0]["utterances"] == written["utterances"][0]
    train = fake.persona_rows("train", 20)["personality"]
    assert sorted(c["personality"][0] for c in conversations["train"] + conversations["validation"]) == \
        sorted(p[0] for p in train)


# -- every hub model × hub task it can do runs through the real code --------------------------------
@pytest.mark.parametrize("model,task", CELLS, ids=[f"{m}-{t}" for m, t in CELLS])
def test_hub_cell_runs_offline(model, task, offline_hub, tmp_path):
    cfg = compose_cfg("train", overrides(model, task), tmp_path)
    record = run.train(cfg)
    assert record["status"] == "ok", record["error"]
    saved = read_result(tmp_path)
    assert saved["status"] == "ok" and saved["choices"]["model"] == model and saved["choices"]["task"] == task
    wanted = TEST_METRICS.get(task, {"test/perplexity", "test/loss"})
    assert wanted <= set(saved["metrics"]) and all(math.isfinite(saved["metrics"][k]) for k in wanted)
    steps = [r for r in csv.DictReader(open(tmp_path / "csv" / "metrics.csv")) if r.get("train/loss")]
    assert len(steps) == 2 and all(math.isfinite(float(r["train/loss"])) for r in steps)
    if task in ("wikitext2", "wikitext103", "c4", "lambada", "wikitext103_mlm"):
        assert saved["perplexity"]["scored_tokens"] > 0
    # The deliverable is the hub model: its real config, shrunk, with the hub tokenizer.
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == fake.MODEL_CONFIGS[model]["model_type"]
    assert config["vocab_size"] == fake.MODEL_CONFIGS[model]["vocab_size"]
    assert config.get("n_layer", config.get("num_hidden_layers", config.get("n_layers"))) == 2


def test_hub_model_on_an_lm_task_still_refused_for_an_encoder(offline_hub, tmp_path):
    with pytest.raises(SqueezeError, match="decoder"):
        run.train(compose_cfg("train", overrides("bert-base-uncased", "wikitext2"), tmp_path))


# -- the card's command, as the CLI ------------------------------------------------------------------
def test_card_command_runs_offline_from_the_hub_cache(hub_cache, tmp_path):  # noqa: F811
    steps = ["trainer.max_steps=2", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]
    done = run_cli("train.py", ["compress=imp", "model=gpt2", *steps], cwd=tmp_path, timeout=300,
                   env={**fake.environment(hub_cache), "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    [result] = (tmp_path / "outputs" / "gpt2" / "rotten_tomatoes").glob("*/result.json")
    record = json.loads(result.read_text())
    assert record["status"] == "ok" and record["choices"]["compress"] == "imp"
    assert {"test/accuracy", "test/f1"} <= set(record["metrics"])
    assert json.loads((result.parent / "model" / "config.json").read_text())["n_layer"] == 2
