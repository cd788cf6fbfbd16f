"""Encoding a dialog example as model input: one text per candidate reply, "Persona: … / User: … / Bot:
<reply><eos>", labels on the gold reply's tokens only."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from squeeze.errors import SqueezeError
from squeeze.tasks.base import IGNORE_INDEX


def _special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text by itself (Llama's BOS; nothing for GPT-2)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def dialog_texts(
    persona: Sequence[str],
    history: Sequence[str],
    candidates: Sequence[str],
    max_history: int = 5,
    speakers: Sequence[str] = ("User", "Bot"),
    persona_prefix: str = "Persona",
) -> dict[str, Any]:
    """The text pieces of one example, before tokenizing: persona lines and the last `max_history`
    turns as (segment, text), the reply speaker's prefix, and each candidate reply. Speakers
    alternate backwards from the reply, whose speaker is speakers[1]."""
    user, bot = speakers
    turns = list(history)[-max_history:] if max_history > 0 else []
    lines = [("persona", f"{persona_prefix}: {p.strip()}\n") for p in persona]
    for back in range(len(turns), 0, -1):  # the turn just before the reply is the other speaker's
        speaker = user if back % 2 == 1 else bot
        lines.append((speaker, f"{speaker}: {turns[-back].strip()}\n"))
    return {"lines": lines, "prompt": (bot, f"{bot}:"), "replies": [" " + c.strip() for c in candidates]}


def encode_dialog(
    tokenizer,
    persona: Sequence[str],
    history: Sequence[str],
    candidates: Sequence[str],
    max_length: int = 256,
    max_history: int = 5,
    max_reply_tokens: int = 48,
    speakers: Sequence[str] = ("User", "Bot"),
    persona_prefix: str = "Persona",
    tokenize: Callable[[str], list[int]] | None = None,
    start_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One shared context and the token ids of each candidate reply.

    The context is the persona lines, the last `max_history` turns (speakers alternate backwards from
    the reply, whose speaker is speakers[1]) and the reply speaker's prefix. A reply is cut to
    `max_reply_tokens` (and ends with EOS when it fits whole). When context + the longest candidate
    exceed `max_length`, the oldest turns go first, then the context is cut from the left.
    Returns {"context": ids, "segments": one label per context token, "candidates": [ids, ...]}.
    `tokenize` (text → ids without special tokens) and `start_ids` (what the tokenizer puts first, e.g.
    BOS) let a caller supply ids it computed in bulk."""
    tokenize = tokenize or (lambda text: _ids(tokenizer, text))
    texts = dialog_texts(persona, history, candidates, max_history, speakers, persona_prefix)
    eos = tokenizer.eos_token_id
    replies = []
    for text in texts["replies"]:
        ids = tokenize(text)
        replies.append(ids + [eos] if len(ids) < max_reply_tokens and eos is not None else ids[:max_reply_tokens])
    pieces = [("start", list(_special_prefix(tokenizer) if start_ids is None else start_ids))]
    pieces += [(segment, tokenize(text)) for segment, text in texts["lines"] if segment == "persona"]
    history_pieces = [(segment, tokenize(text)) for segment, text in texts["lines"] if segment != "persona"]
    prompt = (texts["prompt"][0], tokenize(texts["prompt"][1]))
    budget = max_length - max(len(r) for r in replies) - len(prompt[1])
    if max_length - max_reply_tokens - len(prompt[1]) < 1:  # the setting, whatever this example's replies
        raise SqueezeError(f"task.data.max_length={max_length} leaves no room for the context next to a "
                           f"{max_reply_tokens}-token reply; raise max_length or lower max_reply_tokens")
    while len(history_pieces) > 1 and sum(len(ids) for _, ids in pieces + history_pieces) > budget:
        history_pieces.pop(0)  # the oldest turn
    context, segments = [], []
    for segment, ids in pieces + history_pieces:
        context += ids
        segments += [segment] * len(ids)
    context, segments = context[-budget:], segments[-budget:]
    context += prompt[1]
    segments += [prompt[0]] * len(prompt[1])
    return {"context": context, "segments": segments, "candidates": replies}


def candidate_rows(encoded: Mapping[str, Any]) -> list[dict[str, list[int]]]:
    """Rows of one example: context + each candidate; only the last (gold) row carries labels."""
    context, candidates = encoded["context"], encoded["candidates"]
    rows = []
    for i, reply in enumerate(candidates):
        gold = i == len(candidates) - 1
        rows.append({"input_ids": context + reply,
                     "labels": [IGNORE_INDEX] * len(context) + (reply if gold else [IGNORE_INDEX] * len(reply))})
    return rows
