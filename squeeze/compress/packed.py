"""Packed checkpoints: a model with integer weights (compress=qat, dq, int8wo, int4wo) on disk.

    <dir>/config.json, generation_config.json, tokenizer files   as save_pretrained writes them
    <dir>/model.packed.safetensors   every tensor of model.state_dict(), once:
        <name>         as it is: float tensors (norms, biases, layers left in float), int8 weights
                       (<layer>.weight), their float32 scales (<layer>.scale: [rows or 1, groups]) and,
                       affine, int8 zero points (<layer>.zero_point); QAT's input ranges
                       (<layer>.input_scale, <layer>.input_zero_point)
        <name>:int4    a 4-bit weight, two values a byte: the low nibble holds the even entry (row-major),
                       each nibble two's complement; so int4 weights take 1/8 of fp32 and int8 1/4
      metadata: format="squeeze-packed", version="1",
                layers = JSON {layer name: how to rebuild it (type, bits, shapes, bias, kernel, from_conv1d)},
                int4   = JSON {name: shape} of the nibble-packed tensors,
                tied   = JSON {name: the name whose storage it shares}, e.g. lm_head.weight → wte.weight

There is no model.safetensors, so transformers' from_pretrained refuses the directory rather than
loading random weights, while AutoConfig and AutoTokenizer read it as usual. `load_packed` builds the
architecture from config.json, puts integer layers where the saved model had them (GPT-2's Conv1D
converted to Linear again), loads the tensors bit for bit and re-ties shared ones: the same quantized
model, without any of the training run's state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from squeeze import models
from squeeze.compress.quantization import QuantizedEmbedding, QuantizedLinear, replace_module
from squeeze.errors import SqueezeError

PACKED_FILE = "model.packed.safetensors"
FORMAT, VERSION = "squeeze-packed", "1"
INT4 = ":int4"


def has_quantized_weights(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def is_packed(directory: str | Path) -> bool:
    return (Path(directory) / PACKED_FILE).exists()


# -- nibbles ----------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values (int8 storage, in [-8, 7]) a byte, flattened row-major; odd counts padded."""
    flat = (q.flatten().to(torch.int16) & 0xF).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()[: int(torch.Size(shape).numel())]
    return ((nibbles.to(torch.int16) ^ 8) - 8).to(torch.int8).view(shape)  # sign-extend the nibble


# -- the directory ----------------------------------------------------------------------------------
def save_packed(model: nn.Module, tokenizer, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = {name: m.meta() for name, m in model.named_modules()
              if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    four_bit = {f"{name}.weight" for name, meta in layers.items() if meta["bits"] == 4}
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    int4: dict[str, list[int]] = {}
    first: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        same = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if same in first:  # tied tensors are one tensor: stored once
            tied[name] = first[same]
            continue
        first[same] = name
        t = t.detach().cpu().contiguous()
        if name in four_bit:
            tensors[name + INT4] = pack_int4(t)
            int4[name] = list(t.shape)
        else:
            tensors[name] = t
    metadata = {"format": FORMAT, "version": VERSION, "layers": json.dumps(layers), "int4": json.dumps(int4),
                "tied": json.dumps(tied)}
    save_file(tensors, str(directory / PACKED_FILE), metadata=metadata)
    # What save_pretrained writes besides the weights, so transformers reads the config as usual.
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(directory))
    if model.can_generate():
        model.generation_config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def checked_metadata(f, path: Path, fmt: str, version: str, kind: str) -> dict[str, str]:
    """The metadata of one of squeeze's own safetensors formats (packed, sparse), refused when the file is
    another format or another version of it."""
    meta = f.metadata() or {}
    if meta.get("format") != fmt:
        raise SqueezeError(f"{path} is not a squeeze {kind} checkpoint (format {meta.get('format')!r}); "
                           "save the model again with squeeze")
    if meta.get("version") != version:
        raise SqueezeError(f"{path} has {kind} format version {meta.get('version')!r}, this squeeze reads "
                           f"version {version}; use the squeeze version that wrote it")
    return meta


def read_packed(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """(full state dict with tied names, layer descriptions, ties) of a packed file."""
    with safe_open(str(path), framework="pt") as f:
        meta = checked_metadata(f, path, FORMAT, VERSION, "packed")
        layers, int4, tied = json.loads(meta["layers"]), json.loads(meta["int4"]), json.loads(meta["tied"])
        state = {k: f.get_tensor(k) for k in f.keys() if not k.endswith(INT4)}  # noqa: SIM118 (not iterable)
        for name, shape in int4.items():
            state[name] = unpack_int4(f.get_tensor(name + INT4), shape)
    for name, source in tied.items():
        state[name] = state[source]
    return state, layers, tied


def empty_layer(meta: dict) -> nn.Module:
    """An integer layer of the described shapes, to be filled by load_state_dict."""
    rows, cols = meta["shape"]
    if meta["type"] == "embedding":
        return QuantizedEmbedding(rows, cols, meta["bits"], meta["scale_shape"], meta["affine"], meta["padding_idx"],
                                  meta["dtype"])
    return QuantizedLinear(cols, rows, meta["bits"], meta["scale_shape"], meta["affine"], meta["bias"], meta["kernel"],
                           meta["input_bits"], meta["input_affine"], meta["from_conv1d"])


def load_packed(directory: str | Path, head: str):
    """The quantized model saved in `directory` by save_packed, with the head it was trained with."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.auto_factory import _get_model_class

    directory = Path(directory)
    state, layers, tied = read_packed(directory / PACKED_FILE)
    config = AutoConfig.from_pretrained(str(directory))
    try:
        # The concrete class: the Auto classes build from a config, but we need it to fill it ourselves.
        cls = _get_model_class(config, models.HEADS[head]._model_mapping)
    except (KeyError, ValueError) as e:
        raise SqueezeError(f"{directory} holds a {config.model_type} model, which has no {head} head") from e
    model = cls(config)  # random weights, all replaced below
    dtype = getattr(torch, str(getattr(config, "dtype", None) or "float32").removeprefix("torch."))
    model.to(dtype)  # the float tensors' saved dtype (before the integer layers, whose scales stay float32)
    for name, meta in layers.items():
        replace_module(model, name, empty_layer(meta))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SqueezeError(f"{directory} does not hold a {cls.__name__} ({str(e).splitlines()[0]}); evaluate it "
                           "with the task it was trained on") from e
    for name, source in tied.items():
        _share(model, name, source)
    if model.can_generate() and (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    return model.eval()


def _share(model: nn.Module, name: str, source: str) -> None:
    """Make `name` the very tensor `source` is (a tie, as saved), not an equal copy."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    src_owner, _, src_attr = source.rpartition(".")
    src_module = model.get_submodule(src_owner)
    if attr in module._parameters and src_attr in src_module._parameters:
        module._parameters[attr] = src_module._parameters[src_attr]
    elif attr in module._buffers and src_attr in src_module._buffers:
        module._buffers[attr] = src_module._buffers[src_attr]
