"""Multiple choice for causal LMs (HellaSwag, StoryCloze): a context, N candidate endings and the index of the
right one. Each ending is scored by the summed log-likelihood of its tokens given the context, as
lm-evaluation-harness scores multiple-choice tasks: `accuracy` picks the highest sum (the harness's acc),
`accuracy_norm` the highest sum per character of the ending (its acc_norm, which does not favour short
endings). Written here because torchmetrics scores classes, not continuations.

Evaluation batches: an example is one row per ending, its prompt (demonstrations and context, encoded as
squeeze.tasks.prompts says) followed by the ending, right-padded. Under the causal mask a real token never
sees the padding after it and positions count from 0 as unpadded, so a row scores as it would alone.
target_mask marks every row's ending tokens; choice_example (which example of the batch a row is),
choice_gold (1 on the right ending's row) and ending_chars (the ending's length in characters) say how to
score them. labels are the right ending's tokens and -100 elsewhere: `model(**batch).loss` (val/loss,
test/loss) is the right endings' token NLL.

Training (a run that trains): plain causal LM on each solved example (context, delimiter, right ending), every
token scored, no demonstrations. Chosen as LAMBADA trains on its text: a pruned or compressed model recovers
language modelling on the task's domain instead of being fit to one answer format; its batches hold only model
inputs, so every compressor (calibration, distillation) sees them as it sees any LM task's; and the saved model
stays a plain causal LM, scored zero- or few-shot as before.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import nn
from torchmetrics import Metric

from squeeze.errors import SqueezeError
from squeeze.tasks.base import IGNORE_INDEX, FineTune, TaskData, max_positions
from squeeze.tasks.prompts import DEFAULT_SEPARATOR, Demonstrations, check_shots, encode_pairs, fit, pool_split


class Item(NamedTuple):
    context: str
    endings: list[str]
    label: int


# -- scoring -----------------------------------------------------------------------------------------
def ending_log_likelihoods(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the summed log-likelihood (float64) of its target_mask tokens given everything before them.
    The vocabulary's log-softmax is taken only where an ending token is predicted, not at every position."""
    row, column = batch["target_mask"][:, 1:].nonzero(as_tuple=True)  # position t predicts token t+1
    predicted = logits[row, column].float()
    gold = batch["input_ids"][row, column + 1]
    token_ll = predicted.gather(1, gold[:, None])[:, 0] - predicted.logsumexp(-1)
    sums = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    return sums.index_add(0, row, token_ll.double())


class ChoiceAccuracy(Metric):
    """The fraction of examples whose right ending has the highest summed log-likelihood (`accuracy`), and
    the highest per character (`accuracy_norm`); a tie goes to the first ending, as the harness's argmax."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("correct_norm", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("examples", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, example: torch.Tensor, gold: torch.Tensor, chars: torch.Tensor) -> None:
        """Per row (an example's rows consecutive): its ending's summed log-likelihood, its example's index in
        the batch, 1 if it is the right ending, the ending's length in characters."""
        count = int(example.max()) + 1
        per_example = torch.bincount(example, minlength=count)
        position = torch.arange(len(example), device=example.device) - (per_example.cumsum(0) - per_example)[example]
        raw = torch.full((count, int(per_example.max())), float("-inf"), dtype=torch.float64, device=scores.device)
        norm = raw.clone()
        raw[example, position] = scores.double()
        norm[example, position] = scores.double() / chars.clamp(min=1)
        right = torch.zeros(count, dtype=torch.long, device=example.device)
        right[example[gold.bool()]] = position[gold.bool()]
        self.correct += (raw.argmax(1) == right).sum()
        self.correct_norm += (norm.argmax(1) == right).sum()
        self.examples += count

    def compute(self) -> dict[str, torch.Tensor]:
        examples = self.examples.clamp(min=1).float()
        return {"accuracy": self.correct.float() / examples, "accuracy_norm": self.correct_norm.float() / examples}


# -- the data module ---------------------------------------------------------------------------------
def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value or []]


