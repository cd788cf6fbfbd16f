"""Scoring an evaluation batch's candidate replies with each example's context encoded once.

A batch holds C rows per example, each the full context followed by one candidate (see encoding.py);
run as they are, the shared context is encoded C times, every row is padded to the batch's longest,
and the vocabulary projection runs on every position although only reply tokens are scored. Here
each example becomes one packed row, its context once and then each candidate's reply:

    [context | reply 1 | reply 2 | ... | reply C]

with an attention mask under which every reply token sees the context and the earlier tokens of its
own reply only, and position ids that continue the context in every reply; so each reply token gets
exactly the hidden state it has in its full row. The vocabulary projection runs only where a reply
token is predicted. (Why not the context's KV cache repeated across the candidates: chatterbot's
replies are most of the tokens, so padding them to the longest reply of the batch left about 1.6x
fewer tokens than the full rows; grouping replies by length recovered that only at the price of many
small model calls, which cost more than they save on CPU.) The numbers are those of the full rows up
to float rounding (tests/test_dialog.py and benchmarks/eval_overhead.py compare them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.tasks.base import IGNORE_INDEX
from squeeze.tasks.dialog.metrics import context_lengths, reply_scores


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


def _log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # = -cross_entropy(reduction="none") without writing out the [tokens, vocabulary] log-softmax.
    return logits.gather(1, targets[:, None])[:, 0] - logits.logsumexp(dim=-1)


def _packed_mask(segment: torch.Tensor) -> torch.Tensor:
    """[rows, 1, T, T] boolean attention mask of packed rows: a token sees earlier tokens of the context
    (segment 0) and of its own reply (segment i > 0); padding (segment -1) sees only itself, so no
    row of the attention is empty (that would put NaNs where the other rows would read them)."""
    width = segment.shape[1]
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    seen = causal & (key >= 0) & ((key == 0) | (key == query))
    return (seen | torch.eye(width, dtype=torch.bool, device=segment.device))[:, None]


@torch.no_grad()
def score_candidates(model: nn.Module, batch: Mapping[str, torch.Tensor], candidates: int) -> CandidateScores:
    """CandidateScores of a batch of C rows per example, each context encoded once (see the module
    docstring). `model`: a transformers causal LM (GPT-2, Llama, OPT families), in eval mode."""
    attention = getattr(model.config, "_attn_implementation", "eager")
    if attention not in ("sdpa", "eager"):  # e.g. flash attention, which takes no custom mask
        return scores_from_logits(model(**batch).logits, batch, candidates)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    device, width = ids.device, ids.shape[1]
    starts = context_lengths(batch["labels"], candidates)  # per example: context length = where its reply starts
    examples = starts.shape[0]
    row_starts = starts.repeat_interleave(candidates)
    lengths = mask.sum(dim=1) - row_starts  # reply tokens per row
    offsets = torch.arange(int(lengths.max()), device=device)
    reply_ids = ids.gather(1, (row_starts[:, None] + offsets[None, :]).clamp(max=width - 1))

    # The packed rows. A reply's last token predicts nothing scored: only its others are inputs.
    inputs = (lengths - 1).clamp(min=0).view(examples, candidates)
    reply_at = starts[:, None] + inputs.cumsum(dim=1) - inputs  # where each reply starts in its packed row
    packed_width = int((starts + inputs.sum(dim=1)).max())
    packed = torch.zeros(examples, packed_width, dtype=ids.dtype, device=device)
    segment = torch.full_like(packed, -1)
    position = torch.zeros_like(packed)
    context_width = int(starts.max())
    in_context = torch.arange(context_width, device=device)[None, :] < starts[:, None]
    packed[:, :context_width][in_context] = ids[candidates - 1 :: candidates, :context_width][in_context]
    segment[:, :context_width][in_context] = 0
    position[:, :context_width] = torch.arange(context_width, device=device)
    row, column = (offsets[None, :-1] < inputs.view(-1)[:, None]).nonzero(as_tuple=True)  # input j → token j + 1
    example, at = row // candidates, reply_at.view(-1)[row] + column
    packed[example, at] = reply_ids[row, column]
    segment[example, at] = row % candidates + 1
    position[example, at] = row_starts[row] + column

    allowed = _packed_mask(segment)
    if attention == "eager":  # eager attention adds its mask to the scores
        dtype = next(model.parameters()).dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    hidden = model.base_model(input_ids=packed, attention_mask=allowed, position_ids=position,
                              use_cache=False).last_hidden_state  # body to the final norm
    head = model.get_output_embeddings()  # the vocabulary projection, only where a reply token is predicted
    first_logits = head(hidden[torch.arange(examples, device=device), starts - 1]).float()  # the last context token
    rest_logits = head(hidden[example, at]).float()

    first = reply_ids[:, 0]
    logp_first = first_logits.log_softmax(-1)[torch.arange(len(first), device=device) // candidates, first]
    total = torch.where(lengths > 0, logp_first, 0.0)
    total = total.index_add(0, row, _log_likelihood(rest_logits, reply_ids[row, column + 1]))
    scores = (total / lengths.clamp(min=1)).view(examples, candidates)

    gold_rows = torch.arange(examples, device=device) * candidates + candidates - 1
    is_gold = row % candidates == candidates - 1
    gold_logits = torch.cat([first_logits, rest_logits[is_gold]])
    gold_targets = torch.cat([first[gold_rows], reply_ids[row[is_gold], column[is_gold] + 1]])
    return CandidateScores(scores, gold_logits, gold_targets)
