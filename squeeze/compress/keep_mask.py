"""Fine-tuning a pruned model with its zeros kept: the thesis' pre-training IMP, where BERT pruned to 70 % while
training masked LM (GPT-2 to 30 % on causal LM) is then fine-tuned on each task from the sparse model, mask kept.

  python train.py model.name_or_path=<pre-training run>/model task=rotten_tomatoes compress=keep_mask

The mask is where the starting model's selected weights (the family's attention and MLP matrices, as
compress.imp selects them) are zero. Their gradients are zeroed before every optimizer step, so neither
the update nor the optimizer's moments touch them, and they are zeroed again after it (weight decay of a zero is
zero, but a resumed or mixed-precision step is not trusted to keep it so). Sparsity is what it was at the start.
"""

from __future__ import annotations

from typing import Any

import torch

from squeeze.arch import adapter_for
from squeeze.compress import Compressor
from squeeze.compress.pruning import select_weights
from squeeze.errors import SqueezeError


class KeepMask(Compressor):
    trains = True

    def __init__(self, include: list[str] | None = None, exclude: list[str] | None = None):
        self.include, self.exclude = include, exclude
        self.masks: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.nn.Parameter] = {}
        self._figures: dict[str, Any] = {}

    def prepare_model(self, model, tokenizer):
        adapter = adapter_for(model)
        self.include = self.include if self.include is not None else [adapter.prune_include]
        self.exclude = self.exclude if self.exclude is not None else [adapter.prune_exclude]
        weights, _ = select_weights(model, self.include, self.exclude)
        zeros = sum(int((p == 0).sum()) for p in weights.values())
        total = sum(p.numel() for p in weights.values())
        if zeros == 0:
            raise SqueezeError("compress=keep_mask: the model has no zeros to keep; start from a pruned run "
                               "(model.name_or_path=<its run>/model), or prune while training with compress=imp")
        self._figures["sparsity_at_start"] = round(zeros / total, 6)
        return model

    def on_train_start(self, trainer, pl_module) -> None:
        self._weights, _ = select_weights(pl_module.model, self.include, self.exclude)
        if not self.masks:  # a resumed run brings the masks of its start (state_dict)
            self.masks = {n: p.detach() != 0 for n, p in self._weights.items()}
        self.masks = {n: m.to(self._weights[n].device) for n, m in self.masks.items()}
        self._apply()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for name, p in self._weights.items():
            if p.grad is not None:
                p.grad.masked_fill_(~self.masks[name], 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._apply()

    def _apply(self) -> None:
        with torch.no_grad():
            for name, p in self._weights.items():
                p.masked_fill_(~self.masks[name], 0)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {n: m.cpu() for n, m in self.masks.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = dict(state_dict.get("masks") or {})

    def finalize(self, model):
        weights, _ = select_weights(model, self.include, self.exclude)
        zeros, total = 0, 0
        with torch.no_grad():
            for name, p in weights.items():
                if name in self.masks:
                    p.masked_fill_(~self.masks[name].to(p.device), 0)
                zeros, total = zeros + int((p == 0).sum()), total + p.numel()
        self._figures["sparsity"] = round(zeros / total, 6)
        self.masks, self._weights = {}, {}
        return model

    def summary(self) -> dict[str, Any]:
        return {**self._figures, "include": self.include, "exclude": self.exclude}
