"""The integer layers a quantized model is made of, and the kernels that run them.

QuantizedLinear / QuantizedEmbedding hold int8 storage (4-bit values also one per int8 in memory;
packed on disk by the format), float32 scales [rows or 1, groups] and, affine, int8 zero points.
They sit below the compressors: the quantization compressors create them, the formats save and
rebuild them, and neither needs the other.

Kernels (measured on the 2-core AVX512 CPU these were written on; see benchmarks/quantization.py):
  dynamic_fbgemm   int8 activations quantized per call (one scale per tensor) × int8 weights, torch's
                   fbgemm kernel (quantized::linear_dynamic, what torch.ao's quantize_dynamic runs): CPU
                   only, and several times faster than fp32 on a 768×3072 layer, while torchao 0.18's int8
                   dynamic path (torch._int_mm) was ~10× slower than fp32.
  dynamic_fbgemm_token  the same kernel with one activation scale per token: each row is divided by its
                   absolute maximum before the call and the output multiplied back, so a per-tensor grid
                   on the scaled rows is a per-token grid on the real ones (outlier tokens no longer take
                   the whole tensor's range). Without VNNI, fbgemm's 8-bit activations saturate against
                   8-bit weights (reduce_range), but not against int7 weights (|w| ≤ 63): compress.dq.bits=7.
  dynamic_torchao  torchao's Int8DynamicActivationInt8WeightConfig: the maintained path, also on GPU.
  weight_only      float activations × int8/int4 weights. On CPU (cpu_kernel=auto) torch's weight-only
                   kernels, vectorized for bf16 activations only, so the activations are cast to bf16
                   around the matmul (and the output back): int8 with one scale per channel or tensor
                   (aten._weight_int8pack_mm), int4 in groups of 32…256 (aten._weight_int4pack_mm_for_cpu,
                   packed at first use). At batch-1 decode they read 1/4 and 1/8 of fp32's bytes, which is
                   what a decode step waits on. Above KERNEL_MAX_ROWS activation rows, on CPUs with native
                   bf16 matmul, the weight is dequantized to bf16 for one oneDNN GEMM instead. Layers no
                   kernel takes (int8 groups, group 48, a row length not a multiple of 16) and
                   cpu_kernel=dequantize dequantize the whole weight in the input's dtype per call (a size
                   saving only). On a GPU, torchao's int8 / int4 (tinygemm) weight-only kernels.
Each layer remembers which of these it ran (`kernels_ran`; kernels_used(model) counts them).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.formats.integers import Scheme, dequantize, fake_quant_with

KERNELS = ("weight_only", "dynamic_fbgemm", "dynamic_fbgemm_token", "dynamic_torchao")
CPU_KERNELS = ("auto", "dequantize")  # how weight_only runs on CPU (QuantizedLinear's docstring)
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's int4 CPU kernel takes, largest first
# Activation rows above which the weight-only kernels give way to a bf16 GEMM (CPUs with native bf16 only):
# they reread the weight per 4 rows, so they win at decode; on the 576/768-wide layers of SmolLM2 and BERT
# (one thread) they were ahead at 16 rows, behind at 32, and 2-3× behind at 128.
KERNEL_MAX_ROWS = 16
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# Looked up once: torch.ops attribute access costs a few µs, and a decode step calls these ~200 times.
_INT8_MM = getattr(getattr(torch.ops.aten, "_weight_int8pack_mm", None), "default", None)
_INT4_MM = getattr(getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None), "default", None)


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
    with a fixed range learned during QAT (`input_scale`, `input_zero_point`), or divided per channel by
    `input_divisor` [in] first (AWQ's scales where no layer before can absorb them: the integers hold W·diag(s),
    so the layer computes as the float weight W ≈ dequantized · diag(1/s), `float_weight()`).

    `cpu_kernel` (weight_only on CPU): "auto" runs torch's int8 / int4 weight-only kernels where the layer's
    scheme and shape allow, "dequantize" always dequantizes the whole weight (the path before the kernels,
    kept for comparisons). Which kernel really ran is remembered in `kernels_ran` (see kernels_used)."""

    def __init__(self, in_features: int, out_features: int, bits: int, scale_shape: Sequence[int], affine: bool,
                 bias: bool, kernel: str = "weight_only", input_bits: int | None = None,
                 input_affine: bool = False, from_conv1d: bool = False, cpu_kernel: str = "auto",
                 input_divisor: bool = False):
        super().__init__((out_features, in_features), bits, scale_shape, affine)
        self.in_features, self.out_features = in_features, out_features
        self.kernel = kernel
        self.cpu_kernel = checked_cpu_kernel(cpu_kernel)
        self.from_conv1d = from_conv1d  # recorded: GPT-2's Conv1D, its weight transposed to Linear's layout
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.input_bits = input_bits
        self.register_buffer("input_scale", torch.ones(()) if input_bits else None)
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int8)
                             if input_bits and input_affine else None)
        self.register_buffer("input_divisor", torch.ones(in_features) if input_divisor else None)
        self._cache: _Kernel | None = None  # the path chosen at first use, and what it built (never registered)
        self.kernels_ran: set[str] = set()

    def set_input_range(self, scale: torch.Tensor | None, zero_point: torch.Tensor | None, bits: int | None) -> None:
        self.input_bits = bits
        self.input_scale, self.input_zero_point = scale, zero_point

    def set_input_divisor(self, divisor: torch.Tensor | None) -> None:
        self.input_divisor = None if divisor is None else divisor.detach().float().to(self.scale.device)

    def float_weight(self) -> torch.Tensor:
        """The float weight [out, in] this layer computes as: the dequantized integers, less any input divisor."""
        weight = self.dequantized()
        return weight if self.input_divisor is None else weight / self.input_divisor.unsqueeze(0)

    def set_kernel(self, kernel: str, cpu_kernel: str | None = None) -> None:
        self.kernel, self._cache, self.kernels_ran = kernel, None, set()
        if cpu_kernel is not None:
            self.cpu_kernel = checked_cpu_kernel(cpu_kernel)
        if kernel.startswith("dynamic"):  # the dynamic kernel quantizes activations itself
            self.set_input_range(None, None, None)

    def set_weight(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        super().set_weight(q, scale, zero_point)
        self._cache = None

    def share_weight(self, other: _QuantizedWeight) -> None:
        super().share_weight(other)
        self._cache = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.scheme().describe()}, kernel={self.kernel}, cpu_kernel={self.cpu_kernel}"
                + (", input_divisor" if self.input_divisor is not None else ""))

    def meta(self) -> dict[str, Any]:
        return {"type": "linear", **self.quant_meta(), "bias": self.bias is not None, "kernel": self.kernel,
                "cpu_kernel": self.cpu_kernel, "input_bits": self.input_bits,
                "input_affine": self.input_zero_point is not None, "from_conv1d": self.from_conv1d,
                "input_divisor": self.input_divisor is not None}

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None  # new integers: repack
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._cache = None  # moved or cast (model.to(...)): what the kernel derived is stale
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_divisor is not None:
            x = x / self.input_divisor.to(x.dtype)
        if self.input_scale is not None:
            x = fake_quant_with(x, self.input_scale, self.input_zero_point,
                                Scheme(self.input_bits, self.input_zero_point is None, "tensor"))
        kernel = self._cache
        if kernel is None or not kernel.fits(x):
            kernel = self._cache = self._choose(x)
        return kernel(self, x)

    def _choose(self, x: torch.Tensor) -> _Kernel:
        """The path for inputs like `x`, chosen once per device, dtype and need of a gradient."""
        if self.kernel in ("dynamic_fbgemm", "dynamic_fbgemm_token"):
            return _Fbgemm(self, x, per_token=self.kernel == "dynamic_fbgemm_token")
        if self.kernel == "dynamic_torchao" or (x.is_cuda and self.kernel == "weight_only"):
            weight = torchao_weight(self, x.device)
            if weight is not None:
                return _Torchao(x, weight)
        elif (self.kernel == "weight_only" and self.cpu_kernel == "auto" and x.is_cpu and self.weight.is_cpu
              and not x.requires_grad and x.dtype in (torch.float32, torch.bfloat16)):
            # The kernels have no backward: a gradient through this layer takes the dequantized path.
            kernel = cpu_kernel_for(self, x)
            if kernel is not None:
                return kernel
        return _Dequantize(x)


