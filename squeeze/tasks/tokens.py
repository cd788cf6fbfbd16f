"""Token classification (NER): one tag per word; words are split into sub-tokens and only the first is
labelled. Entity-level precision/recall/F1 (seqeval's exact-match reading, written here: torchmetrics has no
entity matching) plus token accuracy."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from squeeze.arch.tokenizers import words_as_in_text
from squeeze.errors import SqueezeError
from squeeze.tasks.base import IGNORE_INDEX, FineTune, _Labelled


def split_tag(tag: str) -> tuple[str, str | None]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', None). Accepts BIO tags (IOB2 and IOB1)."""
    if tag == "O" or tag == "":
        return "O", None
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I") or not kind:
        raise ValueError(f"tag {tag!r} is not a BIO tag (O, B-TYPE or I-TYPE)")
    return prefix, kind


def extract_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entities as (type, start, end-exclusive), matching seqeval's default (lenient) BIO reading:
    an I- after O or after another type starts a new entity."""
    entities = set()
    current: tuple[str, int] | None = None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, kind = split_tag(tag)
        continues = prefix == "I" and current is not None and current[0] == kind
        if current is not None and not continues:
            entities.add((current[0], current[1], i))
            current = None
        if prefix == "B" or (prefix == "I" and not continues):
            current = (kind, i)
    return entities


class EntityF1(Metric):
    """Micro precision/recall/F1 over exact entity matches (type and span), as seqeval reports."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> None:
        if len(predicted) != len(gold):
            raise ValueError(f"{len(predicted)} predicted sequences but {len(gold)} gold ones")
        for p_tags, g_tags in zip(predicted, gold):
            if len(p_tags) != len(g_tags):
                raise ValueError(f"sequence lengths differ: {len(p_tags)} vs {len(g_tags)}")
            p, g = extract_entities(p_tags), extract_entities(g_tags)
            self.tp += len(p & g)
            self.fp += len(p - g)
            self.fn += len(g - p)

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp, fn = self.tp.float(), self.fp.float(), self.fn.float()
        precision = tp / (tp + fp) if tp + fp > 0 else torch.tensor(0.0)
        recall = tp / (tp + fn) if tp + fn > 0 else torch.tensor(0.0)
        denom = precision + recall
        f1 = 2 * precision * recall / denom if denom > 0 else torch.tensor(0.0)
        return {"precision": precision, "recall": recall, "f1": f1}


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Give each word's label to its first sub-token; later sub-tokens and special tokens get
    IGNORE_INDEX so they count neither in the loss nor in the entity metric."""
    labels = []
    previous = None
    for word in word_ids:
        if word is None or word == previous:
            labels.append(IGNORE_INDEX)
        else:
            labels.append(int(word_labels[word]))
        previous = word
    return labels


# -- the data module ---------------------------------------------------------------------------------
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


# -- the LightningModule -----------------------------------------------------------------------------
class TokenClassification(FineTune):
    """Entity-level precision/recall/F1 (seqeval's exact-match reading) plus token accuracy,
    both over first sub-tokens only."""

    def __init__(self, model: nn.Module, labels: Sequence[str] | None = None, **kwargs):
        self.tag_names = list(labels) if labels else [model.config.id2label[i] for i in range(model.config.num_labels)]
        super().__init__(model, **kwargs)

    def make_metrics(self):
        n = self.model.config.num_labels
        return nn.ModuleDict(
            {"entity": EntityF1(), "token_accuracy": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE_INDEX)}
        )

    def update_metrics(self, metrics, batch, outputs):
        predicted = outputs.logits.argmax(-1)
        labels = batch["labels"]
        metrics["token_accuracy"].update(predicted, labels)
        keep = labels != IGNORE_INDEX
        pred_seqs, gold_seqs = [], []
        for p, g, k in zip(predicted.tolist(), labels.tolist(), keep.tolist()):
            pred_seqs.append([self.tag_names[x] for x, m in zip(p, k) if m])
            gold_seqs.append([self.tag_names[x] for x, m in zip(g, k) if m])
        metrics["entity"].update(pred_seqs, gold_seqs)

    def compute_metrics(self, metrics):
        entity = metrics["entity"].compute()
        return {**entity, "token_accuracy": metrics["token_accuracy"].compute()}