class MultipleChoiceData(TaskData):
    """Examples read from `context_columns` (joined by `context_separator`), `ending_columns` (one column
    holding a list of endings, or one column per ending) and `label_column` (the right ending's number,
    counted from `label_base`); an ending follows its context after `ending_delimiter`. `shots` > 0 puts that
    many solved examples before each one (squeeze.tasks.prompts), drawn with the run's seed from `shot_split`.
    A prompt too long for `max_length` (null: the model's context) loses demonstrations, then context from the
    left; the record counts both. `manual_download`: where the data comes from when no hub copy loads, named
    when task.data.data_files is not set."""

    length_key = "max_length"

    def __init__(
        self,
        tokenizer,
        context_columns: str | Sequence[str] = ("ctx",),
        ending_columns: str | Sequence[str] = ("endings",),
        label_column: str = "label",
        label_base: int = 0,
        context_separator: str = " ",
        ending_delimiter: str = " ",
        max_length: int | None = None,
        shots: int = 0,
        shot_split: str | None = "train",
        shot_separator: str = DEFAULT_SEPARATOR,
        manual_download: str | None = None,
        **kwargs,
    ):
        super().__init__(tokenizer, **kwargs)
        if manual_download and self.data_files is None:
            raise SqueezeError(f"this task's data is a manual download ({manual_download}); set task.data.data_files "
                               "to the downloaded files")
        if max_length is not None and max_length < 2:
            raise SqueezeError(f"task.data.max_length={max_length} must be at least 2 (a context and an ending)")
        check_shots(shots, shot_separator)
        self.context_columns, self.ending_columns = _as_list(context_columns), _as_list(ending_columns)
        if not self.context_columns or not self.ending_columns:
            raise SqueezeError("task.data.context_columns and task.data.ending_columns must each name a column")
        self.label_column, self.label_base = label_column, label_base
        self.context_separator, self.ending_delimiter = context_separator, ending_delimiter
        self.max_length = max_length
        self.shots, self.shot_split, self.shot_separator = shots, shot_split, shot_separator
        self.choices: dict[str, dict[str, Any]] = {}  # per split: what was scored, and what was cut
        self._pools: dict[str, Demonstrations] = {}  # per pool split, built once

    @property
    def input_length(self) -> int | None:
        return self.max_length

    def check_model(self, model) -> None:
        limit = max_positions(model.config)
        if self.max_length is not None and limit is not None and self.max_length > limit:
            raise SqueezeError(f"task.data.max_length={self.max_length} is above the model's context of {limit} "
                               f"tokens; set task.data.max_length<={limit} or null (the model's context)")
        if self.max_length is None:
            self.max_length = limit

    @property
    def protocol_record(self) -> dict[str, Any]:
        # The record's `perplexity` entry is where a task's scoring protocol goes; nothing here is perplexity.
        return {"protocol": "multiple_choice", "block_size": None, "stride": None, "scored_tokens": None,
                "multiple_choice": {**self.choices.get("test", {}), "max_length": self.max_length,
                                    "score": "summed log-likelihood of the ending's tokens (accuracy); that per "
                                             "character of the ending (accuracy_norm)"}}

    # -- reading ---------------------------------------------------------------------------------
    def items(self, rows, split: str) -> list[Item]:
        """The split's rows as (context, endings, index of the right ending), checked."""
        wanted = [(c, "context_columns") for c in self.context_columns] + \
                 [(c, "ending_columns") for c in self.ending_columns] + [(self.label_column, "label_column")]
        missing = [f"{c!r} (task.data.{setting})" for c, setting in wanted if c not in rows.column_names]
        if missing:
            raise SqueezeError(f"the {split} data has no column {', '.join(missing)}; it has {rows.column_names}: "
                               "set those settings to its columns")
        contexts = zip(*(rows[c] for c in self.context_columns))
        endings = zip(*(rows[c] for c in self.ending_columns))
        out = []
        for i, (parts, ends, label) in enumerate(zip(contexts, endings, rows[self.label_column])):
            if len(ends) == 1 and isinstance(ends[0], (list, tuple)):  # one column holding the list of endings
                ends = ends[0]
            texts = [str(e).strip() for e in ends if e is not None]
            if len(texts) < 2:
                raise SqueezeError(f"{split} row {i} has {len(texts)} ending(s); multiple choice needs at least 2 "
                                   f"(task.data.ending_columns={self.ending_columns}: one column holding a list of "
                                   "endings, or one column per ending)")
            if not all(texts):
                raise SqueezeError(f"{split} row {i} has an empty ending; give every ending text")
            context = self.context_separator.join(str(p).strip() for p in parts if p is not None and str(p).strip())
            out.append(Item(context, texts, self._label(label, len(texts), split, i)))
        return out

    def _label(self, value, endings: int, split: str, row: int) -> int:
        number = None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, bool):
            try:
                number = int(str(value).strip())
            except ValueError:
                pass
        where = f"task.data.label_column={self.label_column!r}, label_base={self.label_base}"
        if number is None:
            raise SqueezeError(f"{split} row {row}: label {value!r} is not an ending's number ({where}); a split "
                               "whose labels are hidden cannot be scored")
        if not 0 <= number - self.label_base < endings:
            raise SqueezeError(f"{split} row {row}: label {value!r} is out of range for its {endings} endings "
                               f"(labels run {self.label_base}..{self.label_base + endings - 1}; {where})")
        return number - self.label_base

    def solved(self, item: Item) -> str:
        """An example with its right ending: a demonstration, and a training text."""
        return item.context + self.ending_delimiter + item.endings[item.label]

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, rows, split):
        items = self.items(rows, split)
        if split == "train":
            pairs = encode_pairs(self.tokenizer, [x.context for x in items],
                                 [[self.ending_delimiter + x.endings[x.label]] for x in items])
            ids = [context + ending for context, [ending] in pairs]
            ids = [x[-self.max_length:] if self.max_length else x for x in ids]  # the ending kept, context cut
            return [{"input_ids": x, "labels": x} for x in ids]
        demonstrations = self._demonstrations(rows, split)
        pairs = encode_pairs(self.tokenizer, [x.context for x in items],
                             [[self.ending_delimiter + e for e in x.endings] for x in items])
        out, cut, fewer = [], 0, 0
        for i, (item, (context, endings)) in enumerate(zip(items, pairs)):
            longest = max(len(e) for e in endings)
            if not min(len(e) for e in endings):
                raise SqueezeError(f"{split} row {i} has an ending with no tokens; give every ending text")
            room = None if self.max_length is None else self.max_length - longest
            if room is not None and room < 1:
                raise SqueezeError(f"{split} row {i}: an ending of {longest} tokens leaves no room for its context in "
                                   f"task.data.max_length={self.max_length}; raise it")
            drawn = demonstrations.draw(self.solved(item)) if demonstrations else []
            pieces = demonstrations.context_ids(item.context, context) if demonstrations else (context, context)
            prompt, kept, truncated = fit([demonstrations.ids(j) for j in drawn], pieces, room)
            out.append({"prompt": prompt, "endings": endings, "label": item.label,
                        "chars": [len(e) for e in item.endings], "demonstrations": drawn[len(drawn) - kept:]})
            cut += truncated
            fewer += kept < len(drawn)
        self.choices[split] = {"examples": len(out), "endings": sum(len(x["endings"]) for x in out),
                               "shots": self.shots, "shots_from": demonstrations.split if demonstrations else None,
                               "fewer_shots": fewer, "truncated": cut}
        return out

    def _demonstrations(self, rows, split: str) -> Demonstrations | None:
        """The solved examples `shots` demonstrations are drawn from (None at 0 shots), built once per pool."""
        if not self.shots:
            return None
        loaded = self.loaded_splits or {split: rows}  # encode called on its own: its rows
        source = pool_split(loaded, self.shot_split, split)
        if source not in self._pools:
            pool = self.items(loaded.get(source, rows), source)
            self._pools[source] = Demonstrations(self.tokenizer, [self.solved(x) for x in pool], self.shots, self.seed,
                                                 self.shot_separator, source)
        return self._pools[source]

    def collate(self, features):
        pad = self.tokenizer.pad_token_id
        if "endings" not in features[0]:  # training: solved examples, one row each
            rows = [(f["input_ids"], f["labels"]) for f in features]
            width = max(len(x) for x, _ in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (x, y) in enumerate(rows):
                ids[r, : len(x)] = torch.tensor(x)
                labels[r, : len(y)] = torch.tensor(y)
                mask[r, : len(x)] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        rows = [(e, f["prompt"], f["endings"][j], j == f["label"], f["chars"][j])
                for e, f in enumerate(features) for j in range(len(f["endings"]))]
        width = max(len(p) + len(x) for _, p, x, _, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, prompt, ending, gold, _) in enumerate(rows):
            start, end = len(prompt), len(prompt) + len(ending)
            ids[r, :end] = torch.tensor(prompt + ending)
            mask[r, :end] = 1
            target[r, start:end] = 1
            if gold:  # the model's own loss: the right endings' tokens
                labels[r, start:end] = ids[r, start:end]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "target_mask": target,
                "choice_example": torch.tensor([r[0] for r in rows]),
                "choice_gold": torch.tensor([int(r[3]) for r in rows]),
                "ending_chars": torch.tensor([r[4] for r in rows])}


# -- the LightningModule -----------------------------------------------------------------------------
class MultipleChoiceLM(FineTune):
    """accuracy and accuracy_norm (ChoiceAccuracy, above) of the endings' summed log-likelihoods; training
    batches (solved examples) are plain causal LM."""

    def make_metrics(self):
        return nn.ModuleDict({"choice": ChoiceAccuracy()})

    def update_metrics(self, metrics, batch, outputs):
        if "choice_example" in batch:
            metrics["choice"].update(ending_log_likelihoods(outputs.logits, batch), batch["choice_example"],
                                     batch["choice_gold"], batch["ending_chars"])

    def compute_metrics(self, metrics):
        return metrics["choice"].compute() if int(metrics["choice"].examples) > 0 else {}