# -- the paths a QuantizedLinear runs -----------------------------------------------------------------
# Each is a plain object the layer keeps in `_cache`: what it derives from the integers (packed weights,
# bf16 scales) never becomes a parameter or buffer, so the state dict and the saved formats hold only the
# integers and scales (a torchao tensor in the state dict once broke saving).
class _Kernel:
    name = ""

    def __init__(self, x: torch.Tensor):
        self.device, self.dtype, self.grad = x.device, x.dtype, x.requires_grad

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype is self.dtype and x.requires_grad == self.grad and x.device == self.device

    def __call__(self, layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _Dequantize(_Kernel):
    """The whole weight dequantized on every call, then a float matmul in the input's dtype: the fallback
    wherever no kernel fits, and what cpu_kernel=dequantize forces."""

    def __init__(self, x: torch.Tensor):
        super().__init__(x)
        self.name = f"dequantize_{_SHORT.get(x.dtype, str(x.dtype).removeprefix('torch.'))}"

    def __call__(self, layer, x):
        layer.kernels_ran.add(self.name)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, layer.dequantized().to(x.dtype), bias)


class _Fbgemm(_Kernel):
    """fbgemm's dynamic int8 kernel, activations per tensor or (`per_token`) per token."""

    def __init__(self, layer, x, per_token: bool = False):
        if x.device.type != "cpu":
            raise SqueezeError(f"compress=dq's fbgemm kernel runs on CPU only, but this model runs on {x.device}; "
                               "evaluate it with hardware=cpu, or use compress.dq.backend=torchao or compress=int8wo")
        super().__init__(x)
        self.per_token = per_token
        self.name = "fbgemm_dynamic_per_token" if per_token else "fbgemm_dynamic"
        # Per token, the bias is added after the rows are scaled back, so it is not packed.
        self.bias = None if layer.bias is None else layer.bias.detach().float()
        self.packed = fbgemm_pack(layer.weight, layer.scale, None if per_token else layer.bias)
        self.reduce_range = activation_bits(layer.bits) < 8

    def __call__(self, layer, x):
        layer.kernels_ran.add(self.name)
        a = x.float().contiguous()
        if not self.per_token:
            return torch.ops.quantized.linear_dynamic(a, self.packed, self.reduce_range).to(x.dtype)
        peak = a.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        out = torch.ops.quantized.linear_dynamic(a / peak, self.packed, self.reduce_range).mul_(peak)
        return (out if self.bias is None else out.add_(self.bias)).to(x.dtype)


