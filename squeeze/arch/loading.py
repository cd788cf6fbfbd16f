"""Which class loads a saved model: the stock class, or, when structured pruning removed heads from a
family whose config cannot say so (config.attention_layout), its twin from squeeze's own
pruned_attention.py, so squeeze never needs to run code a model directory brings."""

from __future__ import annotations

from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)

from squeeze.arch import pruned_attention
from squeeze.errors import SqueezeError

# A task head's name → the Auto class that builds or loads a model with it.
HEADS = {
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
    "causal_lm": AutoModelForCausalLM,
    "masked_lm": AutoModelForMaskedLM,
}


def has_pruned_attention(config) -> bool:
    """True when the saved model needs pruned_attention's classes (heads or head dims were removed)."""
    return bool(getattr(config, pruned_attention.LAYOUT, None))


def reload_kind(model) -> str:
    """How plain transformers loads the saved model: "stock", or "trust_remote_code" when its
    directory carries pruned_attention.py."""
    return "trust_remote_code" if has_pruned_attention(model.config) else "stock"


def loading_class(config, auto_class) -> type:
    """The class that loads a saved model with `config` as `auto_class` (AutoModelFor...)."""
    from transformers.models.auto.auto_factory import _get_model_class

    cls = _get_model_class(config, auto_class._model_mapping)
    if not has_pruned_attention(config):
        return cls
    if cls not in pruned_attention.TWINS:
        raise SqueezeError(f"a {config.model_type} model with pruned attention cannot be loaded as {cls.__name__}; "
                           f"supported: {', '.join(sorted(c.__name__ for c in pruned_attention.TWINS))}")
    return pruned_attention.TWINS[cls][0]


def twin_classes() -> set[type]:
    return {twin for twin, _ in pruned_attention.TWINS.values()}


def check_twin(model, what: str) -> None:
    """Structured pruning of a family without config head counts needs a reloadable twin of the model's class."""
    stock = type(model)
    if stock not in pruned_attention.TWINS and stock not in twin_classes():
        raise SqueezeError(f"{what}: {stock.__name__} has no reloadable pruned twin; supported heads are "
                           f"{', '.join(sorted(c.__name__ for c in pruned_attention.TWINS))}")


def use_twin(model) -> None:
    """Make `model` save as its pruned-attention twin: save_pretrained then copies pruned_attention.py and
    writes auto_map. The twin only adds a constructor that resizes: same forward, same state."""
    if type(model) in twin_classes():
        return
    twin, auto_class = pruned_attention.TWINS[type(model)]
    model.__class__ = twin
    twin.register_for_auto_class(auto_class)
