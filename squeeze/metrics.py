"""Metrics torchmetrics does not have: the perplexity evaluation protocols, entity-level F1 and
LAMBADA's last-word scores.

Accuracy, F1 and perplexity themselves come from torchmetrics; what is written here is how an LM
test set is cut into windows (the protocol decides the number), seqeval-style entity matching, and
the last word of a passage scored as a whole (all its tokens right, its summed log-likelihood).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torchmetrics import Metric

IGNORE_INDEX = -100
PROTOCOLS = ("blocks", "sliding")


def perplexity_windows(
    ids: Sequence[int], block_size: int, protocol: str = "blocks", stride: int | None = None
) -> Iterator[tuple[list[int], list[int]]]:
    """Cut a token stream into (input_ids, labels) windows for perplexity.

    blocks:  non-overlapping windows of `block_size`; each window's first token has no context and
             is not scored, so N - ceil(N / block_size) tokens are scored.
    sliding: windows of `block_size` that advance by `stride` < block_size; each token is scored
             once, in the first window where it is new, with up to block_size - 1 tokens of context
             (the transformers perplexity guide's protocol, made exact per token). N - 1 tokens
             are scored.
    Labels are the inputs with unscored positions set to IGNORE_INDEX; the model shifts them.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"perplexity protocol {protocol!r} is not one of {PROTOCOLS}")
    if block_size < 2:
        raise ValueError("block_size must be at least 2 to score anything")
    ids = list(ids)
    if protocol == "blocks":
        for start in range(0, len(ids), block_size):
            window = ids[start : start + block_size]
            if len(window) >= 2:
                yield window, [IGNORE_INDEX] + window[1:]
        return
    stride = stride or block_size // 2
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be in (0, block_size={block_size}], got {stride}")
    scored_until = 1  # token 0 never has context
    start = 0
    while scored_until < len(ids):
        end = min(start + block_size, len(ids))
        window = ids[start:end]
        new_from = scored_until - start  # positions before this were scored by earlier windows
        yield window, [IGNORE_INDEX] * new_from + window[new_from:]
        scored_until = end
        start += stride


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


# -- LAMBADA: the last word of a passage, given the rest ---------------------------------------------
def split_last_word(text: str) -> tuple[str, str]:
    """(context, target) as lm-evaluation-harness splits a LAMBADA passage: the target is the text after
    the last space, with that space. Trailing whitespace is dropped first (a local file's newline is not
    part of the word; the hub passages have none)."""
    text = text.rstrip()
    context, _, word = text.rpartition(" ")
    if not word:
        raise ValueError(f"a LAMBADA passage needs a last word: {text[:60]!r}")
    return context, " " + word


def encode_last_word(tokenizer, text: str, max_length: int) -> tuple[list[int], int, bool]:
    """A passage as (token ids, index of the target's first token, whether the context was cut).

    As the harness encodes a (context, continuation) pair: the target's tokens are those the whole text
    has beyond the context's own tokens (so a BPE merge across the boundary is scored as the text has it);
    an empty context is the end-of-text token. A passage longer than `max_length` loses context from
    the left, never target tokens."""
    context, target = split_last_word(text)
    whole = tokenizer(context + target, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    if not context_ids:
        start_token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        context_ids, whole = [start_token], [start_token] + whole
    target_ids = whole[len(context_ids):]
    if not target_ids or len(target_ids) >= max_length:
        raise ValueError(f"the last word {target!r} is {len(target_ids)} tokens; it needs 1 to {max_length - 1}")
    ids = context_ids + target_ids
    cut = len(ids) > max_length
    ids = ids[-max_length:]
    return ids, len(ids) - len(target_ids), cut


class LastWord(Metric):
    """LAMBADA's two scores, per passage as lm-evaluation-harness computes them: accuracy = the fraction
    of passages whose every target token is the model's argmax given the gold prefix (greedy decoding of
    the word); perplexity = exp(mean over passages of the target's summed NLL), so a perplexity per word,
    not per token. Written here because torchmetrics scores tokens, not a span as one unit."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("passages", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> None:
        """logits (batch, length, vocab) from input_ids (batch, length); target_mask marks target tokens."""
        # Position t predicts token t+1.
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        gold = input_ids[:, 1:]
        scored = target_mask[:, 1:].bool()
        nll = -logprobs.gather(-1, gold.unsqueeze(-1)).squeeze(-1)
        right = (logprobs.argmax(-1) == gold) | ~scored
        has_target = scored.any(-1)
        self.correct += (right.all(-1) & has_target).sum()
        self.passages += has_target.sum()
        self.nll += (nll * scored).sum(-1).double().sum()
        self.tokens += scored.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        passages = self.passages.clamp(min=1)
        return {"accuracy": self.correct.float() / passages, "perplexity": torch.exp(self.nll / passages).float()}