class _Torchao(_Kernel):
    name = "torchao"

    def __init__(self, x, weight: torch.Tensor):
        super().__init__(x)
        self.weight = weight

    def __call__(self, layer, x):
        layer.kernels_ran.add(self.name)
        out = F.linear(x.to(self.weight.dtype), self.weight, None).to(x.dtype)
        return out if layer.bias is None else out + layer.bias.to(x.dtype)


class _Int8Pack(_Kernel):
    """torch's int8 weight-only CPU kernel: bf16 activations × int8 weights, one bf16 scale per output
    channel (a per-tensor scale is repeated per channel). Affine weights, (q - z)·s = q·s - z·s, subtract
    z·s times the sum of each activation row."""

    name = "int8pack_mm_bf16"

    def __init__(self, layer, x):
        super().__init__(x)
        rows = layer.weight.shape[0]
        self.q = _aligned(layer.weight.detach())  # the layer's own int8 tensor when aligned: no copy
        scale = layer.scale.detach().reshape(-1).expand(rows)
        self.scales = scale.to(torch.bfloat16).contiguous()
        self.zero = None if layer.zero_point is None else (layer.zero_point.reshape(-1).float() * scale).contiguous()
        self.bias = None if layer.bias is None else layer.bias.detach().to(x.dtype)
        self.many_rows = _Bf16Gemm(layer, self.bias) if cpu_has_bf16_matmul() else None

    def __call__(self, layer, x):
        a = x.reshape(-1, x.shape[-1])
        if a.shape[0] > KERNEL_MAX_ROWS and self.many_rows is not None:
            return self.many_rows(layer, x)
        layer.kernels_ran.add(self.name)
        a = _aligned(a.to(torch.bfloat16))
        out = _INT8_MM(a, self.q, self.scales)
        if self.zero is not None:  # in fp32: the correction can be as large as the product itself
            out = out.float() - a.sum(-1, keepdim=True, dtype=torch.float32) * self.zero
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


