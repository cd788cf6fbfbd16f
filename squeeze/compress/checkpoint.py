"""The saved model directory (`<run>/model`): how a (compressed) model is written and read back.

A plain model is a transformers directory (`save_pretrained`), loadable without squeeze. A model
with integer weights (compress=qat, dq, int8wo, int4wo) is written packed (squeeze/compress/packed.py). A model
with sparse weights (some ≥2-D floating-point tensor at least MIN_SPARSITY zeros, where sparse
storage is smaller; pruning makes them) is written in squeeze's sparse format, with no dense copy
of anything, so the directory is really smaller:

    <dir>/config.json               the transformers config (architectures, dtype), as save_pretrained writes it
    <dir>/generation_config.json    for models that generate
    <dir>/tokenizer files           as tokenizer.save_pretrained writes them
    <dir>/model.sparse.safetensors  every tensor of model.state_dict(), once:
        <name>           a dense tensor, as it is
        <name>:bitmask   a sparse tensor's layout: uint8, one bit per entry in row-major order, most
                         significant bit first; 1 where the entry's bytes are not all zero (so a -0.0
                         is kept as a value and the round trip is bit-identical)
        <name>:values    its kept entries, in that order, in the tensor's dtype
      metadata: format="squeeze-sparse", version="1",
                shapes = JSON {name: shape} of the sparse tensors,
                tied   = JSON {name: the name whose storage it shares}, e.g. lm_head.weight → wte

There is no model.safetensors, so transformers' from_pretrained refuses the directory instead of
loading random weights, while AutoConfig and AutoTokenizer read it as usual. `load` rebuilds the
saved tensors bit for bit and hands them to the model class's from_pretrained(state_dict=...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from transformers import AutoConfig

from squeeze import models
from squeeze.compress import packed, pruned_attention
from squeeze.compress.structured import loading_class
from squeeze.errors import SqueezeError

SPARSE_FILE = "model.sparse.safetensors"
FORMAT, VERSION = "squeeze-sparse", "1"
# Below this a tensor is stored dense: a dense model's incidental zeros (a padding embedding row)
# never switch it to the sparse format.
MIN_SPARSITY = 0.25
BITMASK, VALUES = ":bitmask", ":values"
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def save(model, tokenizer, directory: str | Path) -> None:
    directory = Path(directory)
    if packed.has_quantized_weights(model):  # integer weights + scales: compress=qat, dq, int8wo, int4wo
        packed.save_packed(model, tokenizer, directory)
        return
    if any(stored_sparse(t) for t in model.state_dict().values()):
        save_sparse(model, directory)
    else:
        model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def load(directory: str | Path, head: str):
    """The model saved in `directory`, with the head it was trained with."""
    directory = Path(directory)
    if packed.is_packed(directory):
        return packed.load_packed(directory, head)
    if (directory / SPARSE_FILE).exists():
        return load_sparse(directory, head)
    config = AutoConfig.from_pretrained(str(directory))
    if getattr(config, pruned_attention.LAYOUT, None):  # heads removed (BERT, GPT-2): squeeze's own classes
        return loading_class(config, models.HEADS[head]).from_pretrained(str(directory))
    return models.load_saved(directory, head)


# -- tensors ---------------------------------------------------------------------------------------
def nonzero_entries(t: torch.Tensor) -> torch.Tensor:
    """Where `t`'s entries have any non-zero byte (bitwise, so -0.0 counts as a value)."""
    raw = t.detach().contiguous().view(torch.uint8)
    return raw.view(*t.shape, t.element_size()).ne(0).any(-1)


def stored_sparse(t: torch.Tensor, min_sparsity: float = MIN_SPARSITY) -> bool:
    if not t.is_floating_point() or t.dim() < 2 or t.numel() == 0:
        return False
    kept = int(nonzero_entries(t).sum())
    sparse_bytes = (t.numel() + 7) // 8 + kept * t.element_size()
    return 1 - kept / t.numel() >= min_sparsity and sparse_bytes < t.numel() * t.element_size()


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) << _SHIFTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    return ((packed.unsqueeze(1) >> _SHIFTS) & 1).flatten()[:count].bool()


def encode(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmask, values) of a tensor."""
    keep = nonzero_entries(t).flatten()
    return pack_bits(keep), t.detach().flatten()[keep].clone()


def decode(bitmask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    keep = unpack_bits(bitmask, int(torch.Size(shape).numel()))
    out = torch.zeros(keep.numel(), dtype=values.dtype)  # all-zero bytes: +0.0
    out[keep] = values
    return out.view(shape)


# -- the directory ---------------------------------------------------------------------------------
def save_sparse(model, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    tied: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        same = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if same in first:  # tied weights are one tensor: store it once
            tied[name] = first[same]
            continue
        first[same] = name
        t = t.detach().cpu().contiguous()
        # MIN_SPARSITY decides whether the model is sparse at all; once it is, every matrix that packs
        # smaller does (global pruning leaves some matrices barely pruned, others mostly empty).
        if stored_sparse(t, min_sparsity=0.0):
            tensors[name + BITMASK], tensors[name + VALUES] = encode(t)
            shapes[name] = list(t.shape)
        else:
            tensors[name] = t
    metadata = {"format": FORMAT, "version": VERSION, "shapes": json.dumps(shapes), "tied": json.dumps(tied)}
    save_file(tensors, str(directory / SPARSE_FILE), metadata=metadata)
    # What save_pretrained writes besides the weights, so transformers reads the config as usual.
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(directory))
    if model.can_generate():
        model.generation_config.save_pretrained(str(directory))


def read_sparse(path: Path) -> dict[str, torch.Tensor]:
    """The full state dict (tied names included) stored in a sparse-format file."""
    with safe_open(str(path), framework="pt") as f:
        meta = packed.checked_metadata(f, path, FORMAT, VERSION, "sparse")
        shapes, tied = json.loads(meta["shapes"]), json.loads(meta["tied"])
        state = {k: f.get_tensor(k) for k in f.keys() if not k.endswith((BITMASK, VALUES))}  # noqa: SIM118
        for name, shape in shapes.items():
            state[name] = decode(f.get_tensor(name + BITMASK), f.get_tensor(name + VALUES), shape)
    for name, source in tied.items():
        state[name] = state[source]
    return state


def load_sparse(directory: Path, head: str):
    state = read_sparse(directory / SPARSE_FILE)
    config = AutoConfig.from_pretrained(str(directory))
    try:
        # The concrete class: the Auto classes refuse a state_dict without a checkpoint name.
        cls = loading_class(config, models.HEADS[head])
    except (KeyError, ValueError) as e:
        raise SqueezeError(f"{directory} holds a {config.model_type} model, which has no {head} head") from e
    model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    # from_pretrained would random-initialise what is missing; a checkpoint must fit exactly.
    problems = [f"{len(v)} {k.replace('_', ' ')} (e.g. {min(map(str, v))})"
                for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := info.get(k))]
    if problems:
        raise SqueezeError(f"{directory} does not hold a {cls.__name__}: {', '.join(problems)}; evaluate it with "
                           "the task it was trained on")
    return model
