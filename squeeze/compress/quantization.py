"""Quantization: fake-quant training (`compress=qat`), dynamic int8 (`dq`), weight-only int8/int4
(`int8wo`, `int4wo`).

The math is a few pure functions on 2-D tensors whose rows are output channels (a Linear's weight,
an Embedding's token rows; GPT-2's Conv1D stores its weight transposed): `choose_qparams` picks one
scale (and, affine, a zero point) per tensor, per row, or per group of `group_size` entries of a row;
`quantize` / `dequantize` map to integers and back. Symmetric (Q8BERT: S = max|W| / 127, clamp to
±127) suits weights; affine (a zero point, so an asymmetric range is not wasted) suits biases and
LayerNorm parameters (the CS229S finding). Those are the defaults.

QAT presents each selected parameter fake-quantized (quantize then dequantize, gradients passed
straight through) to its module's own forward; the Parameter itself is not touched, so module types,
state-dict names, the optimizer and Lightning checkpoints stay plain and a run resumes as usual.
Activations (inputs of Linear/Conv1D) can be fake-quantized too, with EMA ranges kept in the
callback's checkpoint state. `finalize` converts to real integers: every selected Linear, Conv1D and
Embedding becomes a QuantizedLinear / QuantizedEmbedding holding int8 weights (4-bit values also
held one per int8 in memory; packed two per byte on disk, squeeze/compress/packed.py) and scales.

GPT-2's Conv1D is first converted to the exactly equivalent nn.Linear (weight transposed, same bias):
the thesis lost 12% BLEU because its swap changed the model; `conv1d_to_linear` does not.

Kernels, chosen per compressor (measured on the 2-core AVX2 CPU these were written on; see
benchmarks/quantization.py):
  dynamic_fbgemm   int8 activations quantized per call × int8 weights, torch's fbgemm kernel
                   (quantized::linear_dynamic, what torch.ao's quantize_dynamic runs): CPU only, and
                   the fastest here — several times faster than fp32 on a 768×3072 layer, while
                   torchao 0.18's int8 dynamic path (torch._int_mm) was ~10× slower than fp32.
  dynamic_torchao  torchao's Int8DynamicActivationInt8WeightConfig: the maintained path, also on GPU.
  weight_only      float activations × dequantized int8/int4 weights on CPU (a size saving, not a
                   speed-up: no CPU kernel here beat fp32); torchao's int8 / int4 (tinygemm) weight-only
                   kernels on a GPU.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from squeeze.compress import Compressor
from squeeze.errors import SqueezeError

log = logging.getLogger("squeeze")

BITS = (4, 8)
GRANULARITIES = ("channel", "tensor")
SCHEMES = ("symmetric", "affine")
KERNELS = ("weight_only", "dynamic_fbgemm", "dynamic_torchao")
_TINY = 1e-12  # scale floor: an all-zero block quantizes to zeros instead of dividing by zero


# -- the math: pure functions ----------------------------------------------------------------------
@dataclass(frozen=True)
class Scheme:
    """How a tensor maps to integers: bits, symmetric or affine, and which entries share a scale."""

    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"  # one scale per row ("channel") or for the whole tensor
    group_size: int | None = None  # with "channel": one scale per `group_size` entries of a row

    @property
    def qmin(self) -> int:
        # Symmetric drops the most negative code so the range is ±(2^(b-1) - 1) (Q8BERT: ±127).
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def blocks(self, shape: Sequence[int]) -> tuple[int, int]:
        """(rows, groups) of the scale tensor for a 2-D tensor of `shape`."""
        rows, cols = shape
        if self.granularity == "tensor":
            return 1, 1
        return rows, cols // (self.group_size or cols)

    def describe(self) -> str:
        where = "per-tensor" if self.granularity == "tensor" else (
            f"group {self.group_size}" if self.group_size else "per-channel")
        return f"int{self.bits} {'symmetric' if self.symmetric else 'affine'} {where}"


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme):
    """Scale and zero point (None when symmetric) that cover [lo, hi] (elementwise tensors)."""
    if scheme.symmetric:
        return (torch.maximum(lo.abs(), hi.abs()) / scheme.qmax).clamp(min=_TINY), None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # zero stays exactly representable (padding, ReLU zeros)
    scale = ((hi - lo) / (scheme.qmax - scheme.qmin)).clamp(min=_TINY)
    zero_point = (scheme.qmin - torch.round(lo / scale)).clamp(scheme.qmin, scheme.qmax).to(torch.int8)
    return scale, zero_point


def choose_qparams(t: torch.Tensor, scheme: Scheme):
    """Scale [rows, groups] (float32) and zero point (int8, affine only) of a 2-D tensor."""
    b = t.detach().float().reshape(*scheme.blocks(t.shape), -1)
    return qparams_from_range(b.amin(-1), b.amax(-1), scheme)


def quantize(t: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """Integer codes (int8 storage, whatever the bits) of a 2-D tensor, in its shape."""
    q = torch.round(t.detach().float().reshape(*scale.shape, -1) / scale.unsqueeze(-1))
    if zero_point is not None:
        q = q + zero_point.unsqueeze(-1)
    return q.clamp(scheme.qmin, scheme.qmax).to(torch.int8).reshape(t.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Float32 values of integer codes; the scale's shape says how entries share it."""
    b = q.reshape(*scale.shape, -1).float()
    if zero_point is not None:
        b = b - zero_point.unsqueeze(-1).float()
    return (b * scale.unsqueeze(-1)).reshape(q.shape)


