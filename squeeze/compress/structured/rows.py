"""`compress=rows`: remove MLP neurons and, where the family allows, q/k/v dims of every head, by
weight magnitude, once before fine-tuning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from squeeze.arch.loading import reload_kind
from squeeze.compress import Compressor
from squeeze.compress.structured.amounts import check_amount
from squeeze.compress.structured.surgery import (
    chosen_layers,
    plan_head_dims,
    plan_mlp,
    prune_head_dims,
    prune_mlp,
    record_shapes,
    structured_adapter,
)
from squeeze.models import count_params


class RowPruning(Compressor):
    """Removes whole rows by weight magnitude, once, before fine-tuning: MLP intermediate neurons
    (rows of the up/fc1 projections and the matching down/fc2 columns) and, where the family allows
    it (BERT, GPT-2, OPT; not Llama's RoPE), the same number of q/k and v dims from every head.

    `mlp_amount` / `qkv_amount`: a fraction (float in [0, 1)) or a count (int) of each layer's
    neurons / of each head's dims. `layers`: which layers (patterns or numbers); null means all.
    """

    name = "rows"

    def __init__(self, mlp_amount: float = 0.25, qkv_amount: float = 0,
                 layers: Sequence[str | int] | None = None):
        check_amount(mlp_amount, f"{self._what}.mlp_amount")
        check_amount(qkv_amount, f"{self._what}.qkv_amount")
        self.mlp_amount, self.qkv_amount = mlp_amount, qkv_amount
        self.layer_patterns = list(layers) if layers else None
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
        dims = plan_head_dims(model, adapter, chosen, self.qkv_amount, f"{what}.qkv_amount")
        neurons = plan_mlp(model, adapter, chosen, self.mlp_amount, f"{what}.mlp_amount")
        prune_head_dims(model, adapter, dims)
        prune_mlp(model, adapter, neurons)
        record_shapes(model, adapter, what)
        return model

    def on_train_end(self, trainer, pl_module):
        self._fit_end_step = trainer.global_step

    def finalize(self, model):
        self._after = {"params": count_params(model)[0], **self._sizes(model), "reload": reload_kind(model)}
        return model

    def summary(self) -> dict[str, Any]:
        return {
            "method": "magnitude",
            "mlp_amount": self.mlp_amount,
            "qkv_amount": self.qkv_amount,
            "intermediate_before": self._before.get("intermediate"),
            "intermediate_after": self._after.get("intermediate"),
            "head_dim_before": self._before.get("head_dim"),
            "head_dim_after": self._after.get("head_dim"),
            "params_before": self._before.get("params"),
            "params_after": self._after.get("params"),
            "reload": self._after.get("reload"),
            # cut once, before fine-tuning: every fine-tuning step comes after it; null: not trained
            "steps_after_last_event": self._fit_end_step,
        }

    def _sizes(self, model) -> dict[str, list[int]]:
        shapes = [self._adapter.shape(layer) for _, layer in self._adapter.layers(model)]
        return {"intermediate": [s.intermediate for s in shapes], "head_dim": [s.head_dim for s in shapes]}
