"""Tokenizer quirks that squeeze's data code must respect, decided from the tokenizer alone (task data
knows tokenizers, not models).

Byte-level BPE (GPT-2's, which OPT and distilgpt2 share) marks a word start with a leading space, so
words that arrive already split (NER) must be told so, or every word encodes as if glued to the previous.
"""

from __future__ import annotations

from typing import Any


def word_split_kwargs(tokenizer) -> dict[str, Any]:
    """Extra tokenizer arguments for input given as a list of words (is_split_into_words=True)."""
    byte_level = getattr(tokenizer, "add_prefix_space", None) is not None or "gpt2" in type(tokenizer).__name__.lower()
    return {"add_prefix_space": True} if byte_level else {}