class _StraightThrough(torch.autograd.Function):
    """Forward the quantized values, pass the gradient through unchanged (the STE of Q8BERT)."""

    @staticmethod
    def forward(ctx, t, quantized):
        return quantized

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quant(t: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """`t` quantized and dequantized (same dtype), with a straight-through gradient."""
    scale, zero_point = choose_qparams(t, scheme)
    values = dequantize(quantize(t, scale, zero_point, scheme), scale, zero_point)
    return _StraightThrough.apply(t, values.to(t.dtype))


def fake_quant_any(t: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """fake_quant for a tensor of any rank: 1-D (biases, norms) as one row, Conv1D's [in, out] transposed."""
    if t.dim() == 1:
        return fake_quant(t.unsqueeze(0), scheme).squeeze(0)
    return fake_quant(t, scheme)


def fake_quant_with(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: Scheme):
    """An activation quantized with a given per-tensor scale (and zero point), straight-through."""
    scale = scale.reshape(1, 1)
    zero_point = None if zero_point is None else zero_point.reshape(1, 1)
    values = dequantize(quantize(x.reshape(1, -1), scale, zero_point, scheme), scale, zero_point)
    return _StraightThrough.apply(x, values.reshape(x.shape).to(x.dtype))


def quantization_error_bound(scale: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """scale / 2 for every entry of a 2-D tensor: no entry in range is further than that from its code."""
    rows, cols = shape
    return (scale.unsqueeze(-1) / 2).expand(*scale.shape, rows * cols // scale.numel()).reshape(rows, cols)


# -- GPT-2's Conv1D -----------------------------------------------------------------------------------
def conv1d_to_linear(conv: Conv1D) -> nn.Linear:
    """The nn.Linear computing exactly what `conv` computes: Conv1D's weight is [in, out], Linear's [out, in]."""
    w = conv.weight
    linear = nn.Linear(conv.nx, conv.nf, bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.detach().t())
        linear.bias.copy_(conv.bias.detach())
    linear.train(conv.training)
    return linear


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def convert_conv1d(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Replace Conv1D layers (all, or those named) by equivalent Linear layers; their names."""
    chosen = [n for n, m in model.named_modules() if isinstance(m, Conv1D) and (names is None or n in names)]
    for name in chosen:
        replace_module(model, name, conv1d_to_linear(model.get_submodule(name)))
    return chosen


# -- the integer layers -----------------------------------------------------------------------------
class _QuantizedWeight(nn.Module):
    """Integer weight [rows, cols] (int8 storage; a frozen Parameter so parameter counts include it),
    its scales [rows or 1, groups] and, when affine, zero points."""

    def __init__(self, shape: Sequence[int], bits: int, scale_shape: Sequence[int], affine: bool):
        super().__init__()
        self.bits = bits
        self.weight = nn.Parameter(torch.zeros(*shape, dtype=torch.int8), requires_grad=False)
        self.register_buffer("scale", torch.ones(*scale_shape))
        self.register_buffer("zero_point", torch.zeros(*scale_shape, dtype=torch.int8) if affine else None)

    def set_weight(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        self.weight = nn.Parameter(q, requires_grad=False)
        self.scale = scale.float()
        self.zero_point = zero_point

    def share_weight(self, other: _QuantizedWeight) -> None:
        """Use `other`'s integer weight and scales (tied embeddings: one tensor, stored once)."""
        self.weight, self.scale, self.zero_point = other.weight, other.scale, other.zero_point

    def scheme(self) -> Scheme:
        rows, groups = self.scale.shape
        if rows == 1 and self.weight.shape[0] != 1:
            return Scheme(self.bits, self.zero_point is None, "tensor")
        group = self.weight.shape[1] // groups
        return Scheme(self.bits, self.zero_point is None, "channel", None if groups == 1 else group)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.weight, self.scale, self.zero_point)

    def quant_meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "shape": list(self.weight.shape), "scale_shape": list(self.scale.shape),
                "affine": self.zero_point is not None}


class QuantizedLinear(_QuantizedWeight):
    """A Linear layer with an integer weight, run by one of KERNELS; optionally its input is quantized
    with a fixed range learned during QAT (`input_scale`, `input_zero_point`)."""

    def __init__(self, in_features: int, out_features: int, bits: int, scale_shape: Sequence[int], affine: bool,
                 bias: bool, kernel: str = "weight_only", input_bits: int | None = None,
                 input_affine: bool = False, from_conv1d: bool = False):
        super().__init__((out_features, in_features), bits, scale_shape, affine)
        self.in_features, self.out_features = in_features, out_features
        self.kernel = kernel
        self.from_conv1d = from_conv1d  # recorded: GPT-2's Conv1D, its weight transposed to Linear's layout
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.input_bits = input_bits
        self.register_buffer("input_scale", torch.ones(()) if input_bits else None)
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int8)
                             if input_bits and input_affine else None)
        self._cache = None  # the kernel's own packed weight, built on first use

    def set_input_range(self, scale: torch.Tensor | None, zero_point: torch.Tensor | None, bits: int | None) -> None:
        self.input_bits = bits
        self.input_scale, self.input_zero_point = scale, zero_point

    def set_kernel(self, kernel: str) -> None:
        self.kernel, self._cache = kernel, None
        if kernel.startswith("dynamic"):  # the dynamic kernel quantizes activations itself
            self.set_input_range(None, None, None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.scheme().describe()}, kernel={self.kernel}")

    def meta(self) -> dict[str, Any]:
        return {"type": "linear", **self.quant_meta(), "bias": self.bias is not None, "kernel": self.kernel,
                "input_bits": self.input_bits, "input_affine": self.input_zero_point is not None,
                "from_conv1d": self.from_conv1d}

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None  # new integers: repack
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = fake_quant_with(x, self.input_scale, self.input_zero_point,
                                Scheme(self.input_bits, self.input_zero_point is None, "tensor"))
        if self.kernel == "dynamic_fbgemm":
            return self._fbgemm(x)
        if self.kernel == "dynamic_torchao" or (x.is_cuda and self.kernel == "weight_only"):
            weight = self._torchao(x.device)
            if weight is not None:
                return F.linear(x.to(weight.dtype), weight, None).to(x.dtype) + (
                    0 if self.bias is None else self.bias.to(x.dtype))
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise SqueezeError(f"compress=dq's fbgemm kernel runs on CPU only, but this model runs on {x.device}; "
                               "evaluate it with hardware=cpu, or use compress.dq.backend=torchao or compress=int8wo")
        if self._cache is None:
            self._cache = fbgemm_pack(self.weight, self.scale, self.bias)
        # reduce_range: 7-bit activations, as torch's quantize_dynamic does, since CPUs without VNNI
        # accumulate pairs of u8×s8 products in int16 and would saturate with the full 8 bits.
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._cache, True).to(x.dtype)

    def _torchao(self, device: torch.device):
        """torchao's quantized weight for this layer on `device` (built once), or None for no kernel."""
        if self._cache is not None and self._cache.device == device:
            return self._cache
        from torchao.quantization import quantize_

        config, dtype = torchao_config(self.kernel, self.scheme())
        if config is None:
            return None
        holder = nn.Linear(self.in_features, self.out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            holder.weight.copy_(self.dequantized().to(device, dtype))
        quantize_(holder, config)
        self._cache = holder.weight
        return self._cache


class QuantizedEmbedding(_QuantizedWeight):
    """An Embedding with integer rows: only the looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, scale_shape: Sequence[int],
                 affine: bool, padding_idx: int | None = None, dtype: str = "float32"):
        super().__init__((num_embeddings, embedding_dim), bits, scale_shape, affine)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.out_dtype = dtype  # of the rows it returns: the float embedding's (a bf16 model stays bf16)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme().describe()}"

    def meta(self) -> dict[str, Any]:
        return {"type": "embedding", **self.quant_meta(), "padding_idx": self.padding_idx, "dtype": self.out_dtype}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Written by hand: torchao's quantized embedding dequantizes the whole table on every call.
        rows = self.weight[ids]
        if self.scale.shape[0] == 1:  # per tensor
            scale, zero_point = self.scale.expand(rows.shape[:-1] + self.scale.shape), None
            if self.zero_point is not None:
                zero_point = self.zero_point.expand(rows.shape[:-1] + self.scale.shape)
        else:
            scale = self.scale[ids]
            zero_point = None if self.zero_point is None else self.zero_point[ids]
        flat = rows.reshape(-1, self.embedding_dim)
        values = dequantize(flat, scale.reshape(flat.shape[0], -1),
                            None if zero_point is None else zero_point.reshape(flat.shape[0], -1))
        return values.reshape(rows.shape).to(getattr(torch, self.out_dtype))


def fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """torch's prepacked fbgemm weight for int8 codes with per-row or per-tensor scales."""
    with warnings.catch_warnings():
        # torch 2.13 deprecates creating quantized tensors; this is still the only fast int8 CPU
        # path here (see the module docstring), and the packed weight is all that is kept.
        warnings.simplefilter("ignore", UserWarning)
        if scale.numel() == 1:
            qweight = torch._make_per_tensor_quantized_tensor(q.cpu(), float(scale), 0)
        else:
            flat = scale.reshape(-1).cpu().double()
            zeros = torch.zeros_like(flat, dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(q.cpu(), flat, zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float().cpu())


def torchao_config(kernel: str, scheme: Scheme):
    """(torchao config, weight dtype) for a kernel and scheme, or (None, None) where torchao has none."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from torchao.quantization.granularity import PerGroup, PerRow, PerTensor

    granularity = PerTensor() if scheme.granularity == "tensor" else (
        PerGroup(scheme.group_size) if scheme.group_size else PerRow())
    if kernel == "dynamic_torchao":
        return Int8DynamicActivationInt8WeightConfig(granularity=granularity, set_inductor_config=False), torch.float32
    if scheme.bits == 8:
        return Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False), torch.bfloat16
    if scheme.group_size in (32, 64, 128, 256):  # tinygemm's int4 kernel: group-wise, bf16 only
        return Int4WeightOnlyConfig(group_size=scheme.group_size, int4_packing_format="tile_packed_to_4d",
                                    set_inductor_config=False), torch.bfloat16
    return None, None


def dynamic_kernels_available(engines: Sequence[str] | None = None) -> str | None:
    """Why torch's fbgemm dynamic int8 kernel cannot run here (or with `engines`), or None when it can."""
    engines = list(torch.backends.quantized.supported_engines if engines is None else engines)
    if not {"fbgemm", "x86"} & set(engines) or not hasattr(torch.ops.quantized, "linear_dynamic"):
        return f"this torch build has no fbgemm int8 CPU kernels (quantized engines: {engines})"
    return None


# -- which layers ---------------------------------------------------------------------------------------
def layer_kind(module: nn.Module) -> str | None:
    # Exact types: a subclass (a scaled embedding, MultiheadAttention's out_proj) computes more than
    # the layer itself, which a replacement would drop.
    if type(module) in (nn.Embedding, QuantizedEmbedding):
        return "embedding"
    if type(module) in (nn.Linear, QuantizedLinear):
        return "linear"
    if type(module) is Conv1D:
        return "conv1d"
    return None


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
    """LayerNorm / RMSNorm layers (by class name: transformers defines its own), by name."""
    patterns = [re.compile(p, re.IGNORECASE) for p in exclude]
    return {n: m for n, m in model.named_modules()
            if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
            and isinstance(getattr(m, "weight", None), nn.Parameter)
            and not any(p.search(n) for p in patterns)}


def weight_rows(module: nn.Module) -> tuple[int, int]:
    """(output channels, entries per channel) of a layer's weight as it is quantized."""
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    return tuple(module.weight.shape)


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
                    input_ranges: dict[str, tuple] | None = None) -> dict[str, int]:
    """Replace `layers` (from select_layers) in `model` by integer layers; counts by what was done.

    A layer that is already integer (a QAT run followed by dq) keeps its integers when they already
    fit `scheme` (only its kernel changes), else its dequantized weight is quantized again."""
    counts = {"linear": 0, "conv1d": 0, "embedding": 0, "reused": 0, "requantized": 0}
    done: dict[int, _QuantizedWeight] = {}  # by id of the source weight: tied layers share one integer tensor
    for name, module in layers.items():
        kind = layer_kind(module)
        counts[kind] += 1
        source = id(module.weight)
        if isinstance(module, _QuantizedWeight) and module.scheme() == scheme:
            counts["reused"] += 1
            if isinstance(module, QuantizedLinear):
                module.set_kernel(kernel)
            done[source] = module
            continue
        if isinstance(module, _QuantizedWeight):
            counts["requantized"] += 1
            weight = module.dequantized()
        else:
            weight = module.weight.detach().t() if kind == "conv1d" else module.weight.detach()
        if kind == "embedding":
            dtype = (module.out_dtype if isinstance(module, QuantizedEmbedding)
                     else str(weight.dtype).removeprefix("torch."))
            new = QuantizedEmbedding(*weight.shape, scheme.bits, scheme.blocks(weight.shape), not scheme.symmetric,
                                     padding_idx=module.padding_idx, dtype=dtype)
        else:
            new = QuantizedLinear(weight.shape[1], weight.shape[0], scheme.bits, scheme.blocks(weight.shape),
                                  not scheme.symmetric, bias=module.bias is not None, kernel=kernel,
                                  from_conv1d=kind == "conv1d" or getattr(module, "from_conv1d", False))
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


# -- the compressors ------------------------------------------------------------------------------------
class _Quantization(Compressor):
    """What the quantization compressors share: the weight scheme, which layers, the summary."""

    integer_weights = True
    kernel = "weight_only"

    def __init__(self, bits: int = 8, granularity: str = "channel", group_size: int | None = None,
                 weights: str = "symmetric", embeddings: bool = True, exclude: Sequence[str] = ()):
        self.bits, self.granularity, self.group_size, self.weights = bits, granularity, group_size, weights
        self.embeddings = bool(embeddings)
        self.exclude = list(exclude or [])
        self.counts: dict[str, int] = {}

    @property
    def where(self) -> str:
        return f"compress.{self.name}"

    def check(self) -> None:
        check_scheme(self.where, self.bits, self.granularity, self.group_size)
        if self.weights not in SCHEMES:
            raise SqueezeError(f"{self.where}.weights={self.weights!r} is not one of {list(SCHEMES)}")

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.weights == "symmetric", self.granularity, self.group_size)

    def prepare_model(self, model, tokenizer):
        self.check()
        check_groups(self.where, select_layers(model, self.embeddings, self.exclude), self.group_size)
        return model

    def convert(self, model, input_ranges=None):
        self.check()
        layers = select_layers(model, self.embeddings, self.exclude)
        check_groups(self.where, layers, self.group_size)
        self.counts = quantize_layers(model, layers, self.scheme, self.kernel, input_ranges)
        return model

    def summary(self) -> dict[str, Any]:
        quantized = sum(self.counts.get(k, 0) for k in ("linear", "conv1d", "embedding"))
        return {"scheme": self.scheme.describe(), "bits": self.bits, "granularity": self.granularity,
                "group_size": self.group_size, "weights": self.weights, "kernel": self.kernel,
                "embeddings": self.embeddings, "embeddings_quantized": self.counts.get("embedding", 0),
                "quantized_modules": quantized, "by_kind": dict(self.counts)}


