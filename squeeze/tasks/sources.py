"""Raw sources: a task's splits loaded with `datasets`, before any tokenizer sees them.

From the hub (`source: imdb`, or named files of a hub repository: `hub_files`), from local files through a
generic builder (`source: csv|json|text|parquet` + `data_files`, or the builder the files' extension names),
or from a CoNLL file (`source: conll`). A split the source lacks is carved out of train with a fixed seed.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import huggingface_hub

from squeeze import assets
from squeeze.errors import SqueezeError

SPLITS = ("train", "validation", "test")
LOCAL_BUILDERS = ("csv", "json", "text", "parquet", "conll")


def resolve_data_files(data_files: Any, asset: str | None,
                       setting: str = "task.data.data_files") -> dict[str, list[str]] | None:
    """Normalise `data_files` to {split: [absolute paths]}; relative paths are taken inside the
    offline asset's directory when the task names one. Every file must exist (`setting`: the config key a
    missing one is fixed in)."""
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
                where = f" (split {split!r})" if setting == "task.data.data_files" else ""
                raise SqueezeError(f"data file {path}{where} does not exist; fix {setting}")
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
    train (`splits.train`: one split or a list pooled) by fraction (`carve`; test first, then validation from
    what is left), drawn with `seed` (the data module's fixed split_seed, so every run of a
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
    # splits.train may pool several of the source's splits (the thesis' IMDB: train + test, then 50/25/25 carved).
    pooled = splits.get("train") or "train"
    pooled = [pooled] if isinstance(pooled, str) else [str(s) for s in pooled]
    for train_name in pooled:
        if train_name not in raw:
            raise SqueezeError(f"dataset {source!r} has no split {train_name!r} (has {list(raw)}); fix "
                               "task.data.splits.train")
    train_name = "+".join(pooled)
    pool = raw[pooled[0]] if len(pooled) == 1 else datasets.concatenate_datasets([raw[s] for s in pooled])
    for split in ("test", "validation"):
        src = splits.get(split)
        if src and src in pooled:
            raise SqueezeError(f"task.data.splits.{split}={src!r} is also pooled into train ({pooled}); set "
                               f"task.data.splits.{split}=null to carve the {split} split from the pool")
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


def read_files(source: str, name: str | None, files: Sequence[str], setting: str) -> datasets.Dataset:
    """Every row of `files` (resolved paths) as one split, read as load_splits reads a task's files: with the
    task's local builder, or the one their extension names when the task's source is a hub dataset."""
    data_files = {"train": list(files)}
    if source not in LOCAL_BUILDERS:
        source, name = local_builder(data_files, setting), None
    return _load_raw(source, name, data_files, None, setting)["train"]


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


def _load_raw(source, name, data_files, hub_files, setting: str = "task.data.data_files") -> datasets.DatasetDict:
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
                        where = f" (split {split!r})" if setting == "task.data.data_files" else ""
                        raise SqueezeError(f"data file {path}{where} has no rows"
                                           f"{' (only a header)' if source == 'csv' else ''}; give a file with "
                                           f"examples ({setting})") from e
            raise SqueezeError(f"could not read the {source} files {sorted(f for fs in data_files.values() for f in fs)}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; check "
                               f"{setting} and task.data.source") from e
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
