"""squeeze's own packed format for integer weights: what squeeze wrote before compressed-tensors, and
still writes where compressed-tensors cannot express the model (squeeze/formats/__init__.py says when).

    <dir>/config.json, generation_config.json, tokenizer files   as save_pretrained writes them
    <dir>/model.packed.safetensors   every tensor of model.state_dict(), once:
        <name>         as it is: float tensors (norms, biases, layers left in float), int8 weights
                       (<layer>.weight), their float32 scales (<layer>.scale: [rows or 1, groups]) and,
                       affine, int8 zero points (<layer>.zero_point); QAT's input ranges
                       (<layer>.input_scale, <layer>.input_zero_point); AWQ's per-channel input divisors
                       (<layer>.input_divisor, float32 [in])
        <name>:int4    a 4-bit weight, two values a byte: the low nibble holds the even entry (row-major),
                       each nibble two's complement; so int4 weights take 1/8 of fp32 and int8 1/4
        <name>:bitmask, <name>:values (int8) or <name>:values:int4 (nibbles as above)
                       a pruned integer weight whose survivors alone take less room: one bit per entry
                       (sparse.py's bitmask: 1 where the entry is not 0) and the non-zero values in order
                       (version 2; so a 70 %-sparse int8 matrix takes 0.425 bytes an entry instead of 1)
      metadata: format="squeeze-packed", version="2" (version 1, without sparse weights, is read too),
                layers = JSON {layer name: how to rebuild it (type, bits, shapes, bias, kernel, cpu_kernel,
                         from_conv1d)},
                int4   = JSON {name: shape} of the nibble-packed tensors,
                sparse = JSON {name: {shape, bits, kept}} of the bitmask-stored integer weights,
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

from squeeze.arch.linear import replace_module
from squeeze.errors import SqueezeError
from squeeze.formats.common import checked_metadata, model_class, save_config, share, ties, write_safetensors
from squeeze.formats.quantized_layers import QuantizedEmbedding, QuantizedLinear
from squeeze.formats.sparse import BITMASK, MIN_SPARSITY, VALUES, pack_bits, unpack_bits

PACKED_FILE = "model.packed.safetensors"
FORMAT, VERSION, READS = "squeeze-packed", "2", ("1", "2")
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


# -- pruned integer weights ---------------------------------------------------------------------------
def integer_weights(model: nn.Module) -> dict[str, int]:
    """{state-dict name: bits} of the integer layers' weights."""
    return {f"{name}.weight": m.bits for name, m in model.named_modules()
            if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}


def sparse_pays(q: torch.Tensor, bits: int) -> bool:
    """Whether an integer weight is pruned enough (MIN_SPARSITY, as float weights) that its bitmask and
    survivors take less room than the dense integers."""
    if q.dim() < 2 or q.numel() == 0:
        return False
    kept = int(q.count_nonzero())
    return 1 - kept / q.numel() >= MIN_SPARSITY and _integer_bytes(q, bits, kept) < _integer_bytes(q, bits)


# Survivors-only storage must save at least this share of the integer weights' bytes to be chosen over
# compressed-tensors: rounding alone leaves a few int4 layers a quarter zeros (SmolLM2 int4wo g64), which would
# save 0.02 % and cost the model its loading in plain transformers.
MIN_SAVING = 0.10


def _integer_bytes(q: torch.Tensor, bits: int, kept: int | None = None) -> int:
    """Bytes of an integer weight stored dense (kept=None) or as bitmask + `kept` survivors."""
    n = q.numel()
    if kept is None:
        return n if bits != 4 else (n + 1) // 2  # int7/int8: a byte each
    return (n + 7) // 8 + (kept if bits != 4 else (kept + 1) // 2)


def has_sparse_integers(model: nn.Module) -> bool:
    """A pruned and quantized model ([imp,int8wo], [wanda,int4wo], ...): compressed-tensors would store its
    zeros, so squeeze's packed format stores the survivors instead (squeeze/formats/__init__.py), where that saves
    at least MIN_SAVING of the integer weights' bytes."""
    state = model.state_dict()
    dense = saved = 0
    for name, bits in integer_weights(model).items():
        q = state.get(name)
        if q is None or q.dim() < 2 or q.numel() == 0:
            continue
        dense += _integer_bytes(q, bits)
        if sparse_pays(q, bits):
            saved += _integer_bytes(q, bits) - _integer_bytes(q, bits, int(q.count_nonzero()))
    return dense > 0 and saved >= MIN_SAVING * dense


