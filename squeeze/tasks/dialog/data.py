"""The dialog data module: conversations read and split, examples with their candidates, batches of C
consecutive rows per example (the gold reply last)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from squeeze import assets
from squeeze.errors import SqueezeError
from squeeze.tasks.base import IGNORE_INDEX, TaskData
from squeeze.tasks.dialog.corpora import (_normal, chatterbot_examples, choose_splits, convai2_examples,
                                          drop_duplicates, read_chatterbot, read_convai2, sample_distractors)
from squeeze.tasks.dialog.encoding import _special_prefix, candidate_rows, dialog_texts, encode_dialog
from squeeze.tasks.sources import SPLITS, load_splits, resolve_data_files


class DialogData(TaskData):
    """Dialog examples as groups of candidate rows (see the module docstring).

    `batch_size` / `eval_batch_size` count rows (sequences), as on the other tasks, so memory per
    batch is alike: a batch holds max(1, rows // candidates) examples. Training uses
    `train_candidates` per example (gold + distractors, for the classification loss); validation
    and test use `num_candidates` (Hits@k needs k ≤ num_candidates).
    """

    length_key = "max_length"

    def __init__(
        self,
        tokenizer,
        source: str = "chatterbot",
        max_length: int = 256,
        max_history: int = 5,
        max_reply_tokens: int = 48,
        num_candidates: int = 20,
        train_candidates: int = 2,
        speakers: Sequence[str] = ("User", "Bot"),
        persona_prefix: str = "Persona",
        skip_malformed: bool = False,
        **kwargs,
    ):
        super().__init__(tokenizer, source=source, **kwargs)
        if num_candidates < 1 or train_candidates < 1:
            raise SqueezeError("task.data.num_candidates and task.data.train_candidates must be at least 1")
        if len(speakers) != 2 or any(not str(s).strip() for s in speakers):
            raise SqueezeError(f"task.data.speakers={list(speakers)} must name two speakers (other, reply)")
        self.settings = {"max_length": max_length, "max_history": max_history, "max_reply_tokens": max_reply_tokens,
                         "speakers": tuple(str(s) for s in speakers), "persona_prefix": persona_prefix}
        self.max_length = max_length
        self.num_candidates, self.train_candidates = num_candidates, train_candidates
        self.skip_malformed = skip_malformed
        self.examples: dict[str, list[dict[str, Any]]] = {}

    @property
    def input_length(self) -> int:
        return self.max_length

    def candidates_per_example(self, split: str) -> int:
        return self.train_candidates if split == "train" else self.num_candidates

    # -- loading --------------------------------------------------------------------------------
    def conversations(self) -> dict[str, list[dict[str, Any]]]:
        """train/validation/test conversations, each turned into examples by `_examples`."""
        if self.source == "chatterbot":
            files = resolve_data_files(self.data_files, self.asset)
            if files is None:
                if not self.asset:
                    raise SqueezeError("source chatterbot reads YAML files: set task.data.asset or "
                                       "task.data.data_files")
                files = {"train": sorted(str(p) for p in assets.locate(self.asset).glob("*.yml"))}
                if not files["train"]:
                    raise SqueezeError(f"no *.yml files in {assets.locate(self.asset)}")
            raw = {split: drop_duplicates(read_chatterbot(paths, self.skip_malformed))
                   for split, paths in files.items()}
            return choose_splits(raw, self.splits, self.carve, self.split_seed,
                                 group=lambda c: _normal(c["turns"][0]))
        elif self.source == "convai2":
            files = resolve_data_files(self.data_files, self.asset)
            if not files:
                raise SqueezeError("source convai2 reads a local ConvAI2 JSON file: set task.data.data_files")
            raw = read_convai2(files)
        else:
            rows = load_splits(self.source, self.name, None, self.splits, self.carve, self.split_seed, self.hub_files)
            return {split: rows[split].to_list() for split in SPLITS}
        return choose_splits(raw, self.splits, self.carve, self.split_seed)

    def has_train_split(self, fitting: bool) -> bool:
        return True  # its files are always carved into splits (choose_splits), evaluate.py's one file too

    def calibration_files(self, data_files: Any) -> list[str]:
        raise SqueezeError("calibration.data_files: a dialog task calibrates on its own train split (conversations "
                           "with their candidates, as it reads them); drop calibration.data_files")

    def _examples(self, conversations: list[dict[str, Any]], split: str, first_id: int) -> list[dict[str, Any]]:
        out = []
        for i, conversation in enumerate(conversations):
            if isinstance(conversation, Mapping) and "turns" in conversation:
                out += chatterbot_examples(conversation, first_id + i)
            else:
                out += convai2_examples(conversation, first_id + i, f"{split} conversation {i + 1}")
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        by_split = self.conversations()
        first_id = 0
        for split in SPLITS:
            examples = self._examples(by_split[split], split, first_id)
            first_id += len(by_split[split])
            if not examples:
                raise SqueezeError(f"split {split!r} has no dialog examples; check task.data.data_files / splits")
            self.examples[split] = examples
        # Distractors for sources without candidates (ChatterBot): replies of other conversations, any split.
        pool = [(e["reply"], e["conversation"]) for split in SPLITS for e in self.examples[split]]
        for split in SPLITS:
            examples = self.examples[split]
            limit = self.max_examples.get(split)
            seed = self.seed if split == "train" else self.split_seed  # held-out examples: the same every run
            if limit is not None and limit < len(examples):
                examples = random.Random(f"{seed}/{split}").sample(examples, limit)
            needed = self.candidates_per_example(split) - 1
            if self.source == "chatterbot":
                sample_distractors(examples, pool, needed, random.Random(f"{seed}/{split}/distractors"))
            self.examples[split] = examples
            self.datasets[split] = self.encode(examples, split)

    def chosen_candidates(self, example: Mapping[str, Any], split: str) -> list[str]:
        distractors = self.candidates_per_example(split) - 1
        have = example["distractors"]
        if len(have) < distractors:
            raise SqueezeError(f"{example['where']} has {len(have) + 1} candidates, {distractors + 1} needed (Hits@k "
                               "needs k candidates); lower task.data.num_candidates / train_candidates")
        # As ConvAI2 baselines do: the distractors nearest the gold (the last ones), gold last.
        return (have[-distractors:] if distractors else []) + [example["reply"]]

    def encode(self, examples, split):
        chosen = [self.chosen_candidates(e, split) for e in examples]
        # Every distinct text piece tokenized in one call (fast tokenizers batch it), then assembled.
        format_settings = {k: self.settings[k] for k in ("max_history", "speakers", "persona_prefix")}
        pieces: set[str] = set()
        for example, candidates in zip(examples, chosen):
            texts = dialog_texts(example["personality"], example["history"], candidates, **format_settings)
            pieces.update(text for _, text in texts["lines"])
            pieces.update(texts["replies"] + [texts["prompt"][1]])
        pieces_list = sorted(pieces)
        ids = dict(zip(pieces_list, self.tokenizer(pieces_list, add_special_tokens=False)["input_ids"]))
        out, start = [], _special_prefix(self.tokenizer)
        for example, candidates in zip(examples, chosen):
            encoded = encode_dialog(self.tokenizer, example["personality"], example["history"], candidates,
                                    tokenize=lambda text: list(ids[text]), start_ids=start, **self.settings)
            out.append({"rows": candidate_rows(encoded), "context_length": len(encoded["context"])})
        return out

    # -- batching -------------------------------------------------------------------------------
    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [row for f in features for row in f["rows"]]
        width = max(len(r["input_ids"]) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # right padding: every row of an example shares its context positions
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        rows = self.batch_size if split == "train" else self.eval_batch_size
        return DataLoader(self.datasets[split], batch_size=max(1, rows // self.candidates_per_example(split)),
                          shuffle=shuffle, collate_fn=self.collate, num_workers=self.num_workers)

    def perf_dataloader(self) -> DataLoader:
        """Test examples as one row each (context + gold reply): what inference latency is measured on."""
        gold = [{"rows": f["rows"][-1:]} for f in self.datasets["test"]]
        return DataLoader(gold, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate)

    def generation_prompts(self, split: str = "test", count: int | None = None) -> list[list[int]]:
        """Context token ids (persona, history, reply speaker) of the first `count` examples."""
        features = self.datasets[split][:count] if count else self.datasets[split]
        return [f["rows"][-1]["input_ids"][: f["context_length"]] for f in features]