class _Int4Pack(_Kernel):
    """torch's int4 weight-only CPU kernel (tinygemm's CPU port): bf16 activations × 4-bit weights packed
    for this CPU's vector width, groups of `group` entries sharing a bf16 scale and offset. It computes
    (u - 8)·s + o for nibbles u: squeeze's codes q ∈ [-8, 7] are u = q + 8, and an affine zero point z
    (w = (q - z)·s) is the offset o = -z·s. Per-channel scales (or larger groups) repeat per `group`."""

    name = "int4pack_mm_bf16"

    def __init__(self, layer, x, group: int):
        super().__init__(x)
        q = layer.weight.detach()
        rows, cols = q.shape
        groups = layer.scale.shape[1]
        self.rows, self.group = rows, group
        pad = -rows % 16  # the packing takes output channels in blocks of 16; padded rows are zero
        codes = F.pad(q.to(torch.int32) + 8, (0, 0, 0, pad), value=8)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        repeat = cols // groups // group
        scale = layer.scale.detach().expand(rows, groups).repeat_interleave(repeat, dim=1)
        offset = torch.zeros_like(scale) if layer.zero_point is None else \
            -layer.zero_point.expand(rows, groups).float().repeat_interleave(repeat, dim=1) * scale
        pairs = F.pad(torch.stack([scale, offset], -1), (0, 0, 0, 0, 0, pad))  # [rows + pad, groups', 2]
        self.scales_and_zeros = pairs.transpose(0, 1).to(torch.bfloat16).contiguous()  # [groups', rows + pad, 2]
        self.bias = None if layer.bias is None else layer.bias.detach().to(x.dtype)
        self.many_rows = _Bf16Gemm(layer, self.bias) if cpu_has_bf16_matmul() else None

    def __call__(self, layer, x):
        a = x.reshape(-1, x.shape[-1])
        if a.shape[0] > KERNEL_MAX_ROWS and self.many_rows is not None:
            return self.many_rows(layer, x)
        layer.kernels_ran.add(self.name)
        out = _INT4_MM(_aligned(a.to(torch.bfloat16)), self.packed, self.group, self.scales_and_zeros)
        if out.shape[1] != self.rows:
            out = out[:, :self.rows]
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.rows)


class _Bf16Gemm:
    """Many activation rows (a long prompt, a batch): the kernels above reread the weight for every 4 rows,
    while one dequantization straight to bf16 (codes and zero points are exact in bf16) feeds oneDNN's
    bf16 GEMM, native on AVX512-BF16 / AMX CPUs (the only ones that get this path)."""

    name = "dequantize_bf16"

    def __init__(self, layer: QuantizedLinear, bias: torch.Tensor | None):
        self.scale = layer.scale.detach().to(torch.bfloat16).unsqueeze(-1)  # [rows or 1, groups, 1]
        self.zero = None if layer.zero_point is None else layer.zero_point.to(torch.bfloat16).unsqueeze(-1)
        self.bias = bias

    def __call__(self, layer, x):
        layer.kernels_ran.add(self.name)
        q = layer.weight
        codes = q.view(*self.scale.shape[:2], -1).to(torch.bfloat16)
        if self.zero is not None:
            codes = codes - self.zero
        out = F.linear(x.to(torch.bfloat16), (codes * self.scale).view(q.shape)).to(x.dtype)
        return out if self.bias is None else out + self.bias


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous at a 64-byte aligned address. The AVX kernels read rows with aligned vector loads:
    a view at an unaligned offset (a slice of a bf16 tensor) would crash the process, not raise."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def cpu_kernel_for(layer: QuantizedLinear, x: torch.Tensor) -> _Kernel | None:
    """torch's int4 or int8 weight-only CPU kernel for this layer, or None where neither takes its scheme
    or shape (that layer then dequantizes, as before)."""
    rows, cols = layer.weight.shape
    groups = layer.scale.shape[1]
    # Entries sharing a scale along a row: int4's kernel takes groups of 32…256, so any length one of those
    # divides (a whole row of 576 → 64) works by repeating the scale; 48 does not.
    length = cols // groups
    group = next((g for g in INT4_GROUPS if length % g == 0), None)
    try:
        if layer.bits == 4 and group is not None and _INT4_MM is not None:
            return _checked(_Int4Pack(layer, x, group), layer, x)
        # The int8 kernel steps through a row 16 values at a time (AVX512), with no remainder loop: other
        # lengths would read past the row.
        if groups == 1 and cols % 16 == 0 and _INT8_MM is not None:
            return _checked(_Int8Pack(layer, x), layer, x)
    except RuntimeError as e:  # a torch build without these CPU kernels: dequantize, as before
        warnings.warn(f"squeeze: torch's weight-only CPU kernel failed ({str(e).splitlines()[0]}); "
                      "this layer dequantizes its weight on each call instead", RuntimeWarning, stacklevel=2)
    return None


