"""Integer weights in the compressed-tensors format, which transformers' from_pretrained loads natively
(transformers/quantizers/quantizer_compressed_tensors.py): `AutoModelFor...from_pretrained(dir)` gives
the same model without squeeze, and squeeze's own loader rebuilds its integer layers and kernels bit for bit.

    <dir>/config.json        the transformers config with `quantization_config` (compressed-tensors'
                             QuantizationConfig: one config group per distinct scheme, targets = the
                             layers' exact names, format per group)
    <dir>/model.safetensors  float tensors as save_pretrained names them; for each integer layer what
                             compressed-tensors' own compressor for the group's format writes:
        int8   (int-quantized when inputs are quantized, else naive-quantized)
               <layer>.weight int8 [out, in], <layer>.weight_scale, affine <layer>.weight_zero_point
        int4   (pack-quantized) <layer>.weight_packed int32 (8 values each), <layer>.weight_shape,
               <layer>.weight_scale, affine a packed <layer>.weight_zero_point
        scales: [out, 1] per channel, [out, in/group] per group, [1] per tensor (float32)
        QAT's static input ranges: <layer>.input_scale, <layer>.input_zero_point ([1])
      metadata: format="pt"; squeeze = JSON {layers: how squeeze rebuilds each integer layer (its kernel,
                cpu_kernel, embedding dtype, ...), tied: {name: the name whose storage it shares}}

What the schemes say: weights int, symmetric or not, strategy tensor / channel / group; the inputs of
compress=dq layers are dynamic int8, per token and symmetric (the default fbgemm kernel and torchao's), or per
tensor and asymmetric (activations=tensor, as quantized::linear_dynamic computes it; 7-bit on CPUs without VNNI
against int8 weights, see activation_bits); QAT's learned input ranges are static per-tensor int8.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from squeeze.formats.common import save_config, ties, write_safetensors
from squeeze.formats.quantized_layers import QuantizedEmbedding, QuantizedLinear

WEIGHTS_FILE = "model.safetensors"
META = "squeeze"


def is_compressed(directory: Path) -> bool:
    config = Path(directory) / "config.json"
    return config.exists() and (Path(directory) / WEIGHTS_FILE).exists() and \
        json.loads(config.read_text()).get("quantization_config", {}).get("quant_method") == "compressed-tensors"


def _scheme(layer: nn.Module, name: str):
    """compressed-tensors' QuantizationScheme (and format) for one squeeze integer layer."""
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = layer.scheme()
    strategy = "tensor" if scheme.granularity == "tensor" else ("group" if scheme.group_size else "channel")
    weights = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric, strategy=strategy,
                               group_size=scheme.group_size)
    inputs = None
    if isinstance(layer, QuantizedLinear):
        if layer.kernel == "dynamic_fbgemm":
            inputs = QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="tensor", dynamic=True)
        elif layer.kernel in ("dynamic_torchao", "dynamic_fbgemm_token"):
            inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        elif layer.input_scale is not None:
            inputs = QuantizationArgs(num_bits=layer.input_bits, type="int", strategy="tensor",
                                      symmetric=layer.input_zero_point is None)
    fmt = CompressionFormat.pack_quantized if scheme.bits <= 4 else (
        CompressionFormat.int_quantized if inputs is not None else CompressionFormat.naive_quantized)
    return QuantizationScheme(targets=[f"re:^{re.escape(name)}$"], weights=weights, input_activations=inputs,
                              format=fmt.value)


def _module_tensors(layer, scheme) -> dict[str, torch.Tensor]:
    """The layer's tensors as compressed-tensors' compressor for `scheme.format` writes them (local names)."""
    from compressed_tensors.compressors import BaseCompressor

    flat = (1,) if layer.scale.shape[0] == 1 and layer.weight.shape[0] != 1 else tuple(layer.scale.shape)
    local = {"weight": layer.dequantized(), "weight_scale": layer.scale.reshape(flat).float()}
    if layer.zero_point is not None:
        local["weight_zero_point"] = layer.zero_point.reshape(flat)
    out = BaseCompressor.get_value_from_registry(scheme.format).compress(local, scheme)
    if isinstance(layer, QuantizedLinear):
        if layer.bias is not None:
            out["bias"] = layer.bias.detach()
        if layer.input_scale is not None:
            out["input_scale"] = layer.input_scale.reshape(1).float()
            if layer.input_zero_point is not None:
                out["input_zero_point"] = layer.input_zero_point.reshape(1)
    return out


