"""Llama (SmolLM2 and other model_type llama checkpoints): a decoder with grouped-query attention and RoPE.

Each layer: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj (nn.Linear). num_attention_heads,
num_key_value_heads, head_dim and intermediate_size are config fields, so a pruned Llama reloads with
stock transformers, as long as every layer keeps the same sizes: heads go as whole KV groups, and
q/k dims cannot go (RoPE's frequencies depend on head_dim).
"""

from __future__ import annotations

from squeeze.arch.base import DecoderAdapter, HeadLayout


class LlamaAdapter(DecoderAdapter):
    family = "llama"
    model_types = ("llama",)
    stack_path = "layers"
    config_head_counts = True
    head_dims_ok = False
    prune_include = r"self_attn|mlp"
    prune_exclude = r"embed|norm"

    def shape(self, layer):
        a = layer.self_attn
        return HeadLayout(a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim, a.head_dim,
                          layer.mlp.up_proj.out_features)

    def qkvo(self, layer):
        a = layer.self_attn
        return a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight

    def o_proj(self, layer):
        return layer.self_attn.o_proj

    def cut_attention(self, cutter, layer, q, k, v, o, heads, head_dim):
        # Whole KV groups go, so head_dim and num_key_value_groups stay as they are.
        a = layer.self_attn
        cutter.keep(a, "q_proj", q, out=True)
        cutter.keep(a, "k_proj", k, out=True)
        cutter.keep(a, "v_proj", v, out=True)
        cutter.keep(a, "o_proj", o, out=False)

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
