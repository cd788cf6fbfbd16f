"""A Hugging Face hub cache in a tmp dir, laid out as `from_pretrained` and `load_dataset` read it offline
(HF_HUB_OFFLINE=1, HF_HOME pointed at it), so the hub models and tasks run through squeeze's real code.

Layout (HF_HOME = the root):
  hub/models--gpt2/{refs/main, snapshots/<commit>/{config.json, model.safetensors, tokenizer...}}
  hub/datasets--allenai--c4/{refs/main, snapshots/<commit>/en/c4-validation.0000{0,1}-of-00008.json.gz}
  hub/datasets--<org>--<name>/snapshots/<commit>/...      the repository's files (README.md, parquet)
  datasets/<org>___<name>/<config>/0.0.0/<commit>/{dataset_info.json, <name>-<split>.arrow}

Why both: offline, `datasets.load_dataset("org/name")` never reads the hub snapshot; it raises on the
first hub call and falls back to its own prepared-dataset cache (datasets/load.py,
CachedDatasetModuleFactory), which an online load leaves at datasets/<org>___<name>/<config>/0.0.0/<commit>.
That is what is written here, by the packaged builder an online load picks (parquet) run over the repo's
files. Files fetched by name (C4's `hub_files`) come through the hub cache, as `from_pretrained` does.

Models: the REAL configs of gpt2, bert-base-uncased and distilbert-base-uncased (every field as on the
hub) shrunk to 2 layers, 64 wide, 4 heads so the tests are fast; random init; the real tokenizers
(GPT-2 BPE from the gpt2_tokenizer asset; bert-base-uncased's WordPiece vocabulary, which the minilm
asset ships). Nothing here downloads.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
import transformers
from datasets.packaged_modules.parquet.parquet import Parquet

from squeeze import assets

# The fields of the hub's config.json of each model, but for the sizes: shrunk to 2 layers, 64 wide, 4 heads
# (the hub's gpt2, bert-base-uncased: 12 layers, 768 wide, 12 heads; distilbert: 6 layers) so tests are fast.
MODEL_CONFIGS = {
    "gpt2": {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_positions": 1024,
        "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257,
        "n_embd": 64, "n_head": 4, "n_layer": 2,  # shrunk (768, 12, 12)
    },
    "bert-base-uncased": {
        "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512, "model_type": "bert", "pad_token_id": 0,
        "position_embedding_type": "absolute", "type_vocab_size": 2, "use_cache": True, "vocab_size": 30522,
        "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2,  # shrunk
    },
    "distilbert-base-uncased": {
        "activation": "gelu", "architectures": ["DistilBertForMaskedLM"], "attention_dropout": 0.1,
        "dropout": 0.1, "initializer_range": 0.02, "max_position_embeddings": 512, "model_type": "distilbert",
        "pad_token_id": 0, "qa_dropout": 0.1, "seq_classif_dropout": 0.2, "sinusoidal_pos_embds": False,
        "tie_weights_": True, "vocab_size": 30522,
        "dim": 64, "hidden_dim": 256, "n_heads": 4, "n_layers": 2,  # shrunk (768, 3072, 12, 6)
    },
}
# The classes whose weights the hub checkpoints hold (bert-base-uncased's: pre-training heads, pooler included).
HEAD_CLASSES = {"gpt2": transformers.GPT2LMHeadModel, "bert": transformers.BertForPreTraining,
                "distilbert": transformers.DistilBertForMaskedLM}

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def commit(repo_id: str) -> str:
    """A fixed 40-hex commit per repository (the hub's are sha1s too)."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def snapshot(root: Path, kind: str, repo_id: str) -> Path:
    """hub/<kind>s--org--name/snapshots/<commit>, with refs/main naming the commit."""
    repo = root / "hub" / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit(repo_id))
    path = repo / "snapshots" / commit(repo_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- models -----------------------------------------------------------------------------------------
def hub_tokenizer(model_id: str):
    if model_id == "gpt2":
        return transformers.AutoTokenizer.from_pretrained(str(assets.locate("gpt2_tokenizer")))
    # bert-base-uncased's tokenizer_config: lower-casing WordPiece, 512 positions; minilm's vocab.txt is its vocabulary.
    cls = transformers.DistilBertTokenizerFast if model_id.startswith("distil") else transformers.BertTokenizerFast
    return cls(vocab=str(assets.locate("minilm") / "vocab.txt"), do_lower_case=True, model_max_length=512)


def write_model(root: Path, model_id: str) -> Path:
    path = snapshot(root, "model", model_id)
    settings = dict(MODEL_CONFIGS[model_id])
    model_type = settings.pop("model_type")
    torch.manual_seed(0)
    model = HEAD_CLASSES[model_type](transformers.AutoConfig.for_model(model_type, **settings))
    model.save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**saved, "architectures": settings["architectures"]}, indent=2))
    hub_tokenizer(model_id).save_pretrained(path)
    return path


