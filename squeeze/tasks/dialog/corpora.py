"""Reading dialog corpora into conversations and examples: ChatterBot (YAML) and ConvAI2/Persona-Chat (JSON);
splitting by whole conversations; distractor replies sampled, seeded, from other conversations."""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from squeeze.errors import SqueezeError
from squeeze.tasks.sources import SPLITS

log = logging.getLogger("squeeze")


def _normal(text: str) -> str:
    # For comparing texts: case, punctuation and spacing aside.
    return re.sub(r"\W+", " ", text.lower()).strip()


def _turn_text(turn: Any) -> str | None:
    # YAML reads `- 1984` as a number; a turn is any scalar written as text.
    if isinstance(turn, bool) or turn is None or isinstance(turn, (list, dict)):
        return None
    text = " ".join(str(turn).split())  # one line per turn: the format is line-based
    return text or None


def read_chatterbot(paths: Sequence[str | Path], skip_malformed: bool = False) -> list[dict[str, Any]]:
    """ChatterBot corpus YAML files → conversations {personality, turns, where}.

    A file's `categories` become the persona ("I like to talk about ai, artificial intelligence.").
    A conversation needs at least two text turns (a statement and its reply)."""
    conversations, skipped = [], []
    for path in paths:
        try:
            # libyaml's loader where built in: ten times faster than the pure-Python one.
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            content = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=loader) or {}
        except yaml.YAMLError as e:
            raise SqueezeError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from e
        if not isinstance(content, dict) or not isinstance(content.get("conversations"), list):
            raise SqueezeError(f"{path} has no `conversations:` list; a ChatterBot corpus file has one")
        categories = [str(c) for c in content.get("categories") or []]
        persona = [f"I like to talk about {', '.join(categories).lower()}."] if categories else []
        for index, conversation in enumerate(content["conversations"]):
            where = f"{Path(path).name} conversation {index + 1}"
            turns = [_turn_text(t) for t in conversation] if isinstance(conversation, list) else [None]
            if len(turns) < 2 or any(t is None for t in turns):
                if not skip_malformed:
                    raise SqueezeError(
                        f"{where} has no reply turn (a conversation is a list of at least two text turns, got "
                        f"{conversation!r:.80}); fix the file or set task.data.skip_malformed=true")
                skipped.append(where)
                continue
            conversations.append({"personality": persona, "turns": turns, "where": where})
    if skipped:
        log.warning("dialog: skipped %d malformed conversation(s) without a reply turn, e.g. %s",
                    len(skipped), skipped[0])
    return conversations


def chatterbot_examples(conversation: Mapping[str, Any], conversation_id: int) -> list[dict[str, Any]]:
    """Every turn after the first is a reply to the turns before it."""
    turns = conversation["turns"]
    return [
        {"personality": list(conversation["personality"]), "history": turns[:i], "reply": turns[i],
         "distractors": [], "conversation": conversation_id, "where": conversation.get("where", "")}
        for i in range(1, len(turns))
    ]


def convai2_examples(conversation: Mapping[str, Any], conversation_id: int, where: str) -> list[dict[str, Any]]:
    """A ConvAI2 conversation {personality, utterances: [{history, candidates (gold last)}]} → examples."""
    if not isinstance(conversation, Mapping):
        raise SqueezeError(f"{where} is not in the ConvAI2 layout (a conversation is an object, got "
                           f"{type(conversation).__name__})")
    where = conversation.get("where", where)
    utterances = conversation.get("utterances")
    if not isinstance(conversation.get("personality"), list) or not isinstance(utterances, list):
        raise SqueezeError(f"{where} is not in the ConvAI2 layout (needs `personality` and `utterances` lists)")
    if not utterances:
        raise SqueezeError(f"{where} has no reply turn (empty `utterances`); drop it from the data")
    examples = []
    for i, utterance in enumerate(utterances):
        candidates = [_turn_text(c) for c in utterance.get("candidates") or []]
        history = [_turn_text(h) or "" for h in utterance.get("history") or []]
        if not candidates or candidates[-1] is None:
            raise SqueezeError(f"{where}, utterance {i + 1} has no reply turn (its `candidates` list must end with "
                               "the gold reply); fix the data")
        examples.append({"personality": [str(p) for p in conversation["personality"]], "history": history,
                         "reply": candidates[-1], "distractors": [c for c in candidates[:-1] if c is not None],
                         "conversation": conversation_id, "where": f"{where}, utterance {i + 1}"})
    return examples


