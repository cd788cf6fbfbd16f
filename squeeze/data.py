"""Data modules, one per task kind: sequence classification, token classification, language modelling
(and LAMBADA's last-word passages).

Each loads its splits with `datasets` — from the hub (`source: imdb`), from local files through a
generic builder (`source: csv|json|text` + `data_files`), or from a CoNLL file (`source: conll`) —
tokenizes with the model's tokenizer and batches. Data modules know tokenizers, never models: the
run hands them a model only to check that inputs fit its context.
"""

from __future__ import annotations

import functools
import itertools
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import huggingface_hub
import lightning as L
import torch
from torch.utils.data import DataLoader

from squeeze import assets
from squeeze.arch.tokenizers import words_as_in_text
from squeeze.errors import SqueezeError
from squeeze.metrics import IGNORE_INDEX, PROTOCOLS, align_labels, encode_last_word, perplexity_windows
from squeeze.models import max_positions
from squeeze.resume import resumable

log = logging.getLogger("squeeze")
SPLITS = ("train", "validation", "test")
LOCAL_BUILDERS = ("csv", "json", "text", "parquet", "conll")


def resolve_data_files(data_files: Any, asset: str | None) -> dict[str, list[str]] | None:
    """Normalise `data_files` to {split: [absolute paths]}; relative paths are taken inside the
    offline asset's directory when the task names one. Every file must exist."""
    if data_files is None:
        return None
    if isinstance(data_files, (str, Path)) or _is_list(data_files):
        data_files = {"train": data_files}
    base = assets.locate(asset) if asset else Path.cwd()
    resolved = {}
    for split, files in dict(data_files).items():
        files = [files] if isinstance(files, (str, Path)) else list(files)
        paths = []
        for f in files:
            path = Path(str(f)).expanduser()
            if not path.is_absolute():
                # Inside the task's asset first (its own files); a user's file relative to where they are.
                path = base / path if (base / path).exists() or not (Path.cwd() / path).exists() else Path.cwd() / path
            if not path.exists():
                raise SqueezeError(
                    f"data file {path} (split {split!r}) does not exist; fix task.data.data_files"
                )
            paths.append(str(path))
        resolved[str(split)] = paths
    return resolved


def _is_mapping(x: Any) -> bool:
    return isinstance(x, Mapping) or type(x).__name__ == "DictConfig"


def _is_list(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes)) or type(x).__name__ == "ListConfig"


def read_conll(paths: Sequence[str]) -> dict[str, list[list[str]]]:
    """Two-or-more-column CoNLL (token first, tag last), blank line between sentences."""
    tokens, tags = [], []
    for path in paths:
        sentence: list[tuple[str, str]] = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(itertools.chain(f, [""]), start=1):
                line = line.strip()
                if not line or line.startswith("-DOCSTART-"):
                    if sentence:
                        tokens.append([t for t, _ in sentence])
                        tags.append([g for _, g in sentence])
                        sentence = []
                    continue
                parts = line.split()
                if len(parts) < 2:
                    raise SqueezeError(f"{path}:{line_no}: expected 'token tag', got {line!r}")
                sentence.append((parts[0], parts[-1]))
    return {"tokens": tokens, "tags": tags}