# -- datasets ---------------------------------------------------------------------------------------
def _sentence(split: str, i: int) -> str:
    words = ["the", "river", "city", "music", "night", "garden", "station", "letter", "winter", "game"]
    return " ".join(words[(i * 3 + k) % len(words)] for k in range(12)) + f" ({split} line {i})."


def imdb_rows(split: str, n: int) -> dict:
    good = "a wonderful, moving film with a superb cast"
    bad = "a dull, clumsy film that wastes its cast"
    label = [i % 2 for i in range(n)] if split != "unsupervised" else [-1] * n
    return {"text": [f"IMDB {split} review {i}: {good if y == 1 else bad}." for i, y in enumerate(label)],
            "label": label}


def conll_rows(split: str, n: int) -> dict:
    people, places = ["Smith", "Mueller", "Rossi"], ["Germany", "Brussels", "Japan"]
    tokens, tags = [], []
    for i in range(n):
        tokens.append([people[i % 3], "visited", places[i % 3], "for", "EU", "talks", f"{split}{i}", "."])
        tags.append([1, 0, 5, 0, 3, 0, 0, 0])  # B-PER O B-LOC O B-ORG O O O
    return {"id": [str(i) for i in range(n)], "tokens": tokens,
            "pos_tags": [[22] * len(t) for t in tokens], "chunk_tags": [[11] * len(t) for t in tokens],
            "ner_tags": tags}


def wikitext_rows(config: str, split: str, n: int) -> dict:
    # The raw configs' rows: blank lines, " = Heading = \n" and paragraph lines, each ending in "\n".
    lines = ["", f" = {config} {split} article = \n", ""]
    lines += [f" {_sentence(split, i)} \n" for i in range(n)]
    return {"text": lines}


def lambada_rows(split: str, n: int) -> dict:
    return {"text": [f"lambada {split} passage {i} : {_sentence(split, i)} she said to her brother"
                     for i in range(n)],
            "domain": ["Romance" if split == "train" else None for _ in range(n)]}


def c4_lines(shard: int, n: int) -> list[dict]:
    return [{"text": f"C4 shard {shard} document {i}. {_sentence(f'c4-{shard}', i)}",
             "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{shard}/{i}"} for i in range(n)]


def persona_rows(split: str, n: int, candidates: int = 20, turns: int = 3) -> dict:
    personality, utterances = [], []
    for c in range(n):
        personality.append([f"i like {split} hobby {c}.", "i have two dogs.", "i live by the sea."])
        history, conversation = [], []
        for t in range(turns):
            history = history + [f"hello from {split} conversation {c} turn {t}?"]
            gold = f"i am the reply of {split} conversation {c} turn {t}."
            distractors = [f"distractor {k} of {split} {c}-{t}." for k in range(candidates - 1)]
            conversation.append({"candidates": distractors + [gold], "history": list(history)})
            history = history + [gold]
        utterances.append(conversation)
    return {"personality": personality, "utterances": utterances}


IMDB_FEATURES = datasets.Features({"text": datasets.Value("string"),
                                   "label": datasets.ClassLabel(names=["neg", "pos"])})
CONLL_FEATURES = datasets.Features({
    "id": datasets.Value("string"), "tokens": datasets.Sequence(datasets.Value("string")),
    "pos_tags": datasets.Sequence(datasets.Value("int32")),  # ClassLabels on the hub (47 / 23 names); unused
    "chunk_tags": datasets.Sequence(datasets.Value("int32")),
    "ner_tags": datasets.Sequence(datasets.ClassLabel(names=NER_LABELS)),
})

# repo id, config, {split: (repo file, rows)}, features (None: inferred, as the hub's parquet schema)
SIZES = {"train": 40, "validation": 12, "test": 16}


