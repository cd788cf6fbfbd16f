"""Sequence classification: one label per text (sentiment and the like). Accuracy, and macro precision,
recall and F1 from torchmetrics."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from squeeze.errors import SqueezeError
from squeeze.tasks.base import FineTune, _Labelled


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


class SequenceClassification(FineTune):
    """Accuracy, and macro precision, recall and F1 (each the unweighted mean over classes), over
    whole-text labels."""

    def make_metrics(self):
        n = self.model.config.num_labels
        return MetricCollection(
            {"accuracy": MulticlassAccuracy(n, average="micro"), "f1": MulticlassF1Score(n, average="macro"),
             "precision": MulticlassPrecision(n, average="macro"), "recall": MulticlassRecall(n, average="macro")}
        )

    def update_metrics(self, metrics, batch, outputs):
        metrics.update(outputs.logits.argmax(-1), batch["labels"])
