"""Dialog metrics: candidates scored by the LM's mean log-likelihood of each reply, and Hits@k over them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.text import SacreBLEUScore

from squeeze.errors import SqueezeError
from squeeze.tasks.base import IGNORE_INDEX


def context_lengths(labels: torch.Tensor, candidates: int) -> torch.Tensor:
    """Per example, where its reply starts: the first labelled position of its gold (last) row."""
    gold = labels[candidates - 1 :: candidates]
    labelled = gold != IGNORE_INDEX
    if not bool(labelled.any(dim=1).all()):
        raise SqueezeError("a dialog example's gold row has no reply tokens; raise task.data.max_length")
    return labelled.int().argmax(dim=1)


def reply_scores(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], candidates: int) -> torch.Tensor:
    """Mean log-likelihood of each candidate's reply tokens given the context: [examples, candidates]."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    starts = context_lengths(batch["labels"], candidates).repeat_interleave(candidates)
    position = torch.arange(1, ids.shape[1], device=ids.device)  # the token each logit predicts
    scored = (position[None, :] >= starts[:, None]) & mask[:, 1:].bool()
    # Only reply positions: the softmax over the vocabulary is the cost, and most tokens are context.
    row, column = scored.nonzero(as_tuple=True)
    logp = -F.cross_entropy(logits[row, column].float(), ids[row, column + 1], reduction="none")
    total = torch.zeros(ids.shape[0], device=ids.device).index_add_(0, row, logp)
    return (total / scored.sum(dim=1).clamp(min=1)).view(-1, candidates)


def hits_at_k(scores: torch.Tensor, ks: Sequence[int], gold_index: int = -1) -> dict[int, torch.Tensor]:
    """Per example, whether the gold candidate ranks within the top k by score, for each k.

    scores: [examples, candidates]. Ties count against the gold (a distractor scoring the same ranks
    above it), so a model that scores everything alike gets no hits.  torchmetrics' RetrievalHitRate
    breaks ties by sort order, which can favour the gold; hence this function."""
    if scores.dim() != 2:
        raise SqueezeError(f"Hits@k takes scores of shape [examples, candidates], got {tuple(scores.shape)}")
    candidates = scores.shape[1]
    for k in ks:
        if k > candidates:
            raise SqueezeError(f"Hits@{k} needs at least {k} candidates per example, the data has {candidates}; "
                               f"raise task.data.num_candidates or drop {k} from task.module.hits_at")
    gold_index = gold_index % candidates
    gold = scores[:, gold_index : gold_index + 1]
    others = torch.cat([scores[:, :gold_index], scores[:, gold_index + 1 :]], dim=1)
    above = (others >= gold).sum(dim=1)  # distractors ranked at or above the gold
    return {k: above < k for k in ks}


class HitsAtK(Metric):
    """Hits@k over examples (the gold reply is the last candidate), summed across processes."""

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10), **kwargs):
        super().__init__(**kwargs)
        self.ks = [int(k) for k in ks]
        self.add_state("hits", default=torch.zeros(len(self.ks)), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor) -> None:
        hits = hits_at_k(scores, self.ks)
        self.hits += torch.stack([hits[k].sum() for k in self.ks]).to(self.hits)
        self.total += scores.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.clamp(min=1)
        return {f"hits@{k}": self.hits[i] / total for i, k in enumerate(self.ks)}


BLEU_SMOOTHING = ("exp", "none")


class CorpusBLEU(SacreBLEUScore):
    """Corpus BLEU (0-1) from torchmetrics' sacreBLEU n-gram counts, with sacreBLEU's default "exp" smoothing:
    an order with no matching n-gram counts 1 / (2^k · its n-gram total), k the number of such orders so far
    (Chen & Cherry 2014, method 3), so short replies that share words with the reference do not all score 0.
    "none" is plain BLEU (torchmetrics' own). torchmetrics' `smooth=True` cannot stand in: it returns 0 as soon
    as one order has no match, before smoothing."""

    def __init__(self, smoothing: str = "exp", **kwargs):
        if smoothing not in BLEU_SMOOTHING:
            raise SqueezeError(f"task.module.bleu_smoothing={smoothing!r} is not one of {list(BLEU_SMOOTHING)}")
        super().__init__(**kwargs)
        self.smoothing = smoothing

    def compute(self) -> torch.Tensor:
        if self.smoothing == "none":
            return super().compute()
        correct, total = self.numerator.double(), self.denominator.double()
        if self.preds_len == 0 or bool((total == 0).any()):
            return torch.tensor(0.0, device=self.numerator.device)  # no candidate this long: undefined, 0 as sacreBLEU
        halvings = torch.cumsum((correct == 0).double(), dim=0)
        precisions = torch.where(correct > 0, correct / total, 1.0 / (2.0 ** halvings * total))
        brevity = 1.0 if self.preds_len > self.target_len else math.exp(1 - float(self.target_len / self.preds_len))
        return (brevity * torch.exp(torch.log(precisions).mean())).float()