class DynamicQuantization(_Quantization):
    """Post-training dynamic int8 (`compress=dq`): int8 weights; activations quantized on each call.
    `backend=fbgemm` (torch's CPU kernel, the fastest here) or `torchao` (also on GPU)."""

    def __init__(self, bits: int = 8, granularity: str = "channel", group_size: int | None = None,
                 backend: str = "fbgemm", embeddings: bool = True, exclude: Sequence[str] = ()):
        super().__init__(bits, granularity, group_size, "symmetric", embeddings, exclude)
        self.backend = backend

    @property
    def kernel(self) -> str:
        return f"dynamic_{self.backend}"

    def check(self) -> None:
        super().check()
        if self.bits != 8:
            raise SqueezeError(f"{self.where}.bits={self.bits}: dynamic quantization is int8 only; "
                               "use compress=int4wo for 4-bit weights")
        if self.group_size is not None:
            raise SqueezeError(f"{self.where}.group_size={self.group_size}: the int8 dynamic kernels take one scale "
                               "per channel or per tensor; use compress=int8wo for group-wise scales")
        if self.backend not in ("fbgemm", "torchao"):
            raise SqueezeError(f"{self.where}.backend={self.backend!r} is not one of ['fbgemm', 'torchao']")
        if self.backend == "fbgemm" and (why := dynamic_kernels_available()):
            raise SqueezeError(f"{self.where}: {why}; use compress.dq.backend=torchao or compress=int8wo")

    def setup(self, trainer, pl_module, stage: str) -> None:
        device = trainer.strategy.root_device
        if self.backend == "fbgemm" and device.type != "cpu":
            raise SqueezeError(f"compress=dq (fbgemm) has CPU kernels only, but this run uses {device.type}; "
                               "use hardware=cpu, compress.dq.backend=torchao, or compress=int8wo / int4wo on GPU")

    def finalize(self, model):
        device = next(model.parameters()).device
        if self.backend == "fbgemm" and device.type != "cpu":
            raise SqueezeError(f"compress=dq (fbgemm) has CPU kernels only, but the model is on {device.type}; "
                               "use hardware=cpu, compress.dq.backend=torchao, or compress=int8wo")
        return self.convert(model)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "backend": self.backend, "activations": "int8 dynamic per call"}


class WeightOnlyQuantization(_Quantization):
    """Post-training weight-only quantization (`compress=int8wo`, `compress=int4wo`): integer weights
    with per-channel or group-wise scales; activations stay in float."""

    def finalize(self, model):
        return self.convert(model)


class QuantizationAwareTraining(_Quantization):
    """Quantization-aware training (`compress=qat`): fake-quantized weights (and optionally activations)
    from `start_step` on, converted to integer weights + scales at `finalize`."""

    trains = True

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