def encode_integers(q: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = q.flatten() != 0
    values = q.flatten()[keep]
    return pack_bits(keep), (pack_int4(values) if bits == 4 else values.clone())


def decode_integers(bitmask: torch.Tensor, values: torch.Tensor, shape: list[int], bits: int, kept: int) -> torch.Tensor:
    keep = unpack_bits(bitmask, int(torch.Size(shape).numel()))
    out = torch.zeros(keep.numel(), dtype=torch.int8)
    out[keep] = unpack_int4(values, [kept]) if bits == 4 else values
    return out.view(shape)


# -- the directory ----------------------------------------------------------------------------------
def save_packed(model: nn.Module, tokenizer, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = {name: m.meta() for name, m in model.named_modules()
              if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    bits = integer_weights(model)
    tied = ties(model)  # tied tensors are one tensor: stored once
    tensors: dict[str, torch.Tensor] = {}
    int4: dict[str, list[int]] = {}
    sparse: dict[str, dict] = {}
    for name, t in model.state_dict().items():
        if name in tied:
            continue
        t = t.detach().cpu().contiguous()
        if name in bits and sparse_pays(t, bits[name]):
            tensors[name + BITMASK], values = encode_integers(t, bits[name])
            tensors[name + VALUES + (INT4 if bits[name] == 4 else "")] = values
            sparse[name] = {"shape": list(t.shape), "bits": bits[name], "kept": int(t.count_nonzero())}
        elif bits.get(name) == 4:
            tensors[name + INT4] = pack_int4(t)
            int4[name] = list(t.shape)
        else:
            tensors[name] = t
    metadata = {"format": FORMAT, "version": VERSION, "layers": json.dumps(layers), "int4": json.dumps(int4),
                "sparse": json.dumps(sparse), "tied": json.dumps(tied)}
    write_safetensors(tensors, directory / PACKED_FILE, metadata)
    save_config(model, directory)
    tokenizer.save_pretrained(str(directory))


def read_packed(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """(full state dict with tied names, layer descriptions, ties) of a packed file."""
    with safe_open(str(path), framework="pt") as f:
        meta = checked_metadata(f, path, FORMAT, READS, "packed")
        layers, int4, tied = json.loads(meta["layers"]), json.loads(meta["int4"]), json.loads(meta["tied"])
        sparse = json.loads(meta.get("sparse", "{}"))
        state = {k: f.get_tensor(k) for k in f.keys()  # noqa: SIM118 (not iterable)
                 if not k.endswith((INT4, BITMASK, VALUES))}
        for name, shape in int4.items():
            state[name] = unpack_int4(f.get_tensor(name + INT4), shape)
        for name, d in sparse.items():
            values = f.get_tensor(name + VALUES + (INT4 if d["bits"] == 4 else ""))
            state[name] = decode_integers(f.get_tensor(name + BITMASK), values, d["shape"], d["bits"], d["kept"])
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
                           meta["input_bits"], meta["input_affine"], meta["from_conv1d"],
                           meta.get("cpu_kernel", "auto"),  # saved before cpu_kernel existed: auto
                           meta.get("input_divisor", False))


def load_packed(directory: str | Path, head: str):
    """The quantized model saved in `directory` by save_packed, with the head it was trained with."""
    directory = Path(directory)
    state, layers, tied = read_packed(directory / PACKED_FILE)
    return build_quantized(directory, head, state, layers, tied)


def build_quantized(directory: Path, head: str, state: dict[str, torch.Tensor], layers: dict[str, dict],
                    tied: dict[str, str]):
    """The model of `directory`'s config with integer layers where `layers` says, filled with `state` (squeeze's
    own state-dict names) bit for bit, ties restored."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(directory))
    cls = model_class(config, head, directory)
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
        share(model, name, source)
    if model.can_generate() and (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    return model.eval()
