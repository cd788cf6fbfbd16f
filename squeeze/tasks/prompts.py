"""How a scored example becomes a causal LM's input: a (context, continuation) pair encoded as
lm-evaluation-harness encodes it, k solved demonstrations put before the context (few-shot), and a prompt
too long for the model cut to fit. Shared by LAMBADA's last word (lm.py) and multiple choice (choice.py).

The pair: the continuation's tokens are those the whole text (context + continuation) has beyond the context's
own tokens, so a BPE merge across the boundary is scored as the text has it; an empty context is the
end-of-text token.

Few-shot (`shots` = k): each scored example gets k demonstrations, full solved examples drawn from a pool split
(the task's `shot_split`, else train, else validation, else the scored split itself: evaluate.py scoring one
file), never the example itself (no demonstration with its exact text). The draw is seeded by the run's seed
and the example's text, so an example gets the same demonstrations whatever else is loaded, in whatever order.
The prompt is `demo_1 + separator + ... + demo_k + separator + context`. Each piece is tokenized on its own,
the separator leading every piece after the first; with a byte-level BPE (GPT-2, Llama 3, SmolLM2) and a
whitespace separator those are the tokens of the whole string, and a demonstration is dropped by dropping
exactly its tokens, the example's own tokens never changing.

Too long for `max_length` (the model's context): demonstrations are dropped first, the farthest from the
example first, then the context loses tokens from the left; a continuation is never cut.
"""

from __future__ import annotations

import collections
import random
from typing import Mapping, Sequence

from squeeze.errors import SqueezeError

DEFAULT_SEPARATOR = "\n\n"


def start_token(tokenizer) -> int:
    """What stands for an empty context: the end-of-text token (BOS where a tokenizer has no EOS)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id


def encode_pairs(tokenizer, contexts: Sequence[str], continuations: Sequence[Sequence[str]]
                 ) -> list[tuple[list[int], list[list[int]]]]:
    """Per context: (its token ids, each of its continuations' token ids), encoded as the harness encodes a
    pair (module docstring). One tokenizer call for all contexts and one for all whole texts."""
    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    context_ids = ids(list(contexts))
    wholes = iter(ids([c + x for c, xs in zip(contexts, continuations) for x in xs]))
    # (No context: the whole text is the continuation, after the start token.)
    return [([start_token(tokenizer)] if not ctx else list(ctx), [list(next(wholes)[len(ctx):]) for _ in xs])
            for ctx, xs in zip(context_ids, continuations)]


def fit(demonstrations: Sequence[tuple[list[int], list[int]]], context: tuple[list[int], list[int]],
        room: int | None) -> tuple[list[int], int, bool]:
    """(prompt ids, demonstrations kept, whether the context was cut) for a prompt of at most `room` tokens
    (None: no limit). Each demonstration and the context come as (its ids alone, its ids after the
    separator): the first piece of a prompt is the former, every later one the latter."""
    for first in range(len(demonstrations) + 1):  # the farthest demonstrations go first
        kept = demonstrations[first:]
        if kept:
            ids = list(kept[0][0]) + [t for d in kept[1:] for t in d[1]] + list(context[1])
        else:
            ids = list(context[0])
        if room is None or len(ids) <= room:
            return ids, len(kept), False
    return ids[-room:], 0, True  # the context alone, still too long: cut from the left


def check_shots(shots, separator) -> None:
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise SqueezeError(f"task.data.shots={shots!r} must be a whole number >= 0 (demonstrations per example)")
    if not isinstance(separator, str):
        raise SqueezeError(f"task.data.shot_separator={separator!r} must be a string (e.g. '\\n\\n')")


def pool_split(loaded: Mapping[str, Sequence], preferred: str | None, scoring: str) -> str:
    """Which loaded split the demonstrations come from: `preferred`, else train, else validation, else the
    scored split itself (evaluate.py scoring one file loads nothing else)."""
    for name in (preferred, "train", "validation", scoring):
        if name and name in loaded and len(loaded[name]):
            return name
    return scoring


class Demonstrations:
    """The pool of solved examples (`texts`) an example's k demonstrations are drawn from, with their
    token ids (alone and after the separator) encoded once each, as they are first drawn."""

    def __init__(self, tokenizer, texts: Sequence[str], shots: int, seed: int, separator: str = DEFAULT_SEPARATOR,
                 split: str = "train"):
        self.tokenizer, self.texts, self.shots = tokenizer, list(texts), shots
        self.seed, self.separator, self.split = seed, separator, split
        self._count = collections.Counter(self.texts)
        self._ids: dict[int, tuple[list[int], list[int]]] = {}
        if shots > len(self.texts):
            raise SqueezeError(f"task.data.shots={shots} is more than the {len(self.texts)} solved examples of the "
                               f"{split!r} split that demonstrations are drawn from; lower task.data.shots")

    def draw(self, text: str) -> list[int]:
        """Pool indices of the demonstrations of the example whose solved text is `text` (never one with
        that text), in prompt order."""
        same = self._count.get(text, 0)
        if len(self.texts) - same < self.shots:
            raise SqueezeError(f"task.data.shots={self.shots} is more than the {len(self.texts) - same} solved "
                               f"examples of the {self.split!r} split left once the scored example is left out; "
                               "lower task.data.shots")
        rng = random.Random(f"{self.seed}\0{text}")
        # At most `same` of the drawn are the example itself, so k + same distinct draws hold k others.
        drawn = rng.sample(range(len(self.texts)), min(len(self.texts), self.shots + same))
        return [i for i in drawn if self.texts[i] != text][: self.shots]

    def ids(self, index: int) -> tuple[list[int], list[int]]:
        if index not in self._ids:
            text = self.texts[index]
            alone, after = self.tokenizer([text, self.separator + text], add_special_tokens=False)["input_ids"]
            self._ids[index] = (list(alone), list(after))
        return self._ids[index]

    def context_ids(self, context: str, alone: list[int]) -> tuple[list[int], list[int]]:
        """An example's context ids (`alone`, as encode_pairs gave them) and its ids after the separator."""
        if not self.shots:
            return alone, alone
        return alone, list(self.tokenizer(self.separator + context, add_special_tokens=False)["input_ids"])
