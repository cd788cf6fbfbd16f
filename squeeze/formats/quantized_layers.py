"""The integer layers a quantized model is made of, and the kernels that run them.

QuantizedLinear / QuantizedEmbedding hold int8 storage (4-bit values also one per int8 in memory;
packed on disk by the format), float32 scales [rows or 1, groups] and, affine, int8 zero points.
They sit below the compressors: the quantization compressors create them, the formats save and
rebuild them, and neither needs the other.

Kernels (measured on the 2-core AVX2 CPU these were written on; see benchmarks/quantization.py):
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

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.errors import SqueezeError
from squeeze.formats.integers import Scheme, dequantize, fake_quant_with

KERNELS = ("weight_only", "dynamic_fbgemm", "dynamic_torchao")


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
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._cache,
                                                  reduce_range()).to(x.dtype)

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
    """True when the CPU sums u8×s8 products in int32 (x86 AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: keep the conservative 7 bits
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


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