def save_compressed(model: nn.Module, tokenizer, directory: Path) -> None:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    directory.mkdir(parents=True, exist_ok=True)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    tied = ties(model)
    groups: dict[str, object] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        scheme = _scheme(layer, name)
        key = scheme.model_dump_json(exclude={"targets"})
        group = groups.setdefault(key, scheme.model_copy(update={"targets": []}))
        group.targets.append(scheme.targets[0])
        for local, t in _module_tensors(layer, scheme).items():
            if f"{name}.{local}" not in tied:  # a tied weight is stored once; its own scale is kept
                tensors[f"{name}.{local}"] = t.detach().cpu().contiguous().clone()  # a tied layer's scale: its own copy
    owned = {f"{n}.{p}" for n, m in layers.items() for p, _ in m.named_parameters(recurse=False)} | \
        {f"{n}.{b}" for n, m in layers.items() for b, _ in m.named_buffers(recurse=False)}
    for name, t in model.state_dict().items():
        if name not in owned and name not in tied:
            tensors[name] = t.detach().cpu().contiguous()
    formats = {g.format for g in groups.values()}
    config = QuantizationConfig(
        config_groups={f"group_{i}": g for i, g in enumerate(groups.values())},
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status=QuantizationStatus.COMPRESSED)
    squeeze_meta = {"layers": {name: m.meta() for name, m in layers.items()}, "tied": tied}
    write_safetensors(tensors, directory / WEIGHTS_FILE, {"format": "pt", META: json.dumps(squeeze_meta)})
    model.config.quantization_config = {"quant_method": "compressed-tensors", **config.model_dump(
        exclude={"quant_method"}, mode="json")}
    try:
        save_config(model, directory)
    finally:
        del model.config.quantization_config  # the in-memory model is not a compressed-tensors model
    tokenizer.save_pretrained(str(directory))


def read_compressed(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """(squeeze's state dict with tied names, layer descriptions, ties) of a compressed-tensors directory
    squeeze wrote."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    path = directory / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(META) or "null")
        if meta is None:
            return None
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    layers, tied = meta["layers"], meta["tied"]
    state = {k: v for k, v in raw.items() if not k.startswith(tuple(f"{n}." for n in layers))}
    for name, m in layers.items():
        scale_shape = m["scale_shape"]
        if f"{name}.weight_packed" in raw:
            state[f"{name}.weight"] = unpack_from_int32(raw[f"{name}.weight_packed"], m["bits"], m["shape"])
        elif f"{name}.weight" in raw:
            state[f"{name}.weight"] = raw[f"{name}.weight"]
        state[f"{name}.scale"] = raw[f"{name}.weight_scale"].reshape(scale_shape)
        if m["affine"]:
            zp = raw[f"{name}.weight_zero_point"]
            if m["bits"] < 8 and zp.dtype == torch.int32:  # pack-quantized packs zero points along the rows
                # packed along the rows (packed_dim=0): unpack the transpose (flattened and reshaped, so a
                # single column gets the strides unpack_from_int32's byte view needs)
                zp_t = zp.t().flatten().reshape(zp.shape[::-1])
                zp = unpack_from_int32(zp_t, m["bits"], torch.Size(scale_shape[::-1])).t()
            state[f"{name}.zero_point"] = zp.reshape(scale_shape).to(torch.int8)
        for local in ("bias", "input_scale", "input_zero_point"):
            if f"{name}.{local}" in raw:
                t = raw[f"{name}.{local}"]
                state[f"{name}.{local}"] = t if local == "bias" else t.reshape(())
    for name, source in tied.items():
        state[name] = state[source]
    return state, layers, tied
