"""Model-family adapters: everything squeeze knows about one architecture lives in that family's file.

    adapter_for(model | config | model_type) -> Adapter     the one lookup; unknown families are refused

Nothing outside this package branches on a family name or model_type: it asks the adapter.
"""

from __future__ import annotations

from typing import Any

from squeeze.arch.base import DECODER_HEADS, ENCODER_HEADS, Adapter, EncoderAdapter, DecoderAdapter, HeadLayout
from squeeze.arch.bert import BertAdapter
from squeeze.arch.distilbert import DistilBertAdapter
from squeeze.arch.gpt2 import GPT2Adapter
from squeeze.arch.llama import LlamaAdapter
from squeeze.arch.opt import OPTAdapter
from squeeze.errors import SqueezeError

ADAPTERS: tuple[type[Adapter], ...] = (BertAdapter, DistilBertAdapter, GPT2Adapter, LlamaAdapter, OPTAdapter)
_BY_MODEL_TYPE = {model_type: cls for cls in ADAPTERS for model_type in cls.model_types}
# Which task heads make sense for a model kind (an adapter's `kind`; model.kind in conf/model/*.yaml).
HEADS_FOR_KIND = {"encoder": ENCODER_HEADS, "decoder": DECODER_HEADS}

__all__ = ["ADAPTERS", "Adapter", "DecoderAdapter", "EncoderAdapter", "HEADS_FOR_KIND", "HeadLayout", "adapter_for",
           "find_adapter", "model_type_of", "supported"]


def model_type_of(thing: Any) -> str:
    """The transformers model_type of a model, a config, or the string itself."""
    if isinstance(thing, str):
        return thing
    config = getattr(thing, "config", thing)
    return getattr(config, "model_type", None) or type(thing).__name__


def supported() -> str:
    return ", ".join(f"{cls.family} ({'/'.join(cls.model_types)})" for cls in ADAPTERS)


def adapter_for(thing: Any) -> Adapter:
    """The family adapter of a model, a config or a model_type string."""
    model_type = model_type_of(thing)
    if model_type not in _BY_MODEL_TYPE:
        raise SqueezeError(f"squeeze does not know the {model_type!r} architecture; supported families (model_type): "
                           f"{supported()}. Pick one of those models (e.g. model=minilm, tiny_gpt2, tiny_llama), or "
                           "add an adapter in squeeze/arch/")
    return _BY_MODEL_TYPE[model_type]()


def find_adapter(thing: Any) -> Adapter | None:
    """The family adapter, or None for an architecture squeeze has none for (plain fine-tuning still works)."""
    cls = _BY_MODEL_TYPE.get(model_type_of(thing))
    return cls() if cls else None
