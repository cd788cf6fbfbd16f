"""What every task kind shares: the data module base (loading, slicing, batching; `_Labelled` for tasks
whose examples carry class labels) and the LightningModule base that owns the optimisation loop.

Data modules know tokenizers, never models: the run hands them a model only to check that inputs fit its
context, and the family adapter (squeeze.arch) answers how long that is.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import Metric, MetricCollection

from squeeze import arch, assets, measure
from squeeze.errors import SqueezeError
from squeeze.hardware.checkpointing import resumable
from squeeze.tasks.sources import _is_mapping, load_splits, read_files, resolve_data_files

log = logging.getLogger("squeeze")
IGNORE_INDEX = -100  # label of a position that counts neither in the loss nor in a metric (transformers' value)


def max_positions(config) -> int | None:
    """The longest input the model's position embeddings allow, or None if unbounded (the family adapter's
    answer; transformers' usual config field for a model squeeze has no adapter for)."""
    return (arch.find_adapter(config) or arch.Adapter()).max_positions(config)


# -- the data module ---------------------------------------------------------------------------------
class TaskData(L.LightningDataModule):
    """Shared loading, slicing and batching; subclasses turn raw rows into model inputs."""

    sample_rows = True  # max_examples draws a random sample (False: the first rows, in order)

    def __init__(
        self,
        tokenizer,
        source: str,
        name: str | None = None,
        data_files: Any = None,
        hub_files: Mapping[str, Any] | None = None,
        asset: str | None = None,
        splits: Mapping[str, str | None] | None = None,
        carve: Mapping[str, float] | None = None,
        max_examples: Mapping[str, int | None] | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        split_seed: int = 42,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.source, self.name, self.asset = source, name, asset
        self.data_files = data_files
        self.hub_files = hub_files
        self.splits, self.carve = splits, carve
        self.max_examples = dict(max_examples or {})
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        # The held-out examples (carved validation/test, and samples of them) are drawn with their own fixed
        # seed, not the run's: every seed of a sweep is scored on the same examples, and a teacher fine-tuned
        # at one seed never trained on what a student at another seed is tested on.
        self.split_seed = split_seed
        self.datasets: dict[str, Any] = {}
        self.loaded_splits: Mapping[str, Any] = {}  # the raw splits setup encoded, each whole
        self._raw: dict[bool, datasets.DatasetDict] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        # evaluate.py task.data.data_files=<file>: one file, not a split mapping, is what to score.
        raw = self.loaded_splits = self.raw_splits(only_test=stage == "test" and self.single_file)
        for split in raw:
            rows = raw[split]
            limit = self.max_examples.get(split)
            if limit is not None and limit < len(rows):
                # A sample of examples; but a text stream must stay contiguous (the first rows).
                seed = self.seed if split == "train" else self.split_seed
                rows = rows.shuffle(seed=seed) if self.sample_rows else rows
                rows = rows.select(range(limit))
            if len(rows) == 0:
                raise SqueezeError(f"split {split!r} is empty; check task.data.data_files / splits")
            self.datasets[split] = self.encode(rows, split)

    @property
    def single_file(self) -> bool:
        return self.data_files is not None and not _is_mapping(self.data_files)

    def raw_splits(self, only_test: bool = False) -> datasets.DatasetDict:
        """The splits as loaded, before slicing and encoding (kept: labels may be read from them first)."""
        if only_test not in self._raw:
            files = resolve_data_files(self.data_files, self.asset)
            self._raw[only_test] = load_splits(self.source, self.name, files, self.splits, self.carve, self.split_seed,
                                               self.hub_files, only_test=only_test)
        return self._raw[only_test]

    def encode(self, rows: datasets.Dataset, split: str):
        raise NotImplementedError

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_model(self, model) -> None:
        """Refuse inputs longer than the model's position embeddings (they would crash mid-run)."""
        limit = max_positions(model.config)
        length = self.input_length
        if limit is not None and length > limit:
            raise SqueezeError(
                f"task.data.{self.length_key}={length} is above the model's context of {limit} tokens; "
                f"set task.data.{self.length_key}<={limit}"
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self):
        # Resumable mid-epoch: the order seeded per epoch, the position saved in checkpoints
        # (squeeze.hardware.checkpointing).
        return resumable(self._loader("train", shuffle=True), self.seed)

    def has_train_split(self, fitting: bool) -> bool:
        """Whether the data has a train split apart from the test split. Not so for one file (evaluate.py
        task.data.data_files=<file>) scored whole as the test split, which it is unless the run fits on it
        (`fitting`, or it has: it is then carved into splits like any task's data)."""
        return not self.single_file or fitting or "train" in self.datasets

    def calibration_files(self, data_files: Any) -> list[str]:
        """calibration.data_files (a file or a list) as absolute paths, found as the task finds its own files."""
        if _is_mapping(data_files) or not data_files:
            raise SqueezeError(f"calibration.data_files={data_files!r} must name a file or a list of files (the "
                               "calibration text, in the task's format)")
        files = resolve_data_files({"calibration": data_files}, self.asset, setting="calibration.data_files")
        return files["calibration"]

    def read_calibration_files(self, files: Sequence[str], encode: Callable[[datasets.Dataset], Any]):
        """`encode` of the rows of calibration files, read with the task's source (the format of its own
        files); what they lack (a column, a known label) is said as calibration.data_files'."""
        rows = read_files(self.source, self.name, files, setting="calibration.data_files")
        try:
            return encode(rows)
        except SqueezeError as e:
            raise SqueezeError(f"calibration.data_files {[Path(f).name for f in files]}: {e}") from e

    def calibration_source(self, files: Sequence[str] | None = None):
        """What post-training calibration draws its samples from, as batches in order: the rows of `files`
        (calibration.data_files, encoded as training examples), or else the train split."""
        if files is None:
            return self._loader("train", shuffle=False)
        examples = self.read_calibration_files(files, lambda rows: self.encode(rows, "train"))
        return DataLoader(examples, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers)

    def val_dataloader(self):
        return self._loader("validation", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)


class _Labelled(TaskData):
    """Label names come from the config; data may hold names (local files) or indices (hub). The user's own files
    (task.data.data_files outside the task's asset) whose label names are not the task's, and `labels: null`,
    take the data's names, sorted, as the class ids, as transformers' example scripts do; the model records them
    in id2label/label2id."""

    own_files_name_labels = True  # False: the task's labels hold for the user's files too (labels: null reads them)

    def __init__(self, tokenizer, labels: Sequence[str] | None, max_length: int = 128, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.configured = [str(x) for x in labels] if labels else None
        read = self.configured is None or (self.own_files_name_labels and self._own_files())
        self._labels = None if read else self.configured
        self.max_length = max_length

    length_key = "max_length"

    @property
    def labels(self) -> list[str]:
        if self._labels is None:  # read from the data (loaded now; setup uses the same load)
            self._labels = self._labels_of_data()
        return self._labels

    @functools.cached_property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def input_length(self) -> int:
        return self.max_length

    def label_values(self, rows: datasets.Dataset) -> list[Any]:
        raise NotImplementedError

    def _own_files(self) -> bool:
        """task.data.data_files that are not the task's asset's own: their labels are the user's."""
        if self.data_files is None:
            return False
        files = resolve_data_files(self.data_files, self.asset)
        home = assets.locate(self.asset).resolve() if self.asset else None
        return home is None or any(not Path(f).resolve().is_relative_to(home) for fs in files.values() for f in fs)

    def _labels_of_data(self) -> list[str]:
        raw = self.raw_splits(only_test=self.single_file)  # every row, whichever split it ends up in
        values = {v for split in raw.values() for v in self.label_values(split) if v is not None}
        if not values:
            raise SqueezeError("the data has no labels; check task.data.data_files and its label column")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):  # class ids already
            if self.configured and max(values) < len(self.configured) and min(values) >= 0:
                return self.configured
            if min(values) < 0:
                raise SqueezeError(f"the data's labels include {min(values)}; class ids start at 0")
            return [str(i) for i in range(max(values) + 1)]
        names = {str(v) for v in values}
        if self.configured and names <= set(self.configured):
            return self.configured
        found = sorted(names)
        log.info("labels from the data (sorted; class id = position): %s%s", found,
                 f" (the task's {self.configured} do not name them)" if self.configured else "")
        return found

    def label_id(self, value: Any) -> int:
        if isinstance(value, str) and value in self.label2id:
            return self.label2id[value]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.labels):
            return value
        raise SqueezeError(
            f"label set mismatch: the data has label {value!r}, which is not among "
            f"task.data.labels={self.labels}; set task.data.labels to the data's label names"
        )


