"""`compress=rows`: remove MLP neurons and, where the family allows, q/k/v dims of every head, by
weight magnitude, once before fine-tuning or in steps with fine-tuning between them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from squeeze.arch.loading import reload_kind
from squeeze.compress import RECOVERY, Compressor, check_recovery, check_steps_fit
from squeeze.compress.structured.amounts import check_amount, removed_by
from squeeze.compress.structured.surgery import (
    Surgery,
    chosen_layers,
    plan_head_dims,
    plan_mlp,
    prune_head_dims,
    prune_mlp,
    record_shapes,
    structured_adapter,
)
from squeeze.errors import SqueezeError
from squeeze.models import count_params

log = logging.getLogger("squeeze")


class RowPruning(Compressor):
    """Removes whole rows by weight magnitude: MLP intermediate neurons (rows of the up/fc1 projections and the
    matching down/fc2 columns) and, where the family allows it (BERT, GPT-2, OPT; not Llama's RoPE), the same
    number of q/k and v dims from every head.

    `mlp_amount` / `qkv_amount`: a fraction (float in [0, 1)) or a count (int) of each layer's neurons / of each
    head's dims, in the end. `layers`: which layers (patterns or numbers); null means all.
    Once (iterations=1, start_step=0): before fine-tuning, the whole run recovers. In steps (the nanoGPT study's
    9 x 10 % with retraining): `iterations` equal cuts of the original widths, the first at optimizer step
    `start_step`, then every `every_n_steps`, each re-ranking what is left; the last must leave `recovery` of the
    run's steps to recover (else refused before training), and the model tested is the best validation after it.
    """

    name = "rows"

    def __init__(self, mlp_amount: float = 0.25, qkv_amount: float = 0,
                 layers: Sequence[str | int] | None = None, iterations: int = 1, every_n_steps: int = 0,
                 start_step: int = 0, recovery: float = RECOVERY):
        check_amount(mlp_amount, f"{self._what}.mlp_amount")
        check_amount(qkv_amount, f"{self._what}.qkv_amount")
        check_recovery(recovery, f"{self._what}.recovery")
        if iterations < 1 or (iterations > 1 and every_n_steps < 1) or start_step < 0:
            raise SqueezeError(f"{self._what}: iterations={iterations}, every_n_steps={every_n_steps}, start_step="
                               f"{start_step}; give iterations ≥ 1, every_n_steps ≥ 1 when pruning in more than one "
                               "step, and start_step ≥ 0")
        self.mlp_amount, self.qkv_amount = mlp_amount, qkv_amount
        self.layer_patterns = list(layers) if layers else None
        self.iterations, self.every_n_steps, self.start_step, self.recovery = (iterations, every_n_steps, start_step,
                                                                              recovery)
        self.in_fit = iterations > 1 or start_step > 0
        if self.in_fit:
            self.trains = True  # cuts wait for fine-tuning steps between them
            self.unsharded = "pruning during fit cuts weight matrices, which FSDP has flattened into shards"
        self._targets: dict[str, dict[int, int]] = {}  # "qkv" / "mlp" → layer → units removed in the end
        self._done = 0
        self._event_steps: list[int] = []
        self._events: list[dict[str, Any]] = []  # the widths and parameter count after each cut
        self._deadline: int | None = None
        self._before: dict[str, Any] = {}
        self._after: dict[str, Any] = {}
        self._fit_end_step: int | None = None

    @property
    def _what(self) -> str:
        return f"compress.{self.name}"

    def prepare_model(self, model, tokenizer):
        what = self._what
        adapter = structured_adapter(model, what)
        chosen = chosen_layers(adapter, model, self.layer_patterns, f"{what}.layers")
        self._adapter = adapter
        self._before = {"params": count_params(model)[0], **self._sizes(model)}
        # The whole cut is planned (and checked) on the model as built; steps take equal shares of it.
        self._targets = {"qkv": plan_head_dims(model, adapter, chosen, self.qkv_amount, f"{what}.qkv_amount"),
                         "mlp": plan_mlp(model, adapter, chosen, self.mlp_amount, f"{what}.mlp_amount")}
        if self.start_step == 0:  # the first cut before fine-tuning: the optimizer is built on the cut model
            self._cut(model, step=0)
        return model

    def on_train_start(self, trainer, pl_module):
        if self.in_fit:
            self._deadline = check_steps_fit(self._what, trainer, self.iterations, self.every_n_steps,
                                             self.start_step, self.recovery)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        due = self.start_step + self._done * self.every_n_steps
        if self.in_fit and self._done < self.iterations and step >= due and \
                (self._deadline is None or step <= self._deadline):
            surgery = self._cut(pl_module.model, step)
            surgery.repoint(trainer.optimizers)
            self.restart_best_checkpoint(trainer)

    def on_train_end(self, trainer, pl_module):
        self._fit_end_step = trainer.global_step

    def finalize(self, model):
        if self.in_fit and self._done < self.iterations:
            raise SqueezeError(f"{self._what}: only {self._done} of {self.iterations} pruning steps ran (the run "
                               "ended first); train longer or prune in fewer steps")
        self._after = {"params": count_params(model)[0], **self._sizes(model), "reload": reload_kind(model)}
        return model

    def summary(self) -> dict[str, Any]:
        return {
            "method": "magnitude",
            "mlp_amount": self.mlp_amount,
            "qkv_amount": self.qkv_amount,
            "iterations": self.iterations,
            "steps_done": self._done,
            "event_steps": self._event_steps,
            "events": self._events,
            "recovery": self.recovery if self.in_fit else None,
            "intermediate_before": self._before.get("intermediate"),
            "intermediate_after": self._after.get("intermediate"),
            "head_dim_before": self._before.get("head_dim"),
            "head_dim_after": self._after.get("head_dim"),
            "params_before": self._before.get("params"),
            "params_after": self._after.get("params"),
            "reload": self._after.get("reload"),
            # fine-tuning steps after the last cut (all of them when cut once, before); null: not trained
            "steps_after_last_event": (self._fit_end_step - self._event_steps[-1]
                                       if self._event_steps and self._fit_end_step is not None else None),
        }

    def _cut(self, model, step: int) -> Surgery:
        """The next of the equal cuts: per layer, what the schedule has removed by now minus what is gone."""
        i, adapter = self._done, self._adapter
        layers = [layer for _, layer in adapter.layers(model)]
        now = [adapter.shape(layer) for layer in layers]
        dims = {idx: removed_by(total, i, self.iterations) - (self._before["head_dim"][idx] - now[idx].head_dim)
                for idx, total in self._targets["qkv"].items()}
        neurons = {idx: removed_by(total, i, self.iterations) - (self._before["intermediate"][idx] - now[idx].intermediate)
                   for idx, total in self._targets["mlp"].items()}
        surgery = prune_head_dims(model, adapter, dims)
        prune_mlp(model, adapter, neurons, surgery)
        record_shapes(model, adapter, self._what)
        self._done += 1
        self._event_steps.append(step)
        sizes = self._sizes(model)
        self._events.append({"step": step, "head_dim": sizes["head_dim"], "intermediate": sizes["intermediate"],
                             "params": count_params(model)[0]})
        if self.in_fit:
            log.info("%s: step %d/%d at optimizer step %d, head dims %s, MLP widths %s", self._what, self._done,
                     self.iterations, step, sizes["head_dim"], sizes["intermediate"])
        return surgery

    def _sizes(self, model) -> dict[str, list[int]]:
        shapes = [self._adapter.shape(layer) for _, layer in self._adapter.layers(model)]
        return {"intermediate": [s.intermediate for s in shapes], "head_dim": [s.head_dim for s in shapes]}
