"""Tokenizer quirks that squeeze's data code must respect, decided from the tokenizer alone (task data
knows tokenizers, not models).

Byte-level BPE (GPT-2's, which OPT and distilgpt2 share; SmolLM2's too) marks a word start with a leading
space inside the token ("Ġfilm"), so words that arrive already split (NER) must carry that space, or every
word encodes as if glued to the previous one ("film" → "fil" + "m"). transformers 5 ignores
`add_prefix_space=True` given at call time, so the space is put on the words themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

_PROBE = ["Tom", "likes", "New", "York"]
_ATTR = "_squeeze_words_need_space"


def words_need_space(tokenizer) -> bool:
    """True when a pre-split word encodes differently alone than inside running text, and a leading space
    makes it encode as in running text. Measured once per tokenizer, so no tokenizer class is named here."""
    cached = getattr(tokenizer, _ATTR, None)
    if cached is None:
        running = tokenizer(" " + " ".join(_PROBE), add_special_tokens=False)["input_ids"]
        plain = tokenizer(_PROBE, is_split_into_words=True, add_special_tokens=False)["input_ids"]
        spaced = tokenizer([" " + w for w in _PROBE], is_split_into_words=True, add_special_tokens=False)["input_ids"]
        cached = plain != running and spaced == running
        setattr(tokenizer, _ATTR, cached)
    return cached


def words_as_in_text(tokenizer, sentences: Sequence[Sequence[str]]) -> list[list[str]]:
    """Pre-split sentences as the tokenizer must see them (is_split_into_words=True) for each word to encode
    as it does inside running text; word_ids() still maps every token to its word."""
    if words_need_space(tokenizer):
        return [[" " + w for w in words] for words in sentences]
    return [list(words) for words in sentences]
