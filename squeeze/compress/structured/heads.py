"""`compress=heads`: remove whole attention heads (KV groups under grouped-query attention), ranked per
layer by weight magnitude or by gradient importance, once before fine-tuning or in steps."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from squeeze.arch import Adapter, HeadLayout
from squeeze.arch.loading import reload_kind
from squeeze.compress import RECOVERY, Compressor, check_recovery, check_steps_fit
from squeeze.compress.structured.amounts import check_amount, keep_highest, removed_by, units_to_remove
from squeeze.compress.structured.importance import gradient_head_scores, magnitude_head_scores
from squeeze.compress.structured.surgery import (
    Surgery,
    check_expressible,
    chosen_layers,
    prune_heads,
    structured_adapter,
)
from squeeze.errors import SqueezeError
from squeeze.models import count_params

log = logging.getLogger("squeeze")
METHODS = ("magnitude", "gradient")


class HeadPruning(Compressor):
    """Removes whole attention heads, ranked per layer by weight magnitude or by Michel et al.'s
    gradient importance, once before fine-tuning or in `iterations` steps `every_n_steps` apart
    with fine-tuning in between.

    `amount`: a fraction of each layer's heads (float in [0, 1)) or a count of heads (int).
    `layers`: which layers to prune (fnmatch patterns or numbers); null prunes all of them.
    `recovery` (in steps): the share of the run's optimizer steps after the last step, which must fit before it.
    """

    name = "heads"

    def __init__(self, amount: float = 0.25, method: str = "gradient", importance_batches: int = 8,
                 iterations: int = 1, every_n_steps: int = 0, layers: Sequence[str | int] | None = None,
                 recovery: float = RECOVERY):
        what = self._what
        check_amount(amount, f"{what}.amount")
        check_recovery(recovery, f"{what}.recovery")
        if method not in METHODS:
            raise SqueezeError(f"{what}.method={method!r} is not one of {list(METHODS)}")
        if iterations < 1 or (iterations > 1 and every_n_steps < 1):
            raise SqueezeError(f"{what}: iterations={iterations}, every_n_steps={every_n_steps}; give iterations ≥ 1, "
                               "and every_n_steps ≥ 1 when pruning in more than one step")
        if method == "gradient" and importance_batches < 1:
            raise SqueezeError(f"{what}.importance_batches={importance_batches}; gradient importance needs ≥ 1 batch")
        self.amount, self.method, self.importance_batches = amount, method, importance_batches
        self.iterations, self.every_n_steps, self.recovery = iterations, every_n_steps, recovery
        self.layer_patterns = list(layers) if layers else None
        # Gradient importance needs training batches, and later steps need fine-tuning between them.
        self.trains = method == "gradient" or iterations > 1
        # In steps, shapes change during fit; each cut restarts the best checkpoint, so the best one (tested
        # and saved) comes after the last cut and has the final shapes.
        if iterations > 1:
            self.unsharded = "pruning in steps cuts weight matrices during fit, which FSDP has flattened into shards"
        self._done = 0
        self._event_steps: list[int] = []  # the optimizer step of each cut (0: before fine-tuning)
        self._deadline: int | None = None
        self._fit_end_step: int | None = None
        self._adapter: Adapter | None = None
        self._targets: dict[int, int] = {}  # layer → KV groups to remove in the end
        self._before: dict[str, Any] = {}
        self._after: dict[str, Any] = {}

    @property
    def _what(self) -> str:
        return f"compress.{self.name}"

    # The first step runs on the model as built; magnitude needs no data, so it runs in
    # prepare_model (also in evaluate.py); gradient importance waits for the data, in setup.
    def prepare_model(self, model, tokenizer):
        self._plan(model)
        if self.method == "magnitude":
            self._step(model, batches=None, step=0)
        return model

    def setup(self, trainer, pl_module, stage):
        if stage == "fit" and self._done == 0 and self._adapter is not None:
            # Before the optimizer exists, so it is built on the pruned parameters; on the run's
            # device (Lightning would move the model there next anyway), not on the CPU.
            pl_module.model.to(trainer.strategy.root_device)
            self._step(pl_module.model, self._batches(trainer), trainer.global_step)

    def on_train_start(self, trainer, pl_module):
        if self.iterations == 1:
            return  # cut before fine-tuning: the whole run recovers
        self._deadline = check_steps_fit(self._what, trainer, self.iterations, self.every_n_steps, 0, self.recovery)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self._done < self.iterations and step >= self._done * self.every_n_steps and \
                (self._deadline is None or step <= self._deadline):
            surgery = self._step(pl_module.model, self._batches(trainer) if self.method == "gradient" else None, step)
            surgery.repoint(trainer.optimizers)
            self.restart_best_checkpoint(trainer)

    def on_train_end(self, trainer, pl_module):
        self._fit_end_step = trainer.global_step

    def finalize(self, model):
        self._after = {"params": count_params(model)[0], "heads": self._heads(model), "reload": reload_kind(model)}
        return model

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "amount": self.amount,
            "unit": "kv_group" if self._adapter is not None and self._adapter.config_head_counts else "head",
            "iterations": self.iterations,
            "steps_done": self._done,
            "recovery": self.recovery if self.iterations > 1 else None,
            "event_steps": self._event_steps,
            # fine-tuning steps after the last cut (all of them when it was cut once, before); null: not trained
            "steps_after_last_event": (self._fit_end_step - self._event_steps[-1]
                                       if self._event_steps and self._fit_end_step is not None else None),
            "heads_per_layer_before": self._before.get("heads"),
            "heads_kept_per_layer": self._after.get("heads"),
            "params_before": self._before.get("params"),
            "params_after": self._after.get("params"),
            "reload": self._after.get("reload"),
        }

    # -- internals -----------------------------------------------------------------------------
    def _plan(self, model) -> None:
        """Check the request against the model (before anything is cut) and fix the final amounts."""
        what = self._what
        adapter = structured_adapter(model, what)
        chosen = chosen_layers(adapter, model, self.layer_patterns, f"{what}.layers")
        layers = adapter.layers(model)
        targets = {}
        for i in chosen:
            s = adapter.shape(layers[i][1])
            targets[i] = units_to_remove(self.amount, s.kv_heads, s.group, f"{what}.amount",
                                         f"the {s.heads} heads of layer {i}")
        if self.amount and not any(targets.values()):
            s = adapter.shape(layers[chosen[0]][1])
            log.warning("%s.amount=%s removes nothing: a fraction of %d %s per layer rounds to 0 (the nearest whole "
                        "unit); give a larger fraction or a count", what, self.amount, s.kv_heads,
                        "key/value groups" if s.group > 1 else "heads")
        planned = [HeadLayout((s.kv_heads - targets.get(i, 0)) * s.group, s.kv_heads - targets.get(i, 0), s.head_dim,
                              s.intermediate) for i, s in enumerate(adapter.shape(l) for _, l in layers)]
        check_expressible(model, adapter, planned, what)
        self._adapter, self._targets = adapter, targets
        self._before = {"params": count_params(model)[0], "heads": self._heads(model)}

    def _heads(self, model) -> list[int]:
        return [self._adapter.shape(layer).heads for _, layer in self._adapter.layers(model)]

    def _batches(self, trainer) -> list[dict]:
        if trainer.datamodule is None:
            raise SqueezeError(f"{self._what}.method=gradient needs the run's data module for its importance batches")
        # A separate RNG stream: drawing these batches must not change the run's data order.
        with torch.random.fork_rng(devices=[]):
            batches = []
            for batch in trainer.datamodule.train_dataloader():
                batches.append(batch)
                if len(batches) == self.importance_batches:
                    break
        return batches

    def _step(self, model, batches, step: int) -> Surgery:
        adapter, i = self._adapter, self._done
        layers = [layer for _, layer in adapter.layers(model)]
        if self.method == "gradient":
            scores = gradient_head_scores(adapter, model, batches)
        else:
            scores = [magnitude_head_scores(adapter, layer) for layer in layers]
        keep = {}
        for idx, total in self._targets.items():
            s = adapter.shape(layers[idx])
            original = self._before["heads"][idx] // s.group
            remove_now = removed_by(total, i, self.iterations) - (original - s.kv_heads)
            keep[idx] = keep_highest(scores[idx], remove_now)
        surgery = prune_heads(model, adapter, keep, self._what)
        self._done += 1
        self._event_steps.append(step)
        log.info("%s: step %d/%d, heads per layer %s", self._what, self._done, self.iterations, self._heads(model))
        return surgery
