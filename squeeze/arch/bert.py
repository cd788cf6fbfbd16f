"""BERT (and every checkpoint with model_type bert, e.g. all-MiniLM-L6-v2): an encoder.

Each layer: attention.self.{query,key,value} (nn.Linear), attention.output.dense, intermediate.dense
(the MLP's neurons), output.dense. No config field can express removed heads, so a pruned BERT carries
pruned_attention.py (see there).
"""

from __future__ import annotations

from torch import nn

from squeeze.arch import pruned_attention
from squeeze.arch.base import EncoderAdapter, HeadLayout
from squeeze.errors import SqueezeError


class BertAdapter(EncoderAdapter):
    family = "bert"
    model_types = ("bert",)
    stack_path = "encoder.layer"
    # attention.self.*, attention.output.dense, intermediate.dense, output.dense; LayerNorm is a norm.
    prune_include = r"attention|intermediate|output\.dense"
    prune_exclude = r"embed|norm"
    norm_types = (nn.LayerNorm,)

    def shape(self, layer):
        s = layer.attention.self
        heads = s.num_attention_heads
        return HeadLayout(heads, heads, s.attention_head_size, layer.intermediate.dense.out_features)

    def qkvo(self, layer):
        s = layer.attention.self
        return s.query.weight, s.key.weight, s.value.weight, layer.attention.output.dense.weight

    def o_proj(self, layer):
        return layer.attention.output.dense

    def cut_attention(self, cutter, layer, q, k, v, o, heads, head_dim):
        s = layer.attention.self
        cutter.keep(s, "query", q, out=True)
        cutter.keep(s, "key", k, out=True)
        cutter.keep(s, "value", v, out=True)
        cutter.keep(layer.attention.output, "dense", o, out=False)
        pruned_attention.set_sizes(layer.attention, heads, head_dim)

    def attention_dropouts(self, layer):
        return [(layer.attention.self, "dropout")]  # attention.output.dropout acts after the output projection

    def mlp(self, layer):
        return [(layer.intermediate, "dense")], (layer.output, "dense")

    def check_structured(self, model):
        if model.config.add_cross_attention:
            raise SqueezeError("structured pruning of BERT with cross-attention is not supported; "
                               "use an encoder-only BERT")

    def smoothing_pairs(self, layer):
        # Post-norm: a LayerNorm's output is also the residual of the next sublayer, so dividing it by s
        # would change the residual path. The value projection folds exactly: attention mixes tokens,
        # never channels, so softmax(QKᵀ)·(V/s) = (softmax(QKᵀ)·V)/s.
        return [(layer.attention.self.value, [layer.attention.output.dense])]
