"""Scoring an evaluation batch's candidate replies: each example's context runs through the model once
and every candidate's reply is scored against the context's cached keys and values.

A batch holds C rows per example, each the full context followed by one candidate (see encoding.py);
run as they are, the shared context is encoded C times, and the vocabulary projection runs on every
position although only reply tokens are scored. Here the contexts (right-padded) go through the model
once, their KV cache is repeated across the candidates, and the replies (right-padded, positions
continuing each example's context, the context's padding masked) go through against it; the
vocabulary projection runs only where a reply token is predicted. The numbers are those of the full
rows up to float rounding (tests/test_dialog.py and benchmarks/eval_overhead.py compare them).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from squeeze.dialog.metrics import context_lengths, reply_scores
from squeeze.metrics import IGNORE_INDEX


@dataclass
class CandidateScores:
    """What dialog evaluation needs from the model on a batch: each candidate's mean reply
    log-likelihood ([examples, candidates], the gold last), and the logits predicting each token of the
    gold replies with those tokens (for perplexity and the reply LM loss)."""

    scores: torch.Tensor
    gold_logits: torch.Tensor  # [gold reply tokens, vocabulary]
    gold_targets: torch.Tensor  # [gold reply tokens]

    @property
    def loss(self) -> torch.Tensor:
        """The gold replies' mean token NLL: the model's own loss on the batch's labels."""
        return F.cross_entropy(self.gold_logits.float(), self.gold_targets)


def scores_from_logits(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], candidates: int) -> CandidateScores:
    """CandidateScores from the model's logits on the full rows (each candidate with its whole context):
    the way a model output computed elsewhere (e.g. by distillation's evaluation step) is scored."""
    labels = batch["labels"]
    row, column = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # position t predicts token t+1
    return CandidateScores(reply_scores(logits, batch, candidates), logits[row, column], labels[row, column + 1])


def _cache_argument(base: nn.Module) -> str:
    # transformers 5.x renames forward's `past_key_values` to `cache` (the old name is deprecated).
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # = -cross_entropy(reduction="none") without writing out the [tokens, vocabulary] log-softmax.
    return logits.gather(1, targets[:, None])[:, 0] - logits.logsumexp(dim=-1)


@torch.no_grad()
def score_candidates(model: nn.Module, batch: Mapping[str, torch.Tensor], candidates: int) -> CandidateScores:
    """CandidateScores of a batch of C rows per example, each context encoded once (see the module
    docstring). `model`: a transformers causal LM (GPT-2, Llama, OPT families), in eval mode."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    device, width = ids.device, ids.shape[1]
    base, head = model.base_model, model.get_output_embeddings()  # body to the final norm; vocabulary projection
    cache_argument = _cache_argument(base)
    starts = context_lengths(batch["labels"], candidates)  # per example: context length = where its reply starts
    examples = starts.shape[0]

    # 1. The contexts, once per example (the gold rows cut where the reply starts), right-padded.
    context_width = int(starts.max())
    offsets = torch.arange(context_width, device=device)
    context_mask = (offsets[None, :] < starts[:, None]).long()
    cache = DynamicCache(config=model.config)
    hidden = base(input_ids=ids[candidates - 1 :: candidates, :context_width], attention_mask=context_mask,
                  position_ids=offsets.expand(examples, -1), use_cache=True, **{cache_argument: cache}
                  ).last_hidden_state
    # The last context token predicts every candidate's first reply token.
    first_logits = head(hidden[torch.arange(examples, device=device), starts - 1]).float()  # [examples, vocab]

    # 2. The replies, every candidate against its example's cached context.
    row_starts = starts.repeat_interleave(candidates)
    lengths = mask.sum(dim=1) - row_starts  # reply tokens per row
    reply_width = int(lengths.max())
    offsets = torch.arange(reply_width, device=device)
    reply_mask = offsets[None, :] < lengths[:, None]
    reply_ids = ids.gather(1, (row_starts[:, None] + offsets[None, :]).clamp(max=width - 1))
    first = reply_ids[:, 0]
    logp_first = first_logits.log_softmax(-1)[torch.arange(len(first), device=device) // candidates, first]
    total = torch.where(lengths > 0, logp_first, 0.0)
    # A reply's last token predicts nothing scored: the inputs stop one short.
    inputs = reply_width - 1
    row = column = torch.zeros(0, dtype=torch.long, device=device)
    rest_logits = first_logits.new_zeros(0, first_logits.shape[1])
    if inputs > 0:
        cache.batch_repeat_interleave(candidates)
        attention = torch.cat([context_mask.repeat_interleave(candidates, dim=0), reply_mask[:, :inputs].long()], 1)
        # Positions continue each context; padding gets 0 (any valid position: it is masked and never scored).
        positions = torch.where(reply_mask[:, :inputs], row_starts[:, None] + offsets[None, :inputs], 0)
        hidden = base(input_ids=reply_ids[:, :inputs], attention_mask=attention, position_ids=positions,
                      use_cache=True, **{cache_argument: cache}).last_hidden_state
        # Input j predicts reply token j + 1; project onto the vocabulary only there.
        row, column = (offsets[None, :inputs] < (lengths - 1)[:, None]).nonzero(as_tuple=True)
        rest_logits = head(hidden[row, column]).float()
        total = total.index_add(0, row, _log_likelihood(rest_logits, reply_ids[row, column + 1]))
    scores = (total / lengths.clamp(min=1)).view(examples, candidates)

    gold_rows = torch.arange(examples, device=device) * candidates + candidates - 1
    is_gold = row % candidates == candidates - 1
    gold_logits = torch.cat([first_logits, rest_logits[is_gold]])
    gold_targets = torch.cat([first[gold_rows], reply_ids[row[is_gold], column[is_gold] + 1]])
    return CandidateScores(scores, gold_logits, gold_targets)