def load_splits(
    source: str,
    name: str | None = None,
    data_files: Mapping[str, list[str]] | None = None,
    splits: Mapping[str, str | None] | None = None,
    carve: Mapping[str, float] | None = None,
    seed: int = 0,
    hub_files: Mapping[str, Any] | None = None,
    only_test: bool = False,
) -> datasets.DatasetDict:
    """Load train/validation/test. A split the source lacks (`splits.<name>: null`) is carved out of
    train by fraction (`carve`), drawn with `seed` (the data module's fixed split_seed, so every run of a
    sweep, whatever its own seed, sees the same split).

    `only_test`: the files are the test split and nothing else is loaded (evaluating one file)."""
    splits = dict(splits or {s: s for s in SPLITS})
    carve = dict(carve or {})
    if source in LOCAL_BUILDERS and not data_files:
        raise SqueezeError(f"source {source!r} reads local files: set task.data.data_files")
    if data_files and source not in LOCAL_BUILDERS:
        # A hub task given local files (task=wikitext2 task.data.data_files=notes.txt): read them with the
        # builder their extension names; the hub dataset's config name means nothing to that builder.
        source, name = local_builder(data_files), None
    if only_test:
        return datasets.DatasetDict({"test": _load_raw(source, name, data_files, None)[next(iter(data_files))]})
    raw = _load_raw(source, name, data_files, hub_files)
    out = {}
    train_name = splits.get("train") or "train"
    if train_name not in raw:
        raise SqueezeError(f"dataset {source!r} has no split {train_name!r} (has {list(raw)})")
    pool = raw[train_name]
    for split in ("test", "validation"):
        src = splits.get(split)
        if src and src in raw:
            out[split] = raw[src]
        elif src:
            raise SqueezeError(f"dataset {source!r} has no split {src!r} (has {list(raw)}); fix task.data.splits")
        else:
            fraction = carve.get(split, 0.1)
            if not 0 < fraction < 1:
                raise SqueezeError(f"task.data.carve.{split}={fraction} must be a fraction between 0 and 1")
            carved = round(len(pool) * fraction)
            if carved < 1 or len(pool) - carved < 1:
                raise SqueezeError(
                    f"the {train_name!r} split has {len(pool)} rows, too few to carve a {split} split of "
                    f"{fraction:.0%} from it and keep rows to train on; give more data, a {split} file "
                    f"(task.data.data_files.{split}=...), or evaluate a single file with evaluate.py"
                )
            parts = pool.train_test_split(test_size=carved, seed=seed, shuffle=True)
            pool, out[split] = parts["train"], parts["test"]
    out["train"] = pool
    return datasets.DatasetDict({s: out[s] for s in SPLITS})


# What the generic builders read, by file extension (compression suffixes aside).
FILE_BUILDERS = {".txt": "text", ".text": "text", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
                 ".parquet": "parquet", ".conll": "conll"}


def local_builder(data_files: Mapping[str, Sequence[str]], where: str = "data files") -> str:
    """The `datasets` builder for files, by extension (all files must agree)."""
    kinds = {_file_kind(f) for files in data_files.values() for f in files}
    builders = {FILE_BUILDERS.get(kind) for kind in kinds}
    if len(builders) != 1 or None in builders:
        raise SqueezeError(f"cannot tell how to read {where} with extensions {sorted(kinds)} (known: "
                           f"{sorted(FILE_BUILDERS)}, optionally compressed); set task.data.source to one of "
                           f"{list(LOCAL_BUILDERS)}")
    return builders.pop()


def _file_kind(path: str) -> str:
    suffixes = [x.lower() for x in Path(path).suffixes]  # c4-validation.00000-of-00008.json.gz: [.., .json, .gz]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _load_raw(source, name, data_files, hub_files) -> datasets.DatasetDict:
    try:
        if source == "conll":
            raw = datasets.DatasetDict(
                {split: datasets.Dataset.from_dict(read_conll(files)) for split, files in data_files.items()}
            )
        elif data_files:
            raw = datasets.load_dataset(source, name, data_files=dict(data_files))
        elif hub_files:
            raw = load_hub_files(source, hub_files)
        else:
            raw = datasets.load_dataset(source, name)
    except SqueezeError:
        raise
    except Exception as e:  # the hub client raises many types; all mean "could not load"
        if data_files:  # no network involved: a file without rows, or one the builder cannot read
            for split, files in data_files.items():
                for path in files:
                    if not _has_rows(path, source):
                        raise SqueezeError(f"data file {path} (split {split!r}) has no rows"
                                           f"{' (only a header)' if source == 'csv' else ''}; give a file with "
                                           "examples (task.data.data_files)") from e
            raise SqueezeError(f"could not read the {source} files {sorted(f for fs in data_files.values() for f in fs)}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; check "
                               "task.data.data_files and task.data.source") from e
        where = "the hub"
        raise SqueezeError(
            f"could not load dataset {source!r}{f' ({name})' if name else ''} from {where}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; without network "
            "use an offline task (task=rotten_tomatoes, wnut16, austen) or task.data.data_files=..."
        ) from e
    return raw


