"""Causal language modelling over a token stream, and LAMBADA's last word of a passage.

Perplexity itself comes from torchmetrics; written here is how a test stream is cut into windows (the
protocol decides the number) and the last word of a passage scored as a whole (all its tokens right, its
summed log-likelihood), as lm-evaluation-harness scores LAMBADA.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.text import Perplexity

from squeeze.errors import SqueezeError
from squeeze.tasks.base import IGNORE_INDEX, FineTune, TaskData, max_positions
from squeeze.tasks.prompts import DEFAULT_SEPARATOR, Demonstrations, check_shots, encode_pairs, fit, pool_split


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

    As the harness encodes a (context, continuation) pair (squeeze.tasks.prompts.encode_pairs): the target's
    tokens are those the whole text has beyond the context's own tokens; an empty context is the end-of-text
    token. A passage longer than `max_length` loses context from the left, never target tokens."""
    context, target = split_last_word(text)
    [(context_ids, [target_ids])] = encode_pairs(tokenizer, [context], [[target]])
    ids, _, cut = _fit_passage(context_ids, target_ids, target, max_length)
    return ids, len(ids) - len(target_ids), cut


def _fit_passage(context_ids: list[int], target_ids: list[int], target: str, max_length: int,
                 demonstrations: Sequence[tuple[list[int], list[int]]] = (),
                 context_after: list[int] | None = None) -> tuple[list[int], int, bool]:
    """(ids, demonstrations kept, context cut): the prompt (prompts.fit) and the target, at most `max_length`."""
    if not target_ids or len(target_ids) >= max_length:
        raise ValueError(f"the last word {target!r} is {len(target_ids)} tokens; it needs 1 to {max_length - 1}")
    prompt, kept, cut = fit(demonstrations, (context_ids, context_after or context_ids), max_length - len(target_ids))
    return prompt + target_ids, kept, cut


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


