"""Saving and loading models (`<run>/model`), below the compressors: nothing here imports squeeze.compress
or squeeze.models (the model classes come from squeeze.arch.loading).

`save` picks the format from the model and names it in the directory's tag, squeeze_format.json
({"format": "dense" | "compressed-tensors" | "squeeze-sparse" | "squeeze-packed"}); `load` reads that
format. A directory without a tag (saved before squeeze wrote one, or by another tool) is read as its files
show: packed, sparse, compressed-tensors, dense, in that order.

    dense float         save_pretrained's model.safetensors                              any transformers
    integer weights     compressed-tensors (compressed.py) in model.safetensors          from_pretrained
    (qat, dq, int8wo,   + config.json quantization_config; pruned zeros stay zero, stored densely
     int4wo)
    pruned float        squeeze's sparse bitmask format (sparse.py)                      squeeze only
    integer weights that compressed-tensors cannot express (`why_not_compressed`), or pruned ones
    (survivors only, bitmask + integers; compressed-tensors would store the zeros):
                        squeeze's packed format (packed.py)                              squeeze only

squeeze's loader gives back its own integer layers (QuantizedLinear with the kernel and cpu_kernel the
model was saved with: fbgemm's dynamic int8 for compress=dq, ...), bit-identical to the saved model;
transformers' loader gives compressed-tensors' layers with the same weights. Kernels' packed weights are
built at first use and never saved. `kernels_used(model)` says which kernels the integer layers ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from squeeze.arch.loading import HEADS
from squeeze.arch.pruned_attention import LAYOUT
from squeeze.errors import SqueezeError, out_of_space
from squeeze.formats import compressed, packed, sparse
from squeeze.formats.common import model_class, normal_mode
from squeeze.formats.quantized_layers import QuantizedEmbedding, QuantizedLinear, kernels_used  # noqa: F401

TAG_FILE = "squeeze_format.json"
DENSE, COMPRESSED = "dense", "compressed-tensors"


def has_quantized_weights(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def compressed_tensors_refuses(layer: nn.Module) -> str | None:
    """Why compressed-tensors cannot hold this integer layer so that stock transformers 5 loads it, or None."""
    if isinstance(layer, QuantizedLinear) and layer.from_conv1d:
        return ("it was GPT-2's Conv1D, quantized as nn.Linear: stock GPT-2 builds Conv1D, which compressed-tensors "
                "does not quantize (it quantizes Linear and Embedding)")
    if isinstance(layer, QuantizedLinear) and layer.input_divisor is not None:
        return ("its input is divided per channel by AWQ's scales (no layer before it can absorb them), which "
                "compressed-tensors has no field for; compress.awq.scale_unfoldable=false leaves such layers without")
    if isinstance(layer, QuantizedLinear) and layer.bits <= 4 and layer.zero_point is not None:
        return ("it has affine int4 weights: transformers 5's compressed-tensors loader expects another shape for "
                "their packed zero points (a size mismatch on load); symmetric int4 loads")
    if isinstance(layer, QuantizedEmbedding) and layer.bits <= 4:
        return ("it is an int4 embedding: compressed-tensors packs it as weight_packed, and transformers 5 needs an "
                "embedding's weight (to initialise it, and to tie lm_head to it); compress.<name>.embeddings=false "
                "keeps embeddings in float and the format loadable")
    return None


def why_not_compressed(model: nn.Module) -> str | None:
    """Why compressed-tensors cannot hold this quantized model so that stock transformers loads it, or None."""
    if getattr(model.config, LAYOUT, None):
        return ("its attention heads were removed (BERT/GPT-2): transformers builds that model only from the "
                "directory's pruned_attention.py, which compressed-tensors' loader does not quantize")
    refused = [(n, why) for n, m in model.named_modules() if (why := compressed_tensors_refuses(m))]
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        return f"{refused[0][0]}{more}: {refused[0][1]}"
    return None


def loads_in_transformers(directory: str | Path) -> str:
    """How plain transformers (no squeeze) loads a saved model directory, in one line for result.json."""
    directory = Path(directory)
    fmt = saved_format(directory)
    if fmt == DENSE:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        if config.get(LAYOUT):
            return ("with trust_remote_code=True (pruned_attention.py beside the weights; python -m squeeze.export "
                    "writes a stock copy)")
        return "yes"
    if fmt == COMPRESSED:
        return "yes, with the compressed-tensors package installed"
    return f"no: squeeze's {fmt} format; python -m squeeze.export <run> <dir> writes a copy that loads"


def save_dense(model, directory: Path) -> None:
    """save_pretrained's plain safetensors, with the umask's file mode (safetensors writes 0600)."""
    model.save_pretrained(str(directory))
    for weights in directory.glob("*.safetensors"):
        normal_mode(weights)


def save(model, tokenizer, directory: str | Path) -> None:
    """Write `model` and `tokenizer` to `directory` in the format that fits the model (module docstring)."""
    directory = Path(directory)
    if has_quantized_weights(model):  # integer weights + scales: compress=qat, dq, int8wo, int4wo
        # Pruned and quantized ([imp,int8wo]): compressed-tensors would keep every zero, so pruning saved nothing.
        if why_not_compressed(model) is None and not packed.has_sparse_integers(model):
            compressed.save_compressed(model, tokenizer, directory)
            fmt = COMPRESSED
        else:
            packed.save_packed(model, tokenizer, directory)
            fmt = packed.FORMAT
    else:
        if any(sparse.stored_sparse(t) for t in model.state_dict().values()):
            sparse.save_sparse(model, directory)
            fmt = sparse.FORMAT
        else:
            save_dense(model, directory)
            fmt = DENSE
        tokenizer.save_pretrained(str(directory))
    (directory / TAG_FILE).write_text(json.dumps({"format": fmt}) + "\n", encoding="utf-8")


def save_atomic(model, tokenizer, directory: str | Path, instead: str, extra=None) -> Path:
    """`save`, written beside `directory` and then renamed over it, so a failed save never loses a model saved
    there before. A full disk (or another OSError) is one line that ends with what to do `instead`.
    `extra(dir)` writes what goes beside the model (a task's head), inside the same rename."""
    final = Path(directory)
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(model, tokenizer, tmp)
        if extra is not None:
            extra(tmp)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(e, OSError) or out_of_space(e)):
            raise
        raise SqueezeError(f"could not save the model to {final} ({getattr(e, 'strerror', None) or e}); free disk "
                           f"space and {instead}") from e
    old = final.parent / f".{final.name}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def saved_format(directory: str | Path) -> str:
    """The format of a saved model directory: its tag, else what its files show (module docstring)."""
    directory = Path(directory)
    tag = directory / TAG_FILE
    if tag.is_file():
        try:
            fmt = json.loads(tag.read_text(encoding="utf-8"))["format"]
        except (ValueError, KeyError, TypeError) as e:
            raise SqueezeError(f"{tag} is not a squeeze format tag ({e}); save the model again with squeeze") from e
        if fmt not in READERS:
            raise SqueezeError(f"{directory} holds a model in the {fmt!r} format, which this squeeze cannot read (it "
                               f"reads {', '.join(READERS)}); use the squeeze version that wrote it")
        return fmt
    if packed.is_packed(directory):
        return packed.FORMAT
    if (directory / sparse.SPARSE_FILE).exists():
        return sparse.FORMAT
    if compressed.is_compressed(directory):
        return COMPRESSED
    return DENSE


def load(directory: str | Path, head: str):
    """The model saved in `directory`, with the head it was trained with, read in the directory's format."""
    directory = Path(directory)
    return READERS[saved_format(directory)](directory, head)


def load_dense(directory: str | Path, head: str, dtype: str = "float32"):
    """A float model as save_pretrained wrote it (squeeze's own classes where heads were removed)."""
    from transformers import AutoConfig

    directory = Path(directory)
    config = AutoConfig.from_pretrained(str(directory))
    if getattr(config, LAYOUT, None):  # heads removed (BERT, GPT-2, OPT): squeeze's own classes
        return model_class(config, head, directory).from_pretrained(str(directory))
    return HEADS[head].from_pretrained(str(directory), dtype=getattr(torch, dtype))


def _load_compressed(directory: Path, head: str):
    read = compressed.read_compressed(directory)
    if read is None:  # written by another tool: transformers' compressed-tensors loader reads it
        return load_dense(directory, head)
    return packed.build_quantized(directory, head, *read)


READERS = {DENSE: load_dense, COMPRESSED: _load_compressed, sparse.FORMAT: sparse.load_sparse,
           packed.FORMAT: packed.load_packed}

