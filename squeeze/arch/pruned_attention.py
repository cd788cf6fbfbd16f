"""BERT, GPT-2 and OPT with a different attention size in each layer: how a model whose heads (or head
dims) were removed by squeeze's structured pruning loads again.

transformers 5 sizes every layer's attention from hidden_size / num_attention_heads (there is no
head_dim setting for these architectures, and config.pruned_heads is gone), so stock classes
cannot express fewer heads. The saved config.json keeps the stock sizes, adds `attention_layout`
([heads, head_dim] per layer) and an `auto_map` naming a class below, and this file is copied next to
the weights. Plain transformers then loads it:

    AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)

This file imports only torch and transformers, because it travels with every such model. That is why
it finds each family's attention modules itself instead of asking squeeze.arch's adapters: the one
place outside the adapters where family-specific code is accepted. squeeze.arch.loading picks these
classes when squeeze itself loads such a directory.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
    OPTForCausalLM,
    OPTForSequenceClassification,
    OPTModel,
)
from transformers.pytorch_utils import Conv1D

LAYOUT = "attention_layout"


def attention_blocks(model) -> list:
    """Each layer's attention: BertAttention (self + output), GPT2Attention or OPTAttention."""
    base = getattr(model, model.base_model_prefix, model)
    if hasattr(base, "encoder"):  # BERT
        return [layer.attention for layer in base.encoder.layer]
    if hasattr(base, "decoder"):  # OPT
        return [layer.self_attn for layer in base.decoder.layers]
    return [block.attn for block in base.h]  # GPT-2


def set_sizes(attention, heads: int, head_dim: int) -> None:
    """Record a layer's new head count and head size on its attention module. The score scaling
    is left as the unpruned head size gave it: a removed q·k term is simply gone, the others are
    scaled as before, so pruned and masked models agree exactly."""
    if hasattr(attention, "self"):  # BERT: forward reshapes with (-1, attention_head_size)
        attention.self.num_attention_heads = heads
        attention.self.attention_head_size = head_dim
        attention.self.all_head_size = heads * head_dim
    elif hasattr(attention, "q_proj"):  # OPT: forward reshapes with (num_heads, head_dim)
        attention.num_heads = heads
        attention.head_dim = head_dim
    else:  # GPT-2: forward splits the fused projection at split_size, reshapes with head_dim
        attention.num_heads = heads
        attention.head_dim = head_dim
        attention.split_size = heads * head_dim


def resize(model) -> None:
    """Give each layer's attention the (empty) projections its saved weights have."""
    hidden = model.config.hidden_size
    layout = getattr(model.config, LAYOUT, None) or []  # none: a stock model
    for attention, (heads, head_dim) in zip(attention_blocks(model), layout):
        width = heads * head_dim
        if hasattr(attention, "self"):
            for name in ("query", "key", "value"):
                setattr(attention.self, name, nn.Linear(hidden, width))
            attention.output.dense = nn.Linear(width, hidden)
        elif hasattr(attention, "q_proj"):
            bias = model.config.enable_bias
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attention, name, nn.Linear(hidden, width, bias=bias))
            attention.out_proj = nn.Linear(width, hidden, bias=bias)
        else:
            attention.c_attn = Conv1D(3 * width, hidden)
            attention.c_proj = Conv1D(hidden, width)
        set_sizes(attention, heads, head_dim)