# -- the data modules --------------------------------------------------------------------------------
class LanguageModelingData(TaskData):
    """Causal LM over a token stream: training on non-overlapping blocks, evaluation by protocol.

    The protocol (`blocks` or `sliding` with `stride`) decides which tokens are scored with how much
    context, and so the perplexity; it is written into every result that reports perplexity.
    """

    length_key = "block_size"
    sample_rows = False

    def __init__(
        self,
        tokenizer,
        text_column: str = "text",
        block_size: int = 256,
        protocol: str = "blocks",
        stride: int | None = None,
        **kwargs,
    ):
        super().__init__(tokenizer, **kwargs)
        if protocol not in PROTOCOLS:
            raise SqueezeError(f"task.data.protocol={protocol!r} is not one of {list(PROTOCOLS)}")
        if stride is not None and not 0 < stride <= block_size:
            raise SqueezeError(f"task.data.stride={stride} must be in (0, block_size={block_size}]")
        self.text_column = text_column
        self.block_size = block_size
        self.protocol = protocol
        self.stride = stride if stride is not None else block_size // 2
        self.scored_tokens: dict[str, int] = {}

    @property
    def input_length(self) -> int:
        return self.block_size

    @property
    def protocol_record(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "block_size": self.block_size,
            "stride": self.stride if self.protocol == "sliding" else None,
            "scored_tokens": self.scored_tokens.get("test"),
        }

    def token_stream(self, rows) -> list[int]:
        if self.text_column not in rows.column_names:
            raise SqueezeError(f"the data has no column {self.text_column!r} (has {rows.column_names})")
        # Line-based sources (`text` builder) drop newlines; put them back so the stream is the text.
        texts = [t if t.endswith("\n") else t + "\n" for t in rows[self.text_column] if t is not None]
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return list(itertools.chain.from_iterable(enc))

    def encode(self, rows, split):
        ids = self.token_stream(rows)
        if split == "train":
            n = len(ids) // self.block_size * self.block_size
            blocks = [ids[i : i + self.block_size] for i in range(0, n, self.block_size)]
            if not blocks:
                raise SqueezeError(
                    f"the train split has {len(ids)} tokens, fewer than one block of {self.block_size}"
                )
            return [{"input_ids": b, "labels": b} for b in blocks]
        windows = list(perplexity_windows(ids, self.block_size, self.protocol, self.stride))
        self.scored_tokens[split] = sum(sum(1 for x in lab if x != IGNORE_INDEX) for _, lab in windows)
        return [{"input_ids": w, "labels": lab} for w, lab in windows]

    def calibration_source(self, files=None):
        """The text as token sequences: the train split's blocks in order, or the stream of `files`
        (calibration.data_files); calibration cuts its own windows."""
        if files is None:
            return [f["input_ids"] for f in self.datasets["train"]]
        return [self.read_calibration_files(files, self.token_stream)]

    def collate(self, features):
        width = max(len(f["input_ids"]) for f in features)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class LastWordData(LanguageModelingData):
    """LAMBADA: trains on blocks of the text stream like any LM task; validation and test are passages
    scored one by one (no stream, no context across passages): the last word (its tokens, with the space
    before it) is the target, everything before it the context (encode_last_word, above).

    A passage is one example: input_ids, labels (the passage's tokens, for the passages' perplexity) and
    target_mask (1 on the target's tokens, for LastWordLM below). A passage longer than
    `max_length` tokens loses context from the left (how many did is recorded); `max_length=None` is the
    model's context, as the harness has it (block_size until the run hands the model to check_model).

    `shots` > 0: each passage is preceded by that many other whole passages, joined by `shot_separator`
    (squeeze.tasks.prompts: drawn with the run's seed from `shot_split`, never the passage itself; dropped
    first when the prompt is too long). They are context only: the perplexity scores the passage's tokens, its
    first one too (it has context then).
    """

    def __init__(self, tokenizer, max_length: int | None = None, shots: int = 0, shot_split: str | None = None,
                 shot_separator: str = DEFAULT_SEPARATOR, **kwargs):
        super().__init__(tokenizer, **kwargs)
        if max_length is not None and max_length < 2:
            raise SqueezeError(f"task.data.max_length={max_length} must be at least 2 (a context and a word)")
        check_shots(shots, shot_separator)
        self.max_length = max_length
        self.shots, self.shot_split, self.shot_separator = shots, shot_split, shot_separator
        self.passages: dict[str, dict[str, Any]] = {}

    def check_model(self, model) -> None:
        super().check_model(model)
        limit = max_positions(model.config)
        if self.max_length is not None and limit is not None and self.max_length > limit:
            raise SqueezeError(f"task.data.max_length={self.max_length} is above the model's context of {limit} "
                               f"tokens; set task.data.max_length<={limit} or null (the model's context)")
        if self.max_length is None and limit is not None:
            self.max_length = limit

    @property
    def passage_length(self) -> int:
        return self.max_length or self.block_size

    @property
    def protocol_record(self) -> dict[str, Any]:
        return {
            "protocol": "last_word",
            "block_size": self.block_size,
            "stride": None,
            "scored_tokens": self.scored_tokens.get("test"),
            "last_word": {**self.passages.get("test", {}), "max_length": self.passage_length,
                          "perplexity": "per passage (the harness's)"},
        }

    def encode(self, rows, split):
        if split == "train":
            return super().encode(rows, split)
        texts = [str(t or "") for t in self._texts(rows)]
        passages = [t.rstrip() for t in texts if t.strip()]  # a local text file's blank lines are no passages
        blank = len(texts) - len(passages)
        if not passages:
            raise SqueezeError(f"the {split} split has no passage with text ({blank} blank); "
                               "check task.data.data_files")
        demos, source = self._demonstrations(rows, split)
        pieces = []
        for i, text in enumerate(passages):
            try:
                pieces.append(split_last_word(text))
            except ValueError as e:
                raise SqueezeError(f"{split} passage {i}: {e}; LAMBADA passages end in a word") from e
        out, cut, targets, fewer = [], 0, 0, 0
        pairs = encode_pairs(self.tokenizer, [c for c, _ in pieces], [[w] for _, w in pieces])
        for i, (text, (context, word), (context_ids, [target_ids])) in enumerate(zip(passages, pieces, pairs)):
            shown = [demos.ids(j) for j in demos.draw(text)] if demos else []
            after = demos.context_ids(context, context_ids)[1] if demos else None
            try:
                ids, kept, truncated = _fit_passage(context_ids, target_ids, word, self.passage_length, shown, after)
            except ValueError as e:
                raise SqueezeError(f"{split} passage {i}: {e}; LAMBADA passages end in a word") from e
            # Scored: the passage's own tokens; demonstrations (and the separator before it) are context only.
            own = min(len(ids), len(context_ids) + len(target_ids))
            labels = [IGNORE_INDEX] * (len(ids) - own) + ids[len(ids) - own:]
            start = len(ids) - len(target_ids)
            out.append({"input_ids": ids, "labels": labels, "target_mask": [0] * start + [1] * len(target_ids)})
            cut += truncated
            fewer += kept < len(shown)
            targets += len(target_ids)
        self.scored_tokens[split] = sum(sum(x != IGNORE_INDEX for x in f["labels"][1:]) for f in out)
        self.passages[split] = {"passages": len(out), "target_tokens": targets, "truncated": cut,
                                "blank_skipped": blank, "shots": self.shots, "shots_from": source, "fewer_shots": fewer}
        return out

    def _texts(self, rows) -> list:
        if self.text_column not in rows.column_names:
            raise SqueezeError(f"the data has no column {self.text_column!r} (has {rows.column_names}); "
                               "set task.data.text_column")
        return rows[self.text_column]

    def _demonstrations(self, rows, split: str) -> tuple[Demonstrations | None, str | None]:
        """The pool `shots` demonstrations are drawn from (whole passages), and its split; (None, None) at 0 shots."""
        if not self.shots:
            return None, None
        loaded = self.loaded_splits or {split: rows}  # encode called on its own: its rows
        source = pool_split(loaded, self.shot_split, split)
        texts = self._texts(loaded[source] if source in loaded else rows)
        pool = [str(t).rstrip() for t in texts if str(t or "").strip()]
        return Demonstrations(self.tokenizer, pool, self.shots, self.seed, self.shot_separator, source), source

    def collate(self, features):
        batch = super().collate(features)
        if "target_mask" in features[0]:
            mask = torch.zeros_like(batch["input_ids"])
            for i, f in enumerate(features):
                mask[i, : len(f["target_mask"])] = torch.tensor(f["target_mask"])
            batch["target_mask"] = mask
        return batch