def _has_rows(path: str, builder: str) -> bool:
    """Whether a plain-text data file holds an example: a CSV a line beyond its header, JSON/text any line.
    Compressed or binary files are taken to have rows (the builder's own error then stands)."""
    if _file_kind(path) not in (".csv", ".tsv", ".json", ".jsonl", ".txt", ".text") or Path(path).suffix in (
            ".gz", ".bz2", ".xz", ".zst"):
        return True
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = sum(1 for line in f if line.strip())
    except OSError:
        return True
    return lines > (1 if builder == "csv" else 0)


def load_hub_files(repo_id: str, hub_files: Mapping[str, Any]) -> datasets.DatasetDict:
    """Named files of a hub dataset repository, fetched through the hub cache and read locally.

    Not `load_dataset(repo_id, data_files=...)`: offline, datasets looks such a load up in its cache under
    a key hashed from the hub URLs it resolved online, which it cannot rebuild offline, so the run fails
    even with the files cached (huggingface/datasets#6837). The hub cache serves them offline."""
    local: dict[str, list[str]] = {}
    for split, files in dict(hub_files).items():
        files = [files] if isinstance(files, str) else list(files)
        local[str(split)] = [huggingface_hub.hf_hub_download(repo_id, str(f), repo_type="dataset") for f in files]
    return datasets.load_dataset(local_builder(local, f"task.data.hub_files of {repo_id}"), data_files=local)



