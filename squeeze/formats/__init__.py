"""Saving and loading models (`<run>/model`), below the compressors: nothing here imports squeeze.compress
(except, until squeeze/arch/pruned_attention.py exists, structured.loading_class in common.model_class).

`save` picks the format from the model; `load` from the directory:

    dense float         save_pretrained's model.safetensors                              any transformers
    integer weights     compressed-tensors (compressed.py) in model.safetensors          from_pretrained
    (qat, dq, int8wo,   + config.json quantization_config; pruned zeros stay zero, stored densely
     int4wo)
    pruned float        squeeze's sparse bitmask format (sparse.py)                      squeeze only
    integer weights that compressed-tensors cannot express (`why_not_compressed`):
                        squeeze's packed format (packed.py)                              squeeze only

squeeze's loader gives back its own integer layers (QuantizedLinear with the kernel and cpu_kernel the
model was saved with: fbgemm's dynamic int8 for compress=dq, ...), bit-identical to the saved model;
transformers' loader gives compressed-tensors' layers with the same weights. Kernels' packed weights are
built at first use and never saved. `kernels_used(model)` says which kernels the integer layers ran.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from squeeze import models
from squeeze.arch.pruned_attention import LAYOUT
from squeeze.formats import compressed, packed, sparse
from squeeze.formats.common import model_class, normal_mode
from squeeze.formats.quantized_layers import QuantizedEmbedding, QuantizedLinear, kernels_used  # noqa: F401



def has_quantized_weights(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def why_not_compressed(model: nn.Module) -> str | None:
    """Why compressed-tensors cannot hold this quantized model so that stock transformers loads it, or None."""
    if getattr(model.config, LAYOUT, None):
        return ("its attention heads were removed (BERT/GPT-2): transformers builds that model only from the "
                "directory's pruned_attention.py, which compressed-tensors' loader does not quantize")
    conv = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.from_conv1d]
    if conv:
        return (f"{conv[0]} (and {len(conv) - 1} more) was GPT-2's Conv1D, quantized as nn.Linear: stock GPT-2 "
                "builds Conv1D, which compressed-tensors does not quantize (it quantizes Linear and Embedding)")
    affine4 = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.bits < 8
               and m.zero_point is not None]
    if affine4:
        return (f"{affine4[0]} has affine int4 weights: transformers 5's compressed-tensors loader expects another "
                "shape for their packed zero points (a size mismatch on load); symmetric int4 loads")
    emb4 = [n for n, m in model.named_modules() if isinstance(m, QuantizedEmbedding) and m.bits < 8]
    if emb4:
        return (f"{emb4[0]} is an int4 embedding: compressed-tensors packs it as weight_packed, and transformers 5 "
                "needs an embedding's weight (to initialise it, and to tie lm_head to it); "
                "compress.<name>.embeddings=false keeps embeddings in float and the format loadable")
    return None


def save(model, tokenizer, directory: str | Path) -> None:
    """Write `model` and `tokenizer` to `directory` in the format that fits the model (module docstring)."""
    directory = Path(directory)
    if has_quantized_weights(model):  # integer weights + scales: compress=qat, dq, int8wo, int4wo
        if why_not_compressed(model) is None:
            compressed.save_compressed(model, tokenizer, directory)
        else:
            packed.save_packed(model, tokenizer, directory)
        return
    if any(sparse.stored_sparse(t) for t in model.state_dict().values()):
        sparse.save_sparse(model, directory)
    else:
        model.save_pretrained(str(directory))
        for weights in directory.glob("*.safetensors"):
            normal_mode(weights)
    tokenizer.save_pretrained(str(directory))


def load(directory: str | Path, head: str):
    """The model saved in `directory`, with the head it was trained with."""
    directory = Path(directory)
    if packed.is_packed(directory):
        return packed.load_packed(directory, head)
    if (directory / sparse.SPARSE_FILE).exists():
        return sparse.load_sparse(directory, head)
    if compressed.is_compressed(directory):
        read = compressed.read_compressed(directory)
        if read is not None:
            return packed.build_quantized(directory, head, *read)
        # written by another tool: transformers' compressed-tensors loader (below) reads it
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(directory))
    if getattr(config, LAYOUT, None):  # heads removed (BERT, GPT-2): squeeze's own classes
        return model_class(config, head, directory).from_pretrained(str(directory))
    return models.load_saved(directory, head)