# -- the LightningModules ----------------------------------------------------------------------------
class CausalLM(FineTune):
    """Perplexity over exactly the tokens the evaluation protocol marks as scored."""

    def make_metrics(self):
        return MetricCollection({"perplexity": Perplexity(ignore_index=IGNORE_INDEX)})

    def update_metrics(self, metrics, batch, outputs):
        # Position t predicts token t+1: shift as the model's own loss does.
        logits = outputs.logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        metrics.update(logits, target)


class LastWordLM(CausalLM):
    """LAMBADA: last-word accuracy and perplexity (LastWord, above) of passages scored one by one,
    plus the perplexity over all their tokens; training batches (blocks of text) are plain causal LM."""

    def make_metrics(self):
        return nn.ModuleDict({"perplexity": Perplexity(ignore_index=IGNORE_INDEX), "last_word": LastWord()})

    def update_metrics(self, metrics, batch, outputs):
        metrics["perplexity"].update(outputs.logits[:, :-1].float(), batch["labels"][:, 1:])
        if "target_mask" in batch:
            metrics["last_word"].update(outputs.logits, batch["input_ids"], batch["target_mask"])

    def compute_metrics(self, metrics):
        out = {"perplexity": metrics["perplexity"].compute()}
        if int(metrics["last_word"].passages) > 0:
            last = metrics["last_word"].compute()
            out.update(last_word_accuracy=last["accuracy"], last_word_perplexity=last["perplexity"])
        return out
