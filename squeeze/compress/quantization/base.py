"""What the quantization compressors share: which layers are quantized, the settings checks, the
conversion of float layers to integer layers (squeeze/formats/quantized_layers.py), and the base
compressor with its summary."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from squeeze.arch import Adapter, find_adapter
from squeeze.arch.linear import as_out_in, features, projection_kind, replace_module
from squeeze.compress import Compressor
from squeeze.errors import SqueezeError
from squeeze.formats.integers import Scheme, choose_qparams, quantize
from squeeze.formats.quantized_layers import QuantizedEmbedding, QuantizedLinear, _QuantizedWeight, checked_cpu_kernel

BITS = (4, 8)
GRANULARITIES = ("channel", "tensor")
SCHEMES = ("symmetric", "affine")


# -- which layers ---------------------------------------------------------------------------------------
def layer_kind(module: nn.Module) -> str | None:
    # Exact types: a subclass (a scaled embedding, MultiheadAttention's out_proj) computes more than
    # the layer itself, which a replacement would drop.
    if type(module) in (nn.Embedding, QuantizedEmbedding):
        return "embedding"
    if type(module) is QuantizedLinear:
        return "linear"
    return projection_kind(module)  # nn.Linear or GPT-2's Conv1D, by exact type as above


def select_layers(model: nn.Module, embeddings: bool, exclude: Sequence[str]) -> dict[str, nn.Module]:
    """The Linear, Conv1D and (if `embeddings`) Embedding layers to quantize, by name. A layer sharing its
    weight with one left in float (GPT-2's lm_head, tied to wte) stays in float with it."""
    patterns = [re.compile(p, re.IGNORECASE) for p in exclude]
    chosen, kept = {}, set()
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            continue
        if (kind == "embedding" and not embeddings) or any(p.search(name) for p in patterns):
            kept.add(id(module.weight))
        else:
            chosen[name] = module
    return {n: m for n, m in chosen.items() if id(m.weight) not in kept}


def select_norms(model: nn.Module, exclude: Sequence[str]) -> dict[str, nn.Module]:
    """The norm layers with a learned weight (the family adapter's norms; the generic rule for a model squeeze
    has no adapter for), by name."""
    patterns = [re.compile(p, re.IGNORECASE) for p in exclude]
    norms = (find_adapter(model) or Adapter()).norms(model)
    return {n: m for n, m in norms.items()
            if isinstance(getattr(m, "weight", None), nn.Parameter) and not any(p.search(n) for p in patterns)}


def weight_rows(module: nn.Module) -> tuple[int, int]:
    """(output channels, entries per channel) of a layer's weight as it is quantized."""
    return features(module)


def check_scheme(where: str, bits: int, granularity: str, group_size: int | None) -> None:
    if bits not in BITS:
        raise SqueezeError(f"{where}.bits={bits}: only 4 or 8 bits are supported")
    if granularity not in GRANULARITIES:
        raise SqueezeError(f"{where}.granularity={granularity!r} is not one of {list(GRANULARITIES)}")
    if group_size is not None:
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise SqueezeError(f"{where}.group_size={group_size!r} must be a positive integer, or null for one "
                               "scale per channel")
        if granularity == "tensor":
            raise SqueezeError(f"{where}.group_size={group_size} needs granularity=channel (groups split each channel)")


def check_groups(where: str, layers: dict[str, nn.Module], group_size: int | None) -> None:
    """Fail before training when a group size does not divide some layer's channel length."""
    if not group_size:
        return
    for name, module in layers.items():
        _, cols = weight_rows(module)
        if cols % group_size:
            raise SqueezeError(f"{where}.group_size={group_size} does not divide the {cols} entries per channel of "
                               f"{name}; pick a divisor of every layer's input size (e.g. 32 or 64)")


# -- conversion to integers -----------------------------------------------------------------------------
def quantize_layers(model: nn.Module, layers: dict[str, nn.Module], scheme: Scheme, kernel: str,
                    input_ranges: dict[str, tuple] | None = None, cpu_kernel: str = "auto") -> dict[str, int]:
    """Replace `layers` (from select_layers) in `model` by integer layers; counts by what was done.

    A layer that is already integer (a QAT run followed by dq) keeps its integers when they already
    fit `scheme` (only its kernel and cpu_kernel change), else its dequantized weight is quantized again."""
    counts = {"linear": 0, "conv1d": 0, "embedding": 0, "reused": 0, "requantized": 0}
    done: dict[int, _QuantizedWeight] = {}  # by id of the source weight: tied layers share one integer tensor
    for name, module in layers.items():
        kind = layer_kind(module)
        counts[kind] += 1
        source = id(module.weight)
        if isinstance(module, _QuantizedWeight) and module.scheme() == scheme:
            counts["reused"] += 1
            if isinstance(module, QuantizedLinear):
                module.set_kernel(kernel, cpu_kernel)
            done[source] = module
            continue
        if isinstance(module, _QuantizedWeight):
            counts["requantized"] += 1
            weight = module.float_weight() if isinstance(module, QuantizedLinear) else module.dequantized()
        else:
            weight = as_out_in(module).detach()
        if kind == "embedding":
            dtype = (module.out_dtype if isinstance(module, QuantizedEmbedding)
                     else str(weight.dtype).removeprefix("torch."))
            new = QuantizedEmbedding(*weight.shape, scheme.bits, scheme.blocks(weight.shape), not scheme.symmetric,
                                     padding_idx=module.padding_idx, dtype=dtype)
        else:
            new = QuantizedLinear(weight.shape[1], weight.shape[0], scheme.bits, scheme.blocks(weight.shape),
                                  not scheme.symmetric, bias=module.bias is not None, kernel=kernel,
                                  from_conv1d=kind == "conv1d" or getattr(module, "from_conv1d", False),
                                  cpu_kernel=cpu_kernel)
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
            if input_ranges and name in input_ranges and not kernel.startswith("dynamic"):
                new.set_input_range(*input_ranges[name])
        if source in done:
            new.share_weight(done[source])
        else:
            scale, zero_point = choose_qparams(weight, scheme)
            new.set_weight(quantize(weight, scale, zero_point, scheme), scale, zero_point)
            done[source] = new
        new.to(module.weight.device)
        replace_module(model, name, new)
    return counts


class _Quantization(Compressor):
    """What the quantization compressors share: the weight scheme, which layers, the summary."""

    integer_weights = True
    unsharded = ("it leaves integer weights, and FSDP shards only floating-point parameters (quantize the "
                 "finished run: python evaluate.py ckpt=<run> compress=dq|int8wo|int4wo)")
    kernel = "weight_only"
    cpu_kernel = "auto"  # weight_only on CPU: torch's int8/int4 kernels where they fit (quantized_layers.py)

    def __init__(self, bits: int = 8, granularity: str = "channel", group_size: int | None = None,
                 weights: str = "symmetric", embeddings: bool = True, exclude: Sequence[str] = (),
                 lm_head: bool = True):
        self.bits, self.granularity, self.group_size, self.weights = bits, granularity, group_size, weights
        self.embeddings = bool(embeddings)
        self.exclude = list(exclude or [])
        self.lm_head = bool(lm_head)  # False: the output head (model.get_output_embeddings()) stays float
        self.counts: dict[str, int] = {}

    @property
    def where(self) -> str:
        return f"compress.{self.name}"

    def check(self) -> None:
        check_scheme(self.where, self.bits, self.granularity, self.group_size)
        if self.weights not in SCHEMES:
            raise SqueezeError(f"{self.where}.weights={self.weights!r} is not one of {list(SCHEMES)}")
        checked_cpu_kernel(self.cpu_kernel, f"{self.where}.cpu_kernel")

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.weights == "symmetric", self.granularity, self.group_size)

    def prepare_model(self, model, tokenizer):
        self.check()
        check_groups(self.where, self.layers(model), self.group_size)
        return model

    def layers(self, model) -> dict[str, nn.Module]:
        exclude = list(self.exclude)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not self.lm_head and head is not None:  # a tied embedding stays float with it (select_layers)
            exclude += [f"^{re.escape(n)}$" for n, m in model.named_modules() if m is head]
        return select_layers(model, self.embeddings, exclude)

    def convert(self, model, input_ranges=None):
        self.check()
        layers = self.layers(model)
        check_groups(self.where, layers, self.group_size)
        self.counts = quantize_layers(model, layers, self.scheme, self.kernel, input_ranges, self.cpu_kernel)
        return model

    def summary(self) -> dict[str, Any]:
        quantized = sum(self.counts.get(k, 0) for k in ("linear", "conv1d", "embedding"))
        return {"scheme": self.scheme.describe(), "bits": self.bits, "granularity": self.granularity,
                "group_size": self.group_size, "weights": self.weights, "kernel": self.kernel,
                **({"cpu_kernel": self.cpu_kernel} if self.kernel == "weight_only" else {}),
                "embeddings": self.embeddings, "lm_head": self.lm_head, "embeddings_quantized": self.counts.get("embedding", 0),
                "quantized_modules": quantized, "by_kind": dict(self.counts)}
