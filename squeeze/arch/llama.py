"""Llama (SmolLM2 and other model_type llama checkpoints): a decoder with grouped-query attention and RoPE.

Each layer: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj (nn.Linear). num_attention_heads,
num_key_value_heads, head_dim and intermediate_size are config fields, so a pruned Llama reloads with
stock transformers, as long as every layer keeps the same sizes: heads go as whole KV groups, and
q/k dims cannot go (RoPE's frequencies depend on head_dim).
"""

from __future__ import annotations

from transformers.models.llama.modeling_llama import LlamaRMSNorm

from squeeze.arch.base import SeparateQKVAdapter


class LlamaAdapter(SeparateQKVAdapter):
    family = "llama"
    model_types = ("llama",)
    stack_path = "layers"
    final_norm_path = "norm"  # no position table (RoPE) and no embedding dropout
    norm_types = (LlamaRMSNorm,)
    dropout_name = "attention_dropout"
    # A cut removes whole KV groups, so head_dim and num_key_value_groups stay: resized_attention has nothing to do.
    config_head_counts = True
    head_dims_ok = False
    prune_include = r"self_attn|mlp"
    prune_exclude = r"embed|norm"

    def mlp(self, layer):
        return [(layer.mlp, "gate_proj"), (layer.mlp, "up_proj")], (layer.mlp, "down_proj")

    def resized_mlp(self, layer, width: int) -> None:
        layer.mlp.intermediate_size = width  # LlamaMLP keeps it as an attribute; keep it true

    def smoothing_pairs(self, layer):
        # Pre-norm: each RMSNorm feeds only its sublayer's projections. up_proj → down_proj: the MLP
        # computes act(gate(x)) ⊙ up(x), elementwise per channel, so up's rows divided by s divide
        # down_proj's input by s exactly (and down_proj's input carries the largest outliers).
        a, mlp = layer.self_attn, layer.mlp
        return [(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]),
                (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
                (mlp.up_proj, [mlp.down_proj])]
