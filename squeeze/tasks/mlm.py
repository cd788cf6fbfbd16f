"""Masked language modelling, BERT's pre-training objective, over a text's token stream: the task an encoder is
trained (and pruned, `compress=imp`) on before it is fine-tuned on a downstream task (the thesis' pre-training IMP).

Each example is a block of the stream between the tokenizer's own special tokens ([CLS] ... [SEP]). A share
`mask_probability` of the ordinary tokens is chosen for prediction (at least one per block); of those, 80 % are
replaced by the mask token, 10 % by a random token and 10 % kept, as BERT does. Training draws new positions for
every batch (from torch's seeded RNG, so a run repeats with its seed); validation and test positions are drawn once,
seeded, so every model is scored on the same masked tokens. Perplexity is exp of the mean loss over those tokens.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.text import Perplexity

from squeeze.errors import SqueezeError
from squeeze.tasks.base import IGNORE_INDEX, FineTune
from squeeze.tasks.lm import LanguageModelingData

KEEP, RANDOM = 0.1, 0.1  # of the chosen tokens: kept as they are, replaced by a random token (the rest: [MASK])


def mask_tokens(ids: list[int], special: set[int], mask_id: int, vocab_size: int, rng: random.Random,
                probability: float) -> tuple[list[int], list[int]]:
    """(inputs, labels) of one block: labels hold the original token where one was chosen, IGNORE_INDEX elsewhere."""
    candidates = [i for i, t in enumerate(ids) if t not in special]
    if not candidates:
        return list(ids), [IGNORE_INDEX] * len(ids)
    chosen = [i for i in candidates if rng.random() < probability] or [rng.choice(candidates)]
    inputs, labels = list(ids), [IGNORE_INDEX] * len(ids)
    for i in chosen:
        labels[i] = ids[i]
        draw = rng.random()
        if draw < 1 - KEEP - RANDOM:
            inputs[i] = mask_id
        elif draw < 1 - KEEP:
            inputs[i] = rng.randrange(vocab_size)
    return inputs, labels


class MaskedLanguageModelingData(LanguageModelingData):
    """Blocks of `block_size` tokens (special tokens included) of the text stream, masked as the module docstring says."""

    def __init__(self, tokenizer, mask_probability: float = 0.15, **kwargs):
        for fixed in ("protocol", "stride"):  # every split is non-overlapping blocks
            kwargs.pop(fixed, None)
        super().__init__(tokenizer, **kwargs)
        if not 0 < mask_probability < 1:
            raise SqueezeError(f"task.data.mask_probability={mask_probability} must be between 0 and 1")
        if tokenizer.mask_token_id is None:
            raise SqueezeError(f"the tokenizer ({type(tokenizer).__name__}) has no mask token: masked language "
                               "modelling needs an encoder's tokenizer (BERT, DistilBERT)")
        self.mask_probability = mask_probability
        self.special = set(tokenizer.all_special_ids)

    @property
    def protocol_record(self) -> dict[str, Any]:
        return {"protocol": "masked", "block_size": self.block_size, "mask_probability": self.mask_probability,
                "scored_tokens": self.scored_tokens.get("test")}

    def _wrapping(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text ([CLS] and [SEP] for BERT)."""
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        at = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
        return full[:at], full[at + len(bare):]

    def _blocks(self, ids: list[int]) -> list[list[int]]:
        before, after = self._wrapping()
        inner = self.block_size - len(before) - len(after)
        if inner < 1:
            raise SqueezeError(f"task.data.block_size={self.block_size} leaves no room beside the special tokens")
        return [before + ids[i : i + inner] + after for i in range(0, len(ids) // inner * inner, inner)]

    def encode(self, rows, split):
        blocks = self._blocks(self.token_stream(rows))
        if not blocks:
            raise SqueezeError(f"the {split} split has fewer tokens than one block of {self.block_size}")
        if split == "train":  # masked afresh in every batch (collate)
            return [{"input_ids": b} for b in blocks]
        rng = random.Random(f"{self.split_seed}/{split}")  # the same masked tokens for every model scored
        out = []
        for block in blocks:
            inputs, labels = mask_tokens(block, self.special, self.tokenizer.mask_token_id, len(self.tokenizer), rng,
                                         self.mask_probability)
            out.append({"input_ids": inputs, "labels": labels})
        self.scored_tokens[split] = sum(sum(x != IGNORE_INDEX for x in f["labels"]) for f in out)
        return out

    def calibration_source(self, files=None):
        if files is None:
            return [f["input_ids"] for f in self.datasets["train"]]
        return [self.read_calibration_files(files, self.token_stream)]

    def collate(self, features):
        if "labels" not in features[0]:  # a training batch: new positions from torch's (seeded) RNG
            rng = random.Random(int(torch.randint(2**31 - 1, ()).item()))
            features = [dict(zip(("input_ids", "labels"),
                                 mask_tokens(f["input_ids"], self.special, self.tokenizer.mask_token_id,
                                             len(self.tokenizer), rng, self.mask_probability)))
                        for f in features]
        return super().collate(features)


class MaskedLM(FineTune):
    """Perplexity over the masked tokens (no shift: each position predicts its own token)."""

    def make_metrics(self):
        return MetricCollection({"perplexity": Perplexity(ignore_index=IGNORE_INDEX)})

    def update_metrics(self, metrics, batch, outputs):
        metrics.update(outputs.logits.float(), batch["labels"])
