"""Persona-grounded dialog, ConvAI2 style: persona sentences + dialog history → the next utterance.

Data: Persona-Chat (hub, or a local JSON in the ConvAI2 layout) or the offline ChatterBot corpus
(YAML), whose distractor candidates are sampled, seeded, from other conversations' replies.

Input: one text per candidate reply, with plain-text speaker prefixes (no added tokens, so the
saved model is the base architecture with its own tokenizer, zero-shot models read the format, and
a teacher or a speculative-decoding draft shares the vocabulary):

    Persona: i like to ski.
    User: hi! what do you do for fun?
    Bot: <candidate reply><eos>

Batches hold only what a causal LM takes (input_ids, attention_mask, labels), so every compressor
sees the same batches as on the other tasks: an example is C consecutive rows, one per candidate,
the gold reply last; labels are the gold reply's tokens and -100 everywhere else (context, padding
and distractor rows). `model(**batch).loss` is therefore the reply LM loss.

Training adds a next-utterance classification loss (a linear head on the last token's hidden state,
over the C candidates), kept in the LightningModule: it is in the Lightning checkpoint but not in
the saved model, which stays a plain causal LM. Hits@k ranks candidates by the LM's mean
log-likelihood of each reply, so it means the same for a fine-tuned, a compressed, a reloaded or
a zero-shot model.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchmetrics.text import Perplexity, SacreBLEUScore, TranslationEditRate

from squeeze import assets
from squeeze.data import SPLITS, TaskData, load_splits, resolve_data_files
from squeeze.errors import SqueezeError
from squeeze.metrics import IGNORE_INDEX
from squeeze.modules import STAGES, FineTune

log = logging.getLogger("squeeze")


# -- reading conversations ------------------------------------------------------------------------
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


# -- distractors ----------------------------------------------------------------------------------
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


# -- input building -------------------------------------------------------------------------------
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


def build_input(tokenizer, persona: Sequence[str], history: Sequence[str], reply: str, **settings) -> dict[str, list]:
    """The training input of one reply: input_ids, labels (-100 outside the reply) and segments
    (persona, the speaker of each turn, "reply") for each token."""
    encoded = encode_dialog(tokenizer, persona, history, [reply], **settings)
    context, reply_ids = encoded["context"], encoded["candidates"][0]
    return {
        "input_ids": context + reply_ids,
        "labels": [IGNORE_INDEX] * len(context) + reply_ids,
        "segments": encoded["segments"] + ["reply"] * len(reply_ids),
    }


def candidate_rows(encoded: Mapping[str, Any]) -> list[dict[str, list[int]]]:
    """Rows of one example: context + each candidate; only the last (gold) row carries labels."""
    context, candidates = encoded["context"], encoded["candidates"]
    rows = []
    for i, reply in enumerate(candidates):
        gold = i == len(candidates) - 1
        rows.append({"input_ids": context + reply,
                     "labels": [IGNORE_INDEX] * len(context) + (reply if gold else [IGNORE_INDEX] * len(reply))})
    return rows


# -- Hits@k ---------------------------------------------------------------------------------------
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


# -- data module ----------------------------------------------------------------------------------
class DialogData(TaskData):
    """Dialog examples as groups of candidate rows (see the module docstring).

    `batch_size` / `eval_batch_size` count rows (sequences), as on the other tasks, so memory per
    batch is alike: a batch holds max(1, rows // candidates) examples. Training uses
    `train_candidates` per example (gold + distractors, for the classification loss); validation
    and test use `num_candidates` (Hits@k needs k ≤ num_candidates).
    """

    length_key = "max_length"

    def __init__(
        self,
        tokenizer,
        source: str = "chatterbot",
        max_length: int = 256,
        max_history: int = 5,
        max_reply_tokens: int = 48,
        num_candidates: int = 20,
        train_candidates: int = 2,
        speakers: Sequence[str] = ("User", "Bot"),
        persona_prefix: str = "Persona",
        skip_malformed: bool = False,
        **kwargs,
    ):
        super().__init__(tokenizer, source=source, **kwargs)
        if num_candidates < 1 or train_candidates < 1:
            raise SqueezeError("task.data.num_candidates and task.data.train_candidates must be at least 1")
        if len(speakers) != 2 or any(not str(s).strip() for s in speakers):
            raise SqueezeError(f"task.data.speakers={list(speakers)} must name two speakers (other, reply)")
        self.settings = {"max_length": max_length, "max_history": max_history, "max_reply_tokens": max_reply_tokens,
                         "speakers": tuple(str(s) for s in speakers), "persona_prefix": persona_prefix}
        self.max_length = max_length
        self.num_candidates, self.train_candidates = num_candidates, train_candidates
        self.skip_malformed = skip_malformed
        self.examples: dict[str, list[dict[str, Any]]] = {}

    @property
    def input_length(self) -> int:
        return self.max_length

    def candidates_per_example(self, split: str) -> int:
        return self.train_candidates if split == "train" else self.num_candidates

    # -- loading --------------------------------------------------------------------------------
    def conversations(self) -> dict[str, list[dict[str, Any]]]:
        """train/validation/test conversations, each turned into examples by `_examples`."""
        if self.source == "chatterbot":
            files = resolve_data_files(self.data_files, self.asset)
            if files is None:
                if not self.asset:
                    raise SqueezeError("source chatterbot reads YAML files: set task.data.asset or "
                                       "task.data.data_files")
                files = {"train": sorted(str(p) for p in assets.locate(self.asset).glob("*.yml"))}
                if not files["train"]:
                    raise SqueezeError(f"no *.yml files in {assets.locate(self.asset)}")
            raw = {split: drop_duplicates(read_chatterbot(paths, self.skip_malformed))
                   for split, paths in files.items()}
            return choose_splits(raw, self.splits, self.carve, self.seed, group=lambda c: _normal(c["turns"][0]))
        elif self.source == "convai2":
            files = resolve_data_files(self.data_files, self.asset)
            if not files:
                raise SqueezeError("source convai2 reads a local ConvAI2 JSON file: set task.data.data_files")
            raw = read_convai2(files)
        else:
            rows = load_splits(self.source, self.name, None, self.splits, self.carve, self.seed, self.hub_files)
            return {split: rows[split].to_list() for split in SPLITS}
        return choose_splits(raw, self.splits, self.carve, self.seed)

    def _examples(self, conversations: list[dict[str, Any]], split: str, first_id: int) -> list[dict[str, Any]]:
        out = []
        for i, conversation in enumerate(conversations):
            if isinstance(conversation, Mapping) and "turns" in conversation:
                out += chatterbot_examples(conversation, first_id + i)
            else:
                out += convai2_examples(conversation, first_id + i, f"{split} conversation {i + 1}")
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        by_split = self.conversations()
        first_id = 0
        for split in SPLITS:
            examples = self._examples(by_split[split], split, first_id)
            first_id += len(by_split[split])
            if not examples:
                raise SqueezeError(f"split {split!r} has no dialog examples; check task.data.data_files / splits")
            self.examples[split] = examples
        # Distractors for sources without candidates (ChatterBot): replies of other conversations, any split.
        pool = [(e["reply"], e["conversation"]) for split in SPLITS for e in self.examples[split]]
        for split in SPLITS:
            examples = self.examples[split]
            limit = self.max_examples.get(split)
            if limit is not None and limit < len(examples):
                examples = random.Random(f"{self.seed}/{split}").sample(examples, limit)
            needed = self.candidates_per_example(split) - 1
            if self.source == "chatterbot":
                sample_distractors(examples, pool, needed, random.Random(f"{self.seed}/{split}/distractors"))
            self.examples[split] = examples
            self.datasets[split] = self.encode(examples, split)

    def chosen_candidates(self, example: Mapping[str, Any], split: str) -> list[str]:
        distractors = self.candidates_per_example(split) - 1
        have = example["distractors"]
        if len(have) < distractors:
            raise SqueezeError(f"{example['where']} has {len(have) + 1} candidates, {distractors + 1} needed (Hits@k "
                               "needs k candidates); lower task.data.num_candidates / train_candidates")
        # As ConvAI2 baselines do: the distractors nearest the gold (the last ones), gold last.
        return (have[-distractors:] if distractors else []) + [example["reply"]]

    def encode(self, examples, split):
        chosen = [self.chosen_candidates(e, split) for e in examples]
        # Every distinct text piece tokenized in one call (fast tokenizers batch it), then assembled.
        format_settings = {k: self.settings[k] for k in ("max_history", "speakers", "persona_prefix")}
        pieces: set[str] = set()
        for example, candidates in zip(examples, chosen):
            texts = dialog_texts(example["personality"], example["history"], candidates, **format_settings)
            pieces.update(text for _, text in texts["lines"])
            pieces.update(texts["replies"] + [texts["prompt"][1]])
        pieces_list = sorted(pieces)
        ids = dict(zip(pieces_list, self.tokenizer(pieces_list, add_special_tokens=False)["input_ids"]))
        out, start = [], _special_prefix(self.tokenizer)
        for example, candidates in zip(examples, chosen):
            encoded = encode_dialog(self.tokenizer, example["personality"], example["history"], candidates,
                                    tokenize=lambda text: list(ids[text]), start_ids=start, **self.settings)
            out.append({"rows": candidate_rows(encoded), "context_length": len(encoded["context"])})
        return out

    # -- batching -------------------------------------------------------------------------------
    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [row for f in features for row in f["rows"]]
        width = max(len(r["input_ids"]) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # right padding: every row of an example shares its context positions
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        rows = self.batch_size if split == "train" else self.eval_batch_size
        return DataLoader(self.datasets[split], batch_size=max(1, rows // self.candidates_per_example(split)),
                          shuffle=shuffle, collate_fn=self.collate, num_workers=self.num_workers)

    def perf_dataloader(self) -> DataLoader:
        """Test examples as one row each (context + gold reply): what inference latency is measured on."""
        gold = [{"rows": f["rows"][-1:]} for f in self.datasets["test"]]
        return DataLoader(gold, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate)

    def generation_prompts(self, split: str = "test", count: int | None = None) -> list[list[int]]:
        """Context token ids (persona, history, reply speaker) of the first `count` examples."""
        features = self.datasets[split][:count] if count else self.datasets[split]
        return [f["rows"][-1]["input_ids"][: f["context_length"]] for f in features]


# -- LightningModule ------------------------------------------------------------------------------
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each right-padded row's last real token."""
    return attention_mask.sum(dim=1).clamp(min=1) - 1


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


def _generation_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    settings = dict(settings)
    if not settings.get("do_sample", False):  # sampling knobs would only raise "unused flag" warnings
        for key in ("temperature", "top_p", "top_k"):
            settings.pop(key, None)
    return settings


class DialogModule(FineTune):
    """Fine-tunes a causal LM on replies (LM loss) plus next-utterance classification (MC loss).

    loss = lm_coef · reply LM loss + mc_coef · cross-entropy of the MC head over the candidates.
    Validation/test: reply perplexity and Hits@k (candidates ranked by mean reply log-likelihood);
    on the stages in `generate_on`, replies are generated from the context with `generate` settings
    and scored against the gold reply by BLEU and TER (sacreBLEU's definitions, 0-100) and
    BERTScore F1 with a local encoder (`bertscore`: an asset name or a model directory; null skips it).
    """

    def __init__(
        self,
        model: nn.Module,
        lm_coef: float = 2.0,
        mc_coef: float = 1.0,
        train_candidates: int = 2,
        eval_candidates: int = 20,
        hits_at: Sequence[int] = (1, 5, 10),
        generate: Mapping[str, Any] | None = None,
        generate_on: Sequence[str] = ("test",),
        bertscore: str | None = "minilm",
        bertscore_batch_size: int = 32,
        tokenizer=None,
        **kwargs,
    ):
        if mc_coef > 0 and train_candidates < 2:
            raise SqueezeError("task.module.mc_coef>0 needs distractors: set task.data.train_candidates>=2 "
                               "or task.module.mc_coef=0")
        if lm_coef < 0 or mc_coef < 0 or lm_coef + mc_coef == 0:
            raise SqueezeError(f"task.module.lm_coef={lm_coef} and mc_coef={mc_coef} must be >= 0, not both 0")
        unknown = set(generate_on) - set(STAGES)
        if unknown:
            raise SqueezeError(f"task.module.generate_on has {sorted(unknown)}; use stages from {list(STAGES)}")
        self.lm_coef, self.mc_coef = lm_coef, mc_coef
        self.train_candidates, self.eval_candidates = train_candidates, eval_candidates
        self.hits_at = [int(k) for k in hits_at]
        for k in self.hits_at:
            if k > eval_candidates:
                raise SqueezeError(f"Hits@{k} needs at least {k} candidates per example but task.data.num_candidates="
                                   f"{eval_candidates}; raise it or drop {k} from task.module.hits_at")
        self.generate_settings = dict(generate or {"do_sample": False, "max_new_tokens": 32})
        self.generate_on = tuple(generate_on)
        self.bertscore_path = _bertscore_location(bertscore) if bertscore else None
        self.bertscore_batch_size = bertscore_batch_size
        super().__init__(model, **kwargs)
        self.tokenizer = tokenizer
        self._stop_ids: list[int] | None = None
        # The MC head lives here, not in the model: the saved model stays a plain causal LM.
        self.mc_head = nn.Linear(model.config.hidden_size, 1)

    def setup(self, stage: str) -> None:
        if self.tokenizer is None and self.trainer.datamodule is not None:
            self.tokenizer = self.trainer.datamodule.tokenizer

    # -- metrics ---------------------------------------------------------------------------------
    def make_metrics(self) -> nn.Module:
        metrics = {"perplexity": Perplexity(ignore_index=IGNORE_INDEX), "hits": HitsAtK(self.hits_at),
                   "bleu": SacreBLEUScore(), "ter": TranslationEditRate()}
        if self.bertscore_path is not None:
            from torchmetrics.text import BERTScore

            metrics["bertscore"] = BERTScore(model_name_or_path=self.bertscore_path,
                                             batch_size=self.bertscore_batch_size, max_length=256, truncation=True)
        return nn.ModuleDict(metrics)

    def update_metrics(self, metrics, batch, outputs):
        candidates = self.eval_candidates
        if batch["input_ids"].shape[0] % candidates:
            raise SqueezeError(f"a dialog batch of {batch['input_ids'].shape[0]} rows is not groups of "
                               f"{candidates} candidates; task.module.eval_candidates must be task.data.num_candidates")
        logits = outputs.logits
        metrics["hits"].update(reply_scores(logits, batch, candidates))
        # Reply perplexity from the labelled (gold reply) positions only: the rest would be ignored anyway.
        row, column = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        metrics["perplexity"].update(logits[row, column].float()[None], batch["labels"][row, column + 1][None])
        stage = next((s for s in STAGES if self.metrics[s] is metrics), None)
        if stage in self.generate_on:
            self.update_generation(metrics, batch, candidates)

    def update_generation(self, metrics, batch, candidates: int) -> None:
        if self.tokenizer is None:
            raise SqueezeError("dialog generation metrics need the tokenizer, which DialogModule takes from the data "
                               "module at setup; pass tokenizer= or set task.module.generate_on=[]")
        gold_ids = batch["input_ids"][candidates - 1 :: candidates]
        gold_labels = batch["labels"][candidates - 1 :: candidates]
        starts = context_lengths(batch["labels"], candidates).tolist()
        prompts = [row[:start].tolist() for row, start in zip(gold_ids, starts)]
        references = [self.tokenizer.decode(lab[lab != IGNORE_INDEX], skip_special_tokens=True).strip()
                      for lab in gold_labels]
        replies = self.generate_replies(prompts)
        metrics["bleu"].update(replies, [[r] for r in references])
        metrics["ter"].update(replies, [[r] for r in references])
        if "bertscore" in metrics:
            metrics["bertscore"].update(replies, references)

    @torch.no_grad()
    def generate_replies(self, prompts: Sequence[Sequence[int]]) -> list[str]:
        """Greedy or sampled replies (per `generate`) to context prompts, cut at the end of the line."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        device = next(self.model.parameters()).device
        # Left padding: every prompt ends where generation starts.
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = self.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad,
                                  eos_token_id=self.stop_ids(), **_generation_kwargs(self.generate_settings))
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [t.split("\n", 1)[0].strip() for t in texts]

    def stop_ids(self) -> list[int]:
        """EOS and every token that holds a line break: a reply is one line. (transformers'
        stop_strings would do the same but rebuilds a vocabulary table on every generate call.)"""
        if self._stop_ids is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._stop_ids = [self.tokenizer.eos_token_id] + [i for i, t in enumerate(texts) if "\n" in t]
        return self._stop_ids

    def compute_metrics(self, metrics):
        out = {"perplexity": metrics["perplexity"].compute(), **metrics["hits"].compute()}
        if metrics["bleu"].update_count:
            out["bleu"] = metrics["bleu"].compute() * 100
            out["ter"] = metrics["ter"].compute() * 100
        if "bertscore" in metrics and metrics["bertscore"].update_count:
            metrics["bertscore"].embedding_device = metrics["bertscore"].device  # the run's device
            scores = metrics["bertscore"].compute()
            for part in ("precision", "recall", "f1"):
                out[f"bertscore_{part}"] = torch.as_tensor(scores[part]).float().mean()
        return out

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rows = batch["input_ids"].shape[0]
        if rows % self.train_candidates:
            raise SqueezeError(f"a dialog training batch of {rows} rows is not groups of {self.train_candidates} "
                               "candidates; task.module.train_candidates must be task.data.train_candidates")
        outputs = self.model(**batch, output_hidden_states=self.mc_coef > 0)
        parts = {"lm_loss": outputs.loss}
        loss = self.lm_coef * outputs.loss
        if self.mc_coef > 0:
            last = outputs.hidden_states[-1][torch.arange(rows, device=self.device),
                                             last_token_index(batch["attention_mask"])]
            mc_logits = self.mc_head(last.to(self.mc_head.weight.dtype)).view(-1, self.train_candidates)
            gold = torch.full((mc_logits.shape[0],), self.train_candidates - 1, device=self.device)
            parts["mc_loss"] = F.cross_entropy(mc_logits, gold)
            loss = loss + self.mc_coef * parts["mc_loss"]
        parts["loss"] = loss
        self.check_finite(loss)
        for name, value in parts.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=rows // self.train_candidates)
        return loss


def _bertscore_location(name_or_path: str) -> str:
    """An offline asset name (minilm) or a local model directory for BERTScore's encoder."""
    if name_or_path in assets.ASSETS:
        try:
            return str(assets.locate(name_or_path))
        except SqueezeError as e:
            raise SqueezeError(f"{e}; or skip BERTScore with task.module.bertscore=null") from e
    path = Path(str(name_or_path)).expanduser()
    if not (path / "config.json").exists():
        raise SqueezeError(f"task.module.bertscore={name_or_path} is neither an asset ({', '.join(assets.ASSETS)}) "
                           "nor a model directory with config.json; set it to minilm, a directory, or null")
    return str(path)