def _checked(kernel: _Kernel, layer: QuantizedLinear, x: torch.Tensor) -> _Kernel:
    # One zero row through the kernel now, so an op this build lacks fails here (and falls back) rather than
    # in the middle of a run. `kernels_ran` is not touched: nothing has run yet.
    ran = set(layer.kernels_ran)
    try:
        kernel(layer, torch.zeros(1, x.shape[-1], dtype=x.dtype))
    finally:
        layer.kernels_ran = ran
    return kernel


def torchao_weight(layer: QuantizedLinear, device: torch.device):
    """torchao's quantized weight for this layer on `device`, or None where torchao has no kernel."""
    from torchao.quantization import quantize_

    config, dtype = torchao_config(layer.kernel, layer.scheme())
    if config is None:
        return None
    holder = nn.Linear(layer.in_features, layer.out_features, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        holder.weight.copy_(layer.dequantized().to(device, dtype))
    quantize_(holder, config)
    # A Parameter: kept inside the plain _Torchao object, never assigned to a module (which would register it)
    return holder.weight


def kernels_used(model: nn.Module) -> dict[str, dict[str, int]]:
    """{"linear" | "lm_head": {kernel: layers}} of the model's QuantizedLinear layers, by the kernels they
    ran (a layer that ran two, e.g. int8pack_mm_bf16 for decode steps and dequantize_bf16 for a long
    prompt, counts under both; "not_run" for one that has not run); {} without integer linears."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    counts: dict[str, dict[str, int]] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            kind = counts.setdefault("lm_head" if module is head else "linear", {})
            for name in sorted(module.kernels_ran) or ["not_run"]:
                kind[name] = kind.get(name, 0) + 1
    return counts


def use_cpu_kernel(model: nn.Module, cpu_kernel: str) -> int:
    """Set how every weight-only QuantizedLinear of `model` runs on CPU (CPU_KERNELS); how many were set. For
    comparing the kernels with the dequantized path on one model (the saved meta keeps the setting)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.kernel == "weight_only"]
    for layer in layers:
        layer.set_kernel(layer.kernel, cpu_kernel)
    return len(layers)


def checked_cpu_kernel(value: str, where: str = "cpu_kernel") -> str:
    if value not in CPU_KERNELS:
        raise SqueezeError(f"{where}={value!r} is not one of {list(CPU_KERNELS)} (auto: torch's int8/int4 CPU "
                           "kernels where they fit; dequantize: the whole weight dequantized on each call)")
    return value


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


def activation_bits(weight_bits: int) -> int:
    """The bits fbgemm's dynamic kernel gives activations against weights of `weight_bits` on this CPU:
    8, except 8-bit weights on a CPU without an int8 dot product (reduce_range below). Int7 weights
    cannot saturate vpmaddubsw's int16 pair sums (2 × 255 × 63 < 32767), so they keep 8 everywhere."""
    return 7 if weight_bits > 7 and reduce_range() else 8


@functools.cache
def reduce_range() -> bool:
    """Whether fbgemm's dynamic kernel must quantize activations to 7 bits on this CPU.

    Without VNNI, fbgemm multiplies u8 activations by s8 weights with vpmaddubsw, which adds pairs of
    products into int16 and saturates when both are near full range; torch's quantize_dynamic therefore
    always uses 7-bit activations (reduce_range=True). With VNNI (vpdpbusd) or AMX the products are summed
    into int32 and full 8 bits are exact. On SmolLM2 the 7-bit grid doubled the perplexity loss of dq
    (185.7 vs 96.9 on 20 Persuasion blocks, fp32 53.96: benchmarks/ptq_quality.py), so use 8 bits where
    the CPU allows. Decided by the CPU that runs the model, not the one that saved it."""
    return not cpu_has_int8_dot()


def cpu_has_int8_dot() -> bool:
    """True when the CPU sums u8×s8 products in int32 (x86 AVX512-VNNI, AVX-VNNI or AMX-INT8) and fbgemm
    may use it: FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (fbgemm's own switch) makes a VNNI CPU run the AVX2 kernels,
    which is how the AVX2 path is checked on a VNNI machine."""
    if os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip().upper() in ("AVX2", "AVX"):
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & _cpu_flags())  # not Linux: none, the safe 7 bits


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16): oneDNN's bf16 GEMM is then
    several times faster than fp32's; elsewhere bf16 is converted to fp32 and gains nothing."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


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
