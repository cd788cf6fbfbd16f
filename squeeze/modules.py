"""LightningModules that fine-tune a transformers model: one base that owns the optimisation loop,
and one subclass per head that owns its metrics."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall
from torchmetrics.text import Perplexity

from squeeze import measure
from squeeze.errors import SqueezeError
from squeeze.metrics import IGNORE_INDEX, EntityF1, LastWord

STAGES = ("val", "test")
# Batch entries that say what to score, not model inputs (LastWordData's target_mask).
SCORING_KEYS = ("target_mask",)


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


class SequenceClassification(FineTune):
    """Accuracy, and macro precision, recall and F1 (each the unweighted mean over classes), over
    whole-text labels."""

    def make_metrics(self):
        n = self.model.config.num_labels
        return MetricCollection(
            {"accuracy": MulticlassAccuracy(n, average="micro"), "f1": MulticlassF1Score(n, average="macro"),
             "precision": MulticlassPrecision(n, average="macro"), "recall": MulticlassRecall(n, average="macro")}
        )

    def update_metrics(self, metrics, batch, outputs):
        metrics.update(outputs.logits.argmax(-1), batch["labels"])


class TokenClassification(FineTune):
    """Entity-level precision/recall/F1 (seqeval's exact-match reading) plus token accuracy,
    both over first sub-tokens only."""

    def __init__(self, model: nn.Module, labels: Sequence[str] | None = None, **kwargs):
        self.tag_names = list(labels) if labels else [model.config.id2label[i] for i in range(model.config.num_labels)]
        super().__init__(model, **kwargs)

    def make_metrics(self):
        n = self.model.config.num_labels
        return nn.ModuleDict(
            {"entity": EntityF1(), "token_accuracy": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE_INDEX)}
        )

    def update_metrics(self, metrics, batch, outputs):
        predicted = outputs.logits.argmax(-1)
        labels = batch["labels"]
        metrics["token_accuracy"].update(predicted, labels)
        keep = labels != IGNORE_INDEX
        pred_seqs, gold_seqs = [], []
        for p, g, k in zip(predicted.tolist(), labels.tolist(), keep.tolist()):
            pred_seqs.append([self.tag_names[x] for x, m in zip(p, k) if m])
            gold_seqs.append([self.tag_names[x] for x, m in zip(g, k) if m])
        metrics["entity"].update(pred_seqs, gold_seqs)

    def compute_metrics(self, metrics):
        entity = metrics["entity"].compute()
        return {**entity, "token_accuracy": metrics["token_accuracy"].compute()}


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
    """LAMBADA: last-word accuracy and perplexity (squeeze.metrics.LastWord) of passages scored one by one,
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
