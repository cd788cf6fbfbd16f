"""GPT-2 (model_type gpt2: gpt2 … gpt2-xl, distilgpt2): a decoder.

Each block h.N: attn.c_attn (one Conv1D producing [Q | K | V]), attn.c_proj, mlp.c_fc, mlp.c_proj.
Conv1D stores its weight [in, out] (squeeze.arch.linear answers every orientation question). The
MLP width is config.n_inner; no config field can express removed heads (pruned_attention.py).
"""

from __future__ import annotations

from torch import nn

from squeeze.arch import pruned_attention
from squeeze.arch.base import DecoderAdapter, HeadLayout
from squeeze.arch.linear import as_out_in, features
from squeeze.errors import SqueezeError


class GPT2Adapter(DecoderAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    stack_path = "h"
    intermediate_key = "n_inner"
    max_positions_key = "n_positions"
    final_norm_path, position_embeddings_path, embedding_dropout_path = "ln_f", "wpe", "drop"
    norm_types = (nn.LayerNorm,)
    prune_include = r"attn|mlp"
    prune_exclude = r"wte|wpe|ln_"  # token and position embeddings, layer norms

    def check_layer_cut(self, config, keep):
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) and list(keep) != list(range(len(keep))):
            raise SqueezeError("this GPT-2 scales attention by layer number, so moved layers would change; "
                               "use student.init=first")

    def shape(self, layer):
        heads = layer.attn.num_heads
        return HeadLayout(heads, heads, layer.attn.head_dim, features(layer.mlp.c_fc)[0])

    def qkvo(self, layer):
        q, k, v = as_out_in(layer.attn.c_attn).split(layer.attn.split_size, dim=0)
        return q, k, v, as_out_in(layer.attn.c_proj)

    def o_proj(self, layer):
        return layer.attn.c_proj

    def cut_attention(self, cutter, layer, q, k, v, o, heads, head_dim):
        # c_attn's outputs are [Q | K | V] blocks of split_size each.
        width = layer.attn.split_size
        fused = list(q) + [width + i for i in k] + [2 * width + i for i in v]
        cutter.keep(layer.attn, "c_attn", fused, out=True)
        cutter.keep(layer.attn, "c_proj", o, out=False)
        pruned_attention.set_sizes(layer.attn, heads, head_dim)

    def attention_dropouts(self, layer):
        return [(layer.attn, "attn_dropout")]  # resid_dropout acts after the output projection

    def mlp(self, layer):
        return [(layer.mlp, "c_fc")], (layer.mlp, "c_proj")

    def check_structured(self, model):
        if model.config.add_cross_attention:
            raise SqueezeError("structured pruning of GPT-2 with cross-attention is not supported; "
                               "use a decoder-only GPT-2")

    def smoothing_pairs(self, layer):
        # Pre-norm: ln_1 feeds only c_attn, ln_2 only c_fc (the residual bypasses the norms).
        return [(layer.ln_1, [layer.attn.c_attn]), (layer.ln_2, [layer.mlp.c_fc])]