def restore_stock(model) -> list[list[int]] | None:
    """Give every layer its stock head count and head size back, in place: the removed heads and head dims return
    as zeros (a zero query/key dim adds nothing to a score, a zero value dim feeds only zero output columns, and
    the score scaling was always the stock head size's), so the outputs are unchanged and a stock class, without
    this file, loads the model (squeeze.export). The layout it had, or None for a model with stock attention."""
    config = model.config
    layout = getattr(config, LAYOUT, None)
    if not layout:
        return None
    hidden, heads = config.hidden_size, config.num_attention_heads
    stock_dim = hidden // heads
    for attention, (kept, head_dim) in zip(attention_blocks(model), layout):
        # where each of the pruned layer's q/k/v features goes among the stock ones: head h, dim j → h·d + j
        index = torch.tensor([h * stock_dim + j for h in range(kept) for j in range(head_dim)], dtype=torch.long)
        if hasattr(attention, "self"):  # BERT
            for name in ("query", "key", "value"):
                setattr(attention.self, name, _widened(getattr(attention.self, name), index, hidden, out=True))
            attention.output.dense = _widened(attention.output.dense, index, hidden, out=False)
        elif hasattr(attention, "q_proj"):  # OPT
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attention, name, _widened(getattr(attention, name), index, hidden, out=True))
            attention.out_proj = _widened(attention.out_proj, index, hidden, out=False)
        else:  # GPT-2: q | k | v side by side in one Conv1D
            fused = torch.cat([index + part * hidden for part in range(3)])
            attention.c_attn = _widened(attention.c_attn, fused, 3 * hidden, out=True)
            attention.c_proj = _widened(attention.c_proj, index, hidden, out=False)
        set_sizes(attention, heads, stock_dim)
    for key in (LAYOUT, "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    stock = {twin: cls for cls, (twin, _) in TWINS.items()}
    model.__class__ = stock.get(type(model), type(model))
    return [list(x) for x in layout]


@torch.no_grad()
def _widened(layer, index, size: int, out: bool):
    """A copy of `layer` (Linear or Conv1D) with `size` output (out=True) or input features, its own at `index`
    and zeros elsewhere."""
    conv = isinstance(layer, Conv1D)
    weight = layer.weight.t() if conv else layer.weight  # [out, in]
    rows, cols = (size, weight.shape[1]) if out else (weight.shape[0], size)
    new_weight = weight.new_zeros(rows, cols)
    if out:
        new_weight[index] = weight
    else:
        new_weight[:, index] = weight
    bias = layer.bias
    if conv:
        new = Conv1D(rows, cols)
        new.weight = nn.Parameter(new_weight.t().contiguous())
    else:
        new = nn.Linear(cols, rows, bias=bias is not None)
        new.weight = nn.Parameter(new_weight)
    if bias is not None:
        new_bias = bias.new_zeros(rows) if out else bias.detach().clone()
        if out:
            new_bias[index] = bias
        new.bias = nn.Parameter(new_bias)
    return new.to(weight.device)


class _Resized:
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        resize(self)


class PrunedBertModel(_Resized, BertModel):
    pass


class PrunedBertForMaskedLM(_Resized, BertForMaskedLM):
    pass


class PrunedBertForSequenceClassification(_Resized, BertForSequenceClassification):
    pass


class PrunedBertForTokenClassification(_Resized, BertForTokenClassification):
    pass


class PrunedGPT2Model(_Resized, GPT2Model):
    pass


class PrunedGPT2LMHeadModel(_Resized, GPT2LMHeadModel):
    pass


class PrunedGPT2ForSequenceClassification(_Resized, GPT2ForSequenceClassification):
    pass


class PrunedGPT2ForTokenClassification(_Resized, GPT2ForTokenClassification):
    pass


class PrunedOPTModel(_Resized, OPTModel):
    pass


class PrunedOPTForCausalLM(_Resized, OPTForCausalLM):
    pass


class PrunedOPTForSequenceClassification(_Resized, OPTForSequenceClassification):
    pass


# stock class → (its resized twin, the Auto class that loads it)
TWINS = {
    BertModel: (PrunedBertModel, "AutoModel"),
    BertForMaskedLM: (PrunedBertForMaskedLM, "AutoModelForMaskedLM"),
    BertForSequenceClassification: (PrunedBertForSequenceClassification, "AutoModelForSequenceClassification"),
    BertForTokenClassification: (PrunedBertForTokenClassification, "AutoModelForTokenClassification"),
    GPT2Model: (PrunedGPT2Model, "AutoModel"),
    GPT2LMHeadModel: (PrunedGPT2LMHeadModel, "AutoModelForCausalLM"),
    GPT2ForSequenceClassification: (PrunedGPT2ForSequenceClassification, "AutoModelForSequenceClassification"),
    GPT2ForTokenClassification: (PrunedGPT2ForTokenClassification, "AutoModelForTokenClassification"),
    OPTModel: (PrunedOPTModel, "AutoModel"),
    OPTForCausalLM: (PrunedOPTForCausalLM, "AutoModelForCausalLM"),
    OPTForSequenceClassification: (PrunedOPTForSequenceClassification, "AutoModelForSequenceClassification"),
}
