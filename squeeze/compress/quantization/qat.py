"""Quantization-aware training (`compress=qat`, Q8BERT).

QAT presents each selected parameter fake-quantized (quantize then dequantize, gradients passed
straight through) to its module's own forward; the Parameter itself is not touched, so module types,
state-dict names, the optimizer and Lightning checkpoints stay plain and a run resumes as usual.
Activations (inputs of Linear/Conv1D) can be fake-quantized too, with EMA ranges kept in the
callback's checkpoint state. `finalize` converts to real integers: every selected Linear, Conv1D and
Embedding becomes a QuantizedLinear / QuantizedEmbedding (squeeze/formats/quantized_layers.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from squeeze.compress.quantization.base import SCHEMES, _Quantization, check_groups, layer_kind, select_layers, \
    select_norms
from squeeze.errors import SqueezeError
from squeeze.formats.integers import Scheme, fake_quant, fake_quant_any, fake_quant_with, qparams_from_range

log = logging.getLogger("squeeze")


class QuantizationAwareTraining(_Quantization):
    """Quantization-aware training (`compress=qat`): fake-quantized weights (and optionally activations)
    from `start_step` on, converted to integer weights + scales at `finalize`."""

    trains = True
    unsharded = "its fake quantization reads each whole weight matrix every step, and FSDP holds only flat shards"

    def __init__(self, bits: int = 8, granularity: str = "channel", group_size: int | None = None,
                 weights: str = "symmetric", biases: str | None = "affine", norms: str | None = "affine",
                 embeddings: bool = True, activations: str | None = None, ema_decay: float = 0.9,
                 start_step: int = 0, exclude: Sequence[str] = ()):
        super().__init__(bits, granularity, group_size, weights, embeddings, exclude)
        self.biases, self.norms, self.activations = biases, norms, activations
        self.ema_decay, self.start_step = ema_decay, start_step
        # A "best" checkpoint from before fake quantization started was not trained for it.
        self.test_best_checkpoint = start_step == 0
        self.active = False
        self.ranges: dict[str, torch.Tensor] = {}  # EMA [min, max] of each layer's input
        self._handles: list = []
        self.fake_quant_batches = 0

    def check(self) -> None:
        super().check()
        for key in ("biases", "norms", "activations"):
            value = getattr(self, key)
            if value is not None and value not in SCHEMES:
                raise SqueezeError(f"{self.where}.{key}={value!r} is not one of {list(SCHEMES)} or null (float)")
        if not 0 <= self.ema_decay < 1:
            raise SqueezeError(f"{self.where}.ema_decay={self.ema_decay} must be in [0, 1)")
        if self.start_step < 0:
            raise SqueezeError(f"{self.where}.start_step={self.start_step} must be ≥ 0")

    def _kind_scheme(self, kind: str | None) -> Scheme | None:
        # Biases, norms and activations: 8 bits, one scale per tensor, whatever the weights use.
        return None if kind is None else Scheme(8, kind == "symmetric", "tensor")

    # -- fake quantization, installed as forward hooks ------------------------------------------------
    def install(self, model: nn.Module) -> None:
        """Fake-quantize the selected parameters (and inputs) of `model` whenever `self.active` is true."""
        self.check()
        self.remove()
        layers = select_layers(model, self.embeddings, self.exclude)
        check_groups(self.where, layers, self.group_size)
        weight, bias, act = self.scheme, self._kind_scheme(self.biases), self._kind_scheme(self.activations)
        for name, module in layers.items():
            kind = layer_kind(module)
            fns = {"weight": (lambda w: fake_quant(w.t(), weight).t()) if kind == "conv1d"
                   else (lambda w: fake_quant(w, weight))}
            if bias is not None and getattr(module, "bias", None) is not None:
                fns["bias"] = lambda b: fake_quant_any(b, bias)
            self._hook(module, fns, name if act is not None and kind != "embedding" else None, act)
        norm = self._kind_scheme(self.norms)
        if norm is not None:
            for name, module in select_norms(model, self.exclude).items():
                fns = {p: (lambda t: fake_quant_any(t, norm)) for p in ("weight", "bias")
                       if isinstance(getattr(module, p, None), nn.Parameter)}
                self._hook(module, fns, None, None)

    def _hook(self, module: nn.Module, fns: dict, input_name: str | None, act: Scheme | None) -> None:
        # The module's own forward reads `self.weight`: an instance attribute of that name shadows the
        # Parameter (kept in _parameters) for the duration of the call, then is removed.
        def before(mod, args):
            if not self.active:
                return None
            for attr, fn in fns.items():
                mod.__dict__[attr] = fn(mod._parameters[attr])
            if input_name is not None and args:
                return (self._fake_quant_input(input_name, args[0], act, mod.training), *args[1:])
            return None

        def after(mod, args, output):
            for attr in fns:
                mod.__dict__.pop(attr, None)

        self._handles.append(module.register_forward_pre_hook(before))
        self._handles.append(module.register_forward_hook(after, always_call=True))

    def _fake_quant_input(self, name: str, x: torch.Tensor, scheme: Scheme, training: bool) -> torch.Tensor:
        lo, hi = torch.aminmax(x.detach().float())
        seen = torch.stack([lo, hi])
        current = self.ranges.get(name)
        if training:
            current = seen if current is None else self.ema_decay * current.to(x.device) + (1 - self.ema_decay) * seen
            self.ranges[name] = current
        elif current is None:  # evaluated before any training step: this batch's own range
            current = seen
        scale, zero_point = qparams_from_range(current[0].to(x.device), current[1].to(x.device), scheme)
        return fake_quant_with(x, scale, zero_point, scheme)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- Lightning hooks --------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.install(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.active = trainer.global_step >= self.start_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.active:
            self.fake_quant_batches += 1
        pl_module.log("compress/fake_quant", float(self.active), batch_size=1)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.active = trainer.global_step >= self.start_step

    def state_dict(self) -> dict[str, Any]:
        return {"ranges": {k: v.detach().cpu() for k, v in self.ranges.items()},
                "fake_quant_batches": self.fake_quant_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ranges = dict(state_dict.get("ranges", {}))
        self.fake_quant_batches = int(state_dict.get("fake_quant_batches", 0))

    # -- conversion --------------------------------------------------------------------------------------
    def finalize(self, model):
        self.remove()
        self.active = False
        if self.fake_quant_batches == 0:
            log.warning("compress.%s: fake quantization never ran (start_step=%d); the weights are quantized "
                        "as they are, which is post-training quantization", self.name, self.start_step)
        with torch.no_grad():  # biases and norms: their quantized values, kept as float parameters
            bias, norm = self._kind_scheme(self.biases), self._kind_scheme(self.norms)
            if bias is not None:
                for module in select_layers(model, self.embeddings, self.exclude).values():
                    if getattr(module, "bias", None) is not None:
                        module.bias.copy_(fake_quant_any(module.bias, bias))
            if norm is not None:
                for module in select_norms(model, self.exclude).values():
                    for p in ("weight", "bias"):
                        if isinstance(getattr(module, p, None), nn.Parameter):
                            getattr(module, p).copy_(fake_quant_any(getattr(module, p), norm))
        act = self._kind_scheme(self.activations)
        ranges = None
        if act is not None:
            ranges = {}
            for name, r in self.ranges.items():
                scale, zero_point = qparams_from_range(r[0], r[1], act)
                ranges[name] = (scale, zero_point, 8)
        return self.convert(model, ranges)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "biases": self.biases, "norms": self.norms, "activations": self.activations,
                "start_step": self.start_step, "fake_quant_batches": self.fake_quant_batches}