def dataset_specs() -> list[tuple[str, str, dict, datasets.Features | None]]:
    def wiki(config: str, train_shards: int = 1) -> dict:
        files = {}
        for split in ("train", "validation", "test"):
            shards = train_shards if split == "train" else 1
            lines = wikitext_rows(config, split, SIZES[split])["text"]
            cuts = [k * len(lines) // shards for k in range(shards + 1)]  # contiguous shards, as on the hub
            files[split] = [(f"{config}/{split}-{k:05d}-of-{shards:05d}.parquet", {"text": lines[cuts[k]:cuts[k + 1]]})
                            for k in range(shards)]
        return files

    return [
        ("stanfordnlp/imdb", "plain_text",
         {split: [(f"plain_text/{split}-00000-of-00001.parquet", imdb_rows(split, n))]
          for split, n in (("train", 40), ("test", 16), ("unsupervised", 4))}, IMDB_FEATURES),
        # main holds a loading script (which datasets >= 4 refuses); the hub's parquet export is what loads.
        ("eriktks/conll2003", "conll2003",
         {split: [(f"conll2003/{split}/0000.parquet", conll_rows(split, SIZES[split]))]
          for split in ("train", "validation", "test")}, CONLL_FEATURES),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", wiki("wikitext-2-raw-v1"), None),
        ("Salesforce/wikitext", "wikitext-103-raw-v1", wiki("wikitext-103-raw-v1", train_shards=2), None),
        ("cimec/lambada", "plain_text",
         {split: [(f"plain_text/{split}-00000-of-00001.parquet", lambada_rows(split, SIZES[split]))]
          for split in ("train", "validation", "test")}, None),
        ("AlekseyKorshuk/persona-chat", "default",
         {split: [(f"data/{split}-00000-of-00001.parquet", persona_rows(split, n))]
          for split, n in (("train", 20), ("validation", 6))}, None),
    ]


def write_dataset(root: Path, repo_id: str, config: str, files: dict, features) -> Path:
    """The repository's files in the hub snapshot, and the prepared cache an online load leaves."""
    repo = snapshot(root, "dataset", repo_id)
    paths = {}
    for split, shards in files.items():
        for name, rows in shards:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(rows, features=features).to_parquet(str(repo / name))
            paths.setdefault(split, []).append(str(repo / name))
    card = repo / "README.md"
    card_configs = card.read_text().split("---")[1] if card.exists() else "configs:\n"
    card_configs += f"- config_name: {config}\n  data_files:\n" + "".join(
        f"  - split: {split}\n    path:\n" + "".join(f"    - {name}\n" for name, _ in shards)
        for split, shards in files.items())
    card.write_text(f"---\n{card_configs}---\n")
    out = root / "datasets" / f"{repo_id.replace('/', '___')}" / config / "0.0.0" / commit(repo_id)
    builder = Parquet(cache_dir=str(root / "datasets" / "_build"), dataset_name=repo_id.split("/")[-1],
                      config_name=config, data_files=paths, features=features, hash=commit(repo_id))
    builder.download_and_prepare(output_dir=str(out))
    return out


def write_c4(root: Path, n: int = 30) -> Path:
    repo = snapshot(root, "dataset", "allenai/c4")
    # Only the two validation shards the task names: what fetching them by name leaves in the cache.
    for shard in (0, 1):
        path = repo / "en" / f"c4-validation.{shard:05d}-of-00008.json.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in c4_lines(shard, n))
    return repo


def build(root: Path) -> Path:
    for model_id in MODEL_CONFIGS:
        write_model(root, model_id)
    for spec in dataset_specs():
        write_dataset(root, *spec)
    write_c4(root)
    return root


def environment(root: Path) -> dict[str, str]:
    """What a user sets to run from this cache without network."""
    return {"HF_HOME": str(root), "HF_HUB_CACHE": str(root / "hub"), "HF_DATASETS_CACHE": str(root / "datasets"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """HF_HOME of a fake hub cache holding the hub models and a few rows of every hub dataset."""
    return build(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
    """This process reads only the fake hub cache, offline. The libraries read HF_* at import, so their
    constants are set too; subprocesses get `environment(hub_cache)`."""
    for key, value in environment(hub_cache).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(hub_cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub_cache / "datasets")
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", hub_cache / "datasets" / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", hub_cache / "datasets" / "downloads" / "extracted")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    return hub_cache