class TaskData(L.LightningDataModule):
    """Shared loading, slicing and batching; subclasses turn raw rows into model inputs."""

    sample_rows = True  # max_examples draws a random sample (False: the first rows, in order)

    def __init__(
        self,
        tokenizer,
        source: str,
        name: str | None = None,
        data_files: Any = None,
        hub_files: Mapping[str, Any] | None = None,
        asset: str | None = None,
        splits: Mapping[str, str | None] | None = None,
        carve: Mapping[str, float] | None = None,
        max_examples: Mapping[str, int | None] | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        split_seed: int = 42,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.source, self.name, self.asset = source, name, asset
        self.data_files = data_files
        self.hub_files = hub_files
        self.splits, self.carve = splits, carve
        self.max_examples = dict(max_examples or {})
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        # The held-out examples (carved validation/test, and samples of them) are drawn with their own fixed
        # seed, not the run's: every seed of a sweep is scored on the same examples, and a teacher fine-tuned
        # at one seed never trained on what a student at another seed is tested on.
        self.split_seed = split_seed
        self.datasets: dict[str, Any] = {}
        self._raw: dict[bool, datasets.DatasetDict] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        # evaluate.py task.data.data_files=<file>: one file, not a split mapping, is what to score.
        raw = self.raw_splits(only_test=stage == "test" and self.single_file)
        for split in raw:
            rows = raw[split]
            limit = self.max_examples.get(split)
            if limit is not None and limit < len(rows):
                # A sample of examples; but a text stream must stay contiguous (the first rows).
                seed = self.seed if split == "train" else self.split_seed
                rows = rows.shuffle(seed=seed) if self.sample_rows else rows
                rows = rows.select(range(limit))
            if len(rows) == 0:
                raise SqueezeError(f"split {split!r} is empty; check task.data.data_files / splits")
            self.datasets[split] = self.encode(rows, split)

    @property
    def single_file(self) -> bool:
        return self.data_files is not None and not _is_mapping(self.data_files)

    def raw_splits(self, only_test: bool = False) -> datasets.DatasetDict:
        """The splits as loaded, before slicing and encoding (kept: labels may be read from them first)."""
        if only_test not in self._raw:
            files = resolve_data_files(self.data_files, self.asset)
            self._raw[only_test] = load_splits(self.source, self.name, files, self.splits, self.carve, self.split_seed,
                                               self.hub_files, only_test=only_test)
        return self._raw[only_test]

    def encode(self, rows: datasets.Dataset, split: str):
        raise NotImplementedError

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_model(self, model) -> None:
        """Refuse inputs longer than the model's position embeddings (they would crash mid-run)."""
        limit = max_positions(model.config)
        length = self.input_length
        if limit is not None and length > limit:
            raise SqueezeError(
                f"task.data.{self.length_key}={length} is above the model's context of {limit} tokens; "
                f"set task.data.{self.length_key}<={limit}"
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self):
        # Resumable mid-epoch: the order seeded per epoch, the position saved in checkpoints (squeeze.resume).
        return resumable(self._loader("train", shuffle=True), self.seed)

    def calibration_source(self):
        """What post-training calibration draws its samples from: the train split's batches, in order."""
        return self._loader("train", shuffle=False)

    def val_dataloader(self):
        return self._loader("validation", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)


class _Labelled(TaskData):
    """Label names come from the config; data may hold names (local files) or indices (hub). The user's own files
    (task.data.data_files outside the task's asset) whose label names are not the task's, and `labels: null`,
    take the data's names, sorted, as the class ids, as transformers' example scripts do; the model records them
    in id2label/label2id."""

    own_files_name_labels = True  # False: the task's labels hold for the user's files too (labels: null reads them)

    def __init__(self, tokenizer, labels: Sequence[str] | None, max_length: int = 128, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.configured = [str(x) for x in labels] if labels else None
        read = self.configured is None or (self.own_files_name_labels and self._own_files())
        self._labels = None if read else self.configured
        self.max_length = max_length

    length_key = "max_length"

    @property
    def labels(self) -> list[str]:
        if self._labels is None:  # read from the data (loaded now; setup uses the same load)
            self._labels = self._labels_of_data()
        return self._labels

    @functools.cached_property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def input_length(self) -> int:
        return self.max_length

    def label_values(self, rows: datasets.Dataset) -> list[Any]:
        raise NotImplementedError

    def _own_files(self) -> bool:
        """task.data.data_files that are not the task's asset's own: their labels are the user's."""
        if self.data_files is None:
            return False
        files = resolve_data_files(self.data_files, self.asset)
        home = assets.locate(self.asset).resolve() if self.asset else None
        return home is None or any(not Path(f).resolve().is_relative_to(home) for fs in files.values() for f in fs)

    def _labels_of_data(self) -> list[str]:
        raw = self.raw_splits(only_test=self.single_file)  # every row, whichever split it ends up in
        values = {v for split in raw.values() for v in self.label_values(split) if v is not None}
        if not values:
            raise SqueezeError("the data has no labels; check task.data.data_files and its label column")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):  # class ids already
            if self.configured and max(values) < len(self.configured) and min(values) >= 0:
                return self.configured
            if min(values) < 0:
                raise SqueezeError(f"the data's labels include {min(values)}; class ids start at 0")
            return [str(i) for i in range(max(values) + 1)]
        names = {str(v) for v in values}
        if self.configured and names <= set(self.configured):
            return self.configured
        found = sorted(names)
        log.info("labels from the data (sorted; class id = position): %s%s", found,
                 f" (the task's {self.configured} do not name them)" if self.configured else "")
        return found

    def label_id(self, value: Any) -> int:
        if isinstance(value, str) and value in self.label2id:
            return self.label2id[value]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.labels):
            return value
        raise SqueezeError(
            f"label set mismatch: the data has label {value!r}, which is not among "
            f"task.data.labels={self.labels}; set task.data.labels to the data's label names"
        )


