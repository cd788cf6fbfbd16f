"""What every saved-model format shares: the model class a directory loads as, the config files
written beside the weights, tied tensors, and weight files with the umask's normal mode."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from squeeze.arch.loading import HEADS, loading_class
from squeeze.errors import SqueezeError


def model_class(config, head: str, directory: Path) -> type:
    """The concrete class a saved model loads as with `head` (the Auto classes build from a checkpoint
    name, the formats fill the model themselves): the stock class, or squeeze's own twin for BERT/GPT-2
    with removed heads."""
    try:
        return loading_class(config, HEADS[head])
    except (KeyError, ValueError) as e:
        raise SqueezeError(f"{directory} holds a {config.model_type} model, which has no {head} head") from e


def ties(model: nn.Module) -> dict[str, str]:
    """{state-dict name: the first name sharing its storage}, e.g. lm_head.weight → embed_tokens.weight."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for name, t in model.state_dict().items():
        same = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if same in first:
            tied[name] = first[same]
        else:
            first[same] = name
    return tied


def share(model: nn.Module, name: str, source: str) -> None:
    """Make `name` the very tensor `source` is (a tie, as saved), not an equal copy."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    src_owner, _, src_attr = source.rpartition(".")
    src_module = model.get_submodule(src_owner)
    if attr in module._parameters and src_attr in src_module._parameters:
        module._parameters[attr] = src_module._parameters[src_attr]
    elif attr in module._buffers and src_attr in src_module._buffers:
        module._buffers[attr] = src_module._buffers[src_attr]


def normal_mode(path: Path) -> None:
    """Give a file the mode a plain open() would (0666 less the umask): safetensors writes 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)
    normal_mode(path)


def save_config(model, directory: Path) -> None:
    """What save_pretrained writes besides the weights, so transformers reads the config as usual."""
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(directory))
    if model.can_generate():
        model.generation_config.save_pretrained(str(directory))


def checked_metadata(f, path: Path, fmt: str, version: str | tuple[str, ...], kind: str) -> dict[str, str]:
    """The metadata of one of squeeze's own safetensors formats (packed, sparse), refused when the file is
    another format or a version of it this squeeze does not read (`version`: the one, or those, it reads)."""
    versions = (version,) if isinstance(version, str) else tuple(version)
    meta = f.metadata() or {}
    if meta.get("format") != fmt:
        raise SqueezeError(f"{path} is not a squeeze {kind} checkpoint (format {meta.get('format')!r}); "
                           "save the model again with squeeze")
    if meta.get("version") not in versions:
        raise SqueezeError(f"{path} has {kind} format version {meta.get('version')!r}, this squeeze reads "
                           f"version {' or '.join(versions)}; use the squeeze version that wrote it")
    return meta
