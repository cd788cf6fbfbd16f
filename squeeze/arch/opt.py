"""OPT (model_type opt: facebook/opt-125m …): a decoder.

Each layer: self_attn.{q,k,v,out}_proj (nn.Linear) and the MLP as the layer's own fc1/fc2 (which the
old shared pruning patterns missed). The MLP width is config.ffn_dim; no config field can express
removed heads, so a pruned OPT carries pruned_attention.py like BERT and GPT-2. transformers has no
OPT token-classification head.
"""

from __future__ import annotations

from torch import nn

from squeeze.arch import pruned_attention
from squeeze.arch.base import SeparateQKVAdapter


class OPTAdapter(SeparateQKVAdapter):
    family = "opt"
    model_types = ("opt",)
    heads = ("sequence_classification", "causal_lm")
    stack_path = "decoder.layers"
    # OPTDecoder applies no dropout to the embeddings (its `dropout` float is unused there).
    final_norm_path = "decoder.final_layer_norm"
    position_embeddings_path = "decoder.embed_positions"
    norm_types = (nn.LayerNorm,)
    out_name = "out_proj"
    dropout_name = "dropout"
    intermediate_key = "ffn_dim"
    prune_include = r"self_attn\.(q|k|v|out)_proj|fc1|fc2"
    prune_exclude = r"embed|norm"

    def resized_attention(self, attention, heads, head_dim):
        pruned_attention.set_sizes(attention, heads, head_dim)  # its forward reshapes with (num_heads, head_dim)

    def smoothing_pairs(self, layer):
        a = layer.self_attn
        pairs = [(a.v_proj, [a.out_proj])]  # attention mixes tokens, not channels: exact in any layout
        if layer.do_layer_norm_before:  # pre-norm (all but opt-350m): the norms feed only their sublayer
            pairs += [(layer.self_attn_layer_norm, [a.q_proj, a.k_proj, a.v_proj]), (layer.final_layer_norm, [layer.fc1])]
        return pairs

    def mlp(self, layer):
        return [(layer, "fc1")], (layer, "fc2")

    def prepare_tokenizer(self, tokenizer):
        # OPT was trained with its BOS (</s>) in front of every sequence, and its own tokenizer adds it;
        # a GPT-2 BPE standing in for it (tiny_opt) must do the same.
        tokenizer = super().prepare_tokenizer(tokenizer)
        if tokenizer.bos_token is not None and not getattr(tokenizer, "add_bos_token", True):
            tokenizer.add_bos_token = True
        return tokenizer