# -- the LightningModule -----------------------------------------------------------------------------
STAGES = ("val", "test")
# Batch entries that say what to score, not model inputs (LastWordData's target_mask; MultipleChoiceData's
# target_mask and which example, which ending is right and how long each ending is).
SCORING_KEYS = ("target_mask", "choice_example", "choice_gold", "ending_chars")


class NonFiniteLossError(SqueezeError):
    pass


def linear_warmup_decay(optimizer, total_steps: int, warmup_ratio: float = 0.1):
    """Linear warm-up to the base LR over `warmup_ratio` of training, then linear decay to zero."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FineTune(L.LightningModule):
    """Trains `model` on its own loss (the transformers head computes it from `labels`).

    `optimizer` and `scheduler` are partials (`_partial_: true` in config): the optimizer takes the
    parameters, the scheduler the optimizer and the total number of steps.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=5e-5))
        self.scheduler_factory = scheduler
        self.metrics = nn.ModuleDict({stage: self.make_metrics() for stage in STAGES})
        self.train_tokens: int | None = None  # non-padding input tokens of this fit's training steps
        self._tokens_seen: int | torch.Tensor = 0

    # -- what a head defines -------------------------------------------------------------------
    def make_metrics(self) -> nn.Module:
        return MetricCollection({})

    def update_metrics(self, metrics: nn.Module, batch: dict, outputs: Any) -> None:
        pass

    def compute_metrics(self, metrics: nn.Module) -> dict[str, torch.Tensor]:
        return metrics.compute()

    # What training needs from the model's outputs beyond the head's own loss (DialogModule: the last
    # hidden states, for its next-utterance head).
    wants_hidden_states = False

    def task_loss(self, batch: dict, outputs: Any) -> dict[str, torch.Tensor]:
        """The task's training loss on the model's `outputs` for `batch`: `loss`, and its parts if it has
        any (distillation puts this in its task share, so a task's own terms are kept there)."""
        return {"loss": outputs.loss}

    def eval_outputs(self, batch: dict) -> Any:
        """What validation/test score a batch from: the model's outputs (with `.loss`) by default."""
        return self(batch)

    def on_fit_start(self) -> None:
        # transformers' from_pretrained returns models in eval mode; Lightning keeps the mode it
        # finds, so without this a pretrained model would fine-tune with dropout switched off.
        self.model.train()

    def on_train_start(self) -> None:
        self._tokens_seen = 0  # this fit's (a resumed run counts from where it resumed, as train_seconds does)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Summed on the device, read once at the end: no sync per step.
        self._tokens_seen = self._tokens_seen + measure.batch_tokens(batch)

    def on_train_end(self) -> None:
        seen = torch.as_tensor(self._tokens_seen, device=self.device)
        self.train_tokens = int(self.trainer.strategy.reduce(seen, reduce_op="sum"))  # every rank's

    # -- the loop --------------------------------------------------------------------------------
    def forward(self, batch: dict) -> Any:
        return self.model(**{k: v for k, v in batch.items() if k not in SCORING_KEYS})

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def check_finite(self, loss: torch.Tensor) -> None:
        # A NaN loss silently ruins every later step and the saved model; stop with the reason.
        # (.item() is a device sync, paid once per step: negligible next to the backward pass.)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at step {self.global_step}; lower optimizer.lr, "
                "enable gradient clipping (trainer.gradient_clip_val) or use precision 32"
            )

    def _eval_step(self, stage: str, batch: dict) -> None:
        outputs = self.eval_outputs(batch)
        self.log(f"{stage}/loss", outputs.loss, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        self.update_metrics(self.metrics[stage], batch, outputs)

    def _eval_epoch_end(self, stage: str) -> None:
        values = self.compute_metrics(self.metrics[stage])
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")
        for metric in self.metrics[stage].modules():
            if isinstance(metric, Metric):
                metric.reset()

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