def read_convai2(paths: Mapping[str, Sequence[str]]) -> dict[str, list[dict[str, Any]]]:
    """Local ConvAI2 JSON: a file holding {"train": [...], "valid": [...]} ("valid" is read as
    "validation"), or, per configured split, a file holding the list of conversations."""
    out: dict[str, list] = {}
    for split, files in paths.items():
        for path in files:
            try:
                content = json.loads(Path(path).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise SqueezeError(f"{path} is not valid JSON ({e}); fix the file") from e
            if isinstance(content, list):
                content = {split: content}
            if isinstance(content, dict) and all(isinstance(v, list) for v in content.values()):
                for name, conversations in content.items():
                    # ConvAI2 files call the validation split "valid"; the hub copies "validation".
                    out.setdefault("validation" if name == "valid" else name, []).extend(
                        {**c, "where": f"{Path(path).name} {name} conversation {i + 1}"} if isinstance(c, dict) else c
                        for i, c in enumerate(conversations))
            else:
                raise SqueezeError(f"{path} is not in the ConvAI2 layout ({{\"train\": [conversations], "
                                   "\"valid\": [...]}} or a list of conversations)")
    return out


def choose_splits(
    raw: Mapping[str, list],
    splits: Mapping[str, str | None] | None,
    carve: Mapping[str, float] | None,
    seed: int,
    group: Callable[[Any], Any] | None = None,
) -> dict[str, list]:
    """train/validation/test lists of conversations; a split mapped to null is carved out of train,
    seeded, in whole conversations, and whole groups of them when `group` names a conversation's
    group (ChatterBot: its opening turn, so a question answered in several conversations is never
    both trained on and tested)."""
    splits = dict(splits or {s: s for s in SPLITS})
    carve = dict(carve or {})
    train_name = splits.get("train") or "train"
    if train_name not in raw:
        raise SqueezeError(f"the dialog data has no split {train_name!r} (has {sorted(raw)}); fix task.data.splits")
    groups: dict[Any, list] = {}
    for i, conversation in enumerate(raw[train_name]):
        groups.setdefault(group(conversation) if group else i, []).append(conversation)
    pool = list(groups.values())
    random.Random(seed).shuffle(pool)
    out = {}
    for split in ("test", "validation"):
        source = splits.get(split)
        if source:
            if source not in raw:
                raise SqueezeError(f"the dialog data has no split {source!r} (has {sorted(raw)}); fix task.data.splits")
            out[split] = list(raw[source])
            continue
        wanted = max(1, round(sum(map(len, pool)) * float(carve.get(split, 0.1))))
        taken = 0
        while taken < wanted and len(pool) > 1:
            taken += len(pool[0])
            out.setdefault(split, []).extend(pool.pop(0))
        if taken < wanted:
            raise SqueezeError(f"cannot carve {split} out of the training conversations that are left; add data or "
                               f"lower task.data.carve.{split}")
    out["train"] = [c for g in pool for c in g]
    return out


def drop_duplicates(conversations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ChatterBot repeats some conversations word for word (tech_support.yml ~100 times each); a
    repeat would put the same example in train and test. The first of each is kept."""
    seen, out = set(), []
    for c in conversations:
        key = tuple(_normal(t) for t in c["turns"])
        if key not in seen:
            seen.add(key)
            out.append(c)
    if len(out) < len(conversations):
        log.info("dialog: dropped %d repeated conversations (%d left)", len(conversations) - len(out), len(out))
    return out


def sample_distractors(
    examples: list[dict[str, Any]], pool: Sequence[tuple[str, int]], count: int, rng: random.Random,
) -> None:
    """Give each example `count` distractors drawn from `pool` (text, conversation id): never from its
    own conversation, never a text equal to its reply (a tie the ranking could not break)."""
    unique: dict[str, tuple[str, int]] = {}
    for text, conversation in pool:
        unique.setdefault(_normal(text), (text, conversation))
    choices = [(key, text, conversation) for key, (text, conversation) in unique.items()]
    for example in examples:
        gold, own = _normal(example["reply"]), example["conversation"]
        allowed = [i for i in rng.sample(range(len(choices)), min(len(choices), count + 8))
                   if choices[i][2] != own and choices[i][0] != gold]
        if len(allowed) < count:  # the few spare draws did not cover the excluded ones: filter them all
            rest = [i for i, (key, _, c) in enumerate(choices) if c != own and key != gold and i not in allowed]
            allowed += rng.sample(rest, min(len(rest), count - len(allowed)))
        picked = [choices[i][1] for i in allowed[:count]]
        if len(picked) < count:
            raise SqueezeError(f"only {len(picked)} distractor replies available for {example['where']}, "
                               f"{count} needed; lower task.data.num_candidates or add conversations")
        example["distractors"] = picked