class ClassificationData(_Labelled):
    """One label per text (sentiment and the like)."""

    def __init__(self, tokenizer, text_column: str = "text", label_column: str = "label", **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.text_column, self.label_column = text_column, label_column

    def label_values(self, rows):
        return rows[self.label_column] if self.label_column in rows.column_names else []

    def encode(self, rows, split):
        for column in (self.text_column, self.label_column):
            if column not in rows.column_names:
                raise SqueezeError(f"the data has no column {column!r} (has {rows.column_names})")
        texts = [str(t) for t in rows[self.text_column]]
        labels = [self.label_id(v) for v in rows[self.label_column]]
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        return [
            {**{k: enc[k][i] for k in enc.keys()}, "labels": labels[i]} for i in range(len(texts))
        ]

    def collate(self, features):
        batch = self.tokenizer.pad(
            [{k: v for k, v in f.items() if k != "labels"} for f in features], return_tensors="pt"
        )
        batch["labels"] = torch.tensor([f["labels"] for f in features])
        return dict(batch)


class TokenClassificationData(_Labelled):
    """One tag per word (NER); words are split into sub-tokens and only the first is labelled."""

    own_files_name_labels = False  # the task's module names the tags from task.data.labels (conf/task/*.yaml)

    def __init__(self, tokenizer, tokens_column: str = "tokens", tags_column: str = "tags", **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.tokens_column, self.tags_column = tokens_column, tags_column

    def label_values(self, rows):
        return [t for seq in rows[self.tags_column] for t in seq] if self.tags_column in rows.column_names else []

    def encode(self, rows, split):
        for column in (self.tokens_column, self.tags_column):
            if column not in rows.column_names:
                raise SqueezeError(f"the data has no column {column!r} (has {rows.column_names})")
        words = [list(map(str, w)) for w in rows[self.tokens_column]]
        tags = [[self.label_id(t) for t in seq] for seq in rows[self.tags_column]]
        enc = self.tokenizer(words_as_in_text(self.tokenizer, words), is_split_into_words=True, truncation=True,
                             max_length=self.max_length)
        out = []
        for i in range(len(words)):
            item = {k: enc[k][i] for k in enc.keys()}
            item["labels"] = align_labels(enc.word_ids(i), tags[i])
            out.append(item)
        return out

    def collate(self, features):
        labels = [f["labels"] for f in features]
        batch = self.tokenizer.pad(
            [{k: v for k, v in f.items() if k != "labels"} for f in features], return_tensors="pt"
        )
        width = batch["input_ids"].shape[1]
        padded = [
            (lab + [IGNORE_INDEX] * (width - len(lab))) if self.tokenizer.padding_side == "right"
            else ([IGNORE_INDEX] * (width - len(lab)) + lab)
            for lab in labels
        ]
        batch["labels"] = torch.tensor(padded)
        return dict(batch)


class LanguageModelingData(TaskData):
    """Causal LM over a token stream: training on non-overlapping blocks, evaluation by protocol.

    The protocol (`blocks` or `sliding` with `stride`) decides which tokens are scored with how much
    context, and so the perplexity; it is written into every result that reports perplexity.
    """

    length_key = "block_size"
    sample_rows = False

    def __init__(
        self,
        tokenizer,
        text_column: str = "text",
        block_size: int = 256,
        protocol: str = "blocks",
        stride: int | None = None,
        **kwargs,
    ):
        super().__init__(tokenizer, **kwargs)
        if protocol not in PROTOCOLS:
            raise SqueezeError(f"task.data.protocol={protocol!r} is not one of {list(PROTOCOLS)}")
        if stride is not None and not 0 < stride <= block_size:
            raise SqueezeError(f"task.data.stride={stride} must be in (0, block_size={block_size}]")
        self.text_column = text_column
        self.block_size = block_size
        self.protocol = protocol
        self.stride = stride if stride is not None else block_size // 2
        self.scored_tokens: dict[str, int] = {}

    @property
    def input_length(self) -> int:
        return self.block_size

    @property
    def protocol_record(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "block_size": self.block_size,
            "stride": self.stride if self.protocol == "sliding" else None,
            "scored_tokens": self.scored_tokens.get("test"),
        }

    def token_stream(self, rows) -> list[int]:
        if self.text_column not in rows.column_names:
            raise SqueezeError(f"the data has no column {self.text_column!r} (has {rows.column_names})")
        # Line-based sources (`text` builder) drop newlines; put them back so the stream is the text.
        texts = [t if t.endswith("\n") else t + "\n" for t in rows[self.text_column] if t is not None]
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return list(itertools.chain.from_iterable(enc))

    def encode(self, rows, split):
        ids = self.token_stream(rows)
        if split == "train":
            n = len(ids) // self.block_size * self.block_size
            blocks = [ids[i : i + self.block_size] for i in range(0, n, self.block_size)]
            if not blocks:
                raise SqueezeError(
                    f"the train split has {len(ids)} tokens, fewer than one block of {self.block_size}"
                )
            return [{"input_ids": b, "labels": b} for b in blocks]
        windows = list(perplexity_windows(ids, self.block_size, self.protocol, self.stride))
        self.scored_tokens[split] = sum(sum(1 for x in lab if x != IGNORE_INDEX) for _, lab in windows)
        return [{"input_ids": w, "labels": lab} for w, lab in windows]

    def calibration_source(self):
        """The training text as token sequences (its blocks, in order): calibration cuts its own windows."""
        return [f["input_ids"] for f in self.datasets["train"]]

    def collate(self, features):
        width = max(len(f["input_ids"]) for f in features)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class LastWordData(LanguageModelingData):
    """LAMBADA: trains on blocks of the text stream like any LM task; validation and test are passages
    scored one by one (no stream, no context across passages): the last word (its tokens, with the space
    before it) is the target, everything before it the context (squeeze.metrics.encode_last_word).

    A passage is one example: input_ids, labels (every token, for the passages' perplexity) and
    target_mask (1 on the target's tokens, for squeeze.modules.LastWordLM). A passage longer than
    `max_length` tokens loses context from the left (how many did is recorded); `max_length=None` is the
    model's context, as the harness has it (block_size until the run hands the model to check_model).
    """

    def __init__(self, tokenizer, max_length: int | None = None, **kwargs):
        super().__init__(tokenizer, **kwargs)
        if max_length is not None and max_length < 2:
            raise SqueezeError(f"task.data.max_length={max_length} must be at least 2 (a context and a word)")
        self.max_length = max_length
        self.passages: dict[str, dict[str, int]] = {}

    def check_model(self, model) -> None:
        super().check_model(model)
        limit = max_positions(model.config)
        if self.max_length is not None and limit is not None and self.max_length > limit:
            raise SqueezeError(f"task.data.max_length={self.max_length} is above the model's context of {limit} "
                               f"tokens; set task.data.max_length<={limit} or null (the model's context)")
        if self.max_length is None and limit is not None:
            self.max_length = limit

    @property
    def passage_length(self) -> int:
        return self.max_length or self.block_size

    @property
    def protocol_record(self) -> dict[str, Any]:
        return {
            "protocol": "last_word",
            "block_size": self.block_size,
            "stride": None,
            "scored_tokens": self.scored_tokens.get("test"),
            "last_word": {**self.passages.get("test", {}), "max_length": self.passage_length,
                          "perplexity": "per passage (the harness's)"},
        }

    def encode(self, rows, split):
        if split == "train":
            return super().encode(rows, split)
        if self.text_column not in rows.column_names:
            raise SqueezeError(f"the data has no column {self.text_column!r} (has {rows.column_names})")
        out, cut, targets, blank = [], 0, 0, 0
        for i, text in enumerate(rows[self.text_column]):
            if not str(text or "").strip():  # a local text file's blank lines separate passages; they are none
                blank += 1
                continue
            try:
                ids, start, truncated = encode_last_word(self.tokenizer, str(text or ""), self.passage_length)
            except ValueError as e:
                raise SqueezeError(f"{split} passage {i}: {e}; LAMBADA passages end in a word") from e
            out.append({"input_ids": ids, "labels": ids, "target_mask": [0] * start + [1] * (len(ids) - start)})
            cut += truncated
            targets += len(ids) - start
        self.scored_tokens[split] = sum(len(x["input_ids"]) - 1 for x in out)
        if not out:
            raise SqueezeError(f"the {split} split has no passage with text ({blank} blank); check task.data.data_files")
        self.passages[split] = {"passages": len(out), "target_tokens": targets, "truncated": cut, "blank_skipped": blank}
        return out

    def collate(self, features):
        batch = super().collate(features)
        if "target_mask" in features[0]:
            mask = torch.zeros_like(batch["input_ids"])
            for i, f in enumerate(features):
                mask[i, : len(f["target_mask"])] = torch.tensor(f["target_mask"])
            batch["target_mask"] = mask
        return batch
