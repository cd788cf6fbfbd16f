"""squeeze's own sparse format: a pruned model whose zeros are not stored. compressed-tensors 0.20 with
transformers 5 has no sparse format any more (its sparse-bitmask compressor is gone, and transformers'
CompressedTensorsConfig reads no sparsity_config), so a pruned float model is still written here:

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

from transformers import AutoConfig

from squeeze.errors import SqueezeError
from squeeze.formats.common import checked_metadata, model_class, save_config, ties, write_safetensors

SPARSE_FILE = "model.sparse.safetensors"
FORMAT, VERSION = "squeeze-sparse", "1"
# Below this a tensor is stored dense: a dense model's incidental zeros (a padding embedding row)
# never switch it to the sparse format.
MIN_SPARSITY = 0.25
BITMASK, VALUES = ":bitmask", ":values"
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


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
    tied = ties(model)  # tied weights are one tensor: stored once
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in model.state_dict().items():
        if name in tied:
            continue
        t = t.detach().cpu().contiguous()
        # MIN_SPARSITY decides whether the model is sparse at all; once it is, every matrix that packs
        # smaller does (global pruning leaves some matrices barely pruned, others mostly empty).
        if stored_sparse(t, min_sparsity=0.0):
            tensors[name + BITMASK], tensors[name + VALUES] = encode(t)
            shapes[name] = list(t.shape)
        else:
            tensors[name] = t
    metadata = {"format": FORMAT, "version": VERSION, "shapes": json.dumps(shapes), "tied": json.dumps(tied)}
    write_safetensors(tensors, directory / SPARSE_FILE, metadata)
    save_config(model, directory)


def read_sparse(path: Path) -> dict[str, torch.Tensor]:
    """The full state dict (tied names included) stored in a sparse-format file."""
    with safe_open(str(path), framework="pt") as f:
        meta = checked_metadata(f, path, FORMAT, VERSION, "sparse")
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
    cls = model_class(config, head, directory)  # the Auto classes refuse a state_dict without a checkpoint name
    model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    # from_pretrained would random-initialise what is missing; a checkpoint must fit exactly.
    problems = [f"{len(v)} {k.replace('_', ' ')} (e.g. {min(map(str, v))})"
                for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := info.get(k))]
    if problems:
        raise SqueezeError(f"{directory} does not hold a {cls.__name__}: {', '.join(problems)}; evaluate it with "
                           "the task it was trained on")
    return model


def load_sparse_body(directory: Path, head: str, **config_settings):
    """The pruned model in `directory` as the start of another task: its body, zeros included, under the `head`
    asked for (a masked LM pre-trained and pruned, fine-tuned as a classifier). The new head is initialised as
    from_pretrained initialises one; the saved model's own head is left behind. (model, what was left, what was
    initialised)."""
    state = read_sparse(directory / SPARSE_FILE)
    config = AutoConfig.from_pretrained(str(directory), **config_settings)
    cls = model_class(config, head, directory)
    model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    if info.get("mismatched_keys"):
        raise SqueezeError(f"{directory}: {len(info['mismatched_keys'])} tensors do not fit a {cls.__name__} "
                           f"(e.g. {min(map(str, info['mismatched_keys']))}); start from a model of this family")
    return model, sorted(map(str, info.get("unexpected_keys") or [])), sorted(map(str, info.get("missing_keys") or []))
