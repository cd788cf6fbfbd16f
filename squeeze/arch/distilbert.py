"""DistilBERT (hub only: model=distilbert-base-uncased): an encoder whose layers sit in
transformer.layer, attention q_lin/k_lin/v_lin/out_lin and MLP ffn.lin1/lin2.

Fine-tuning, iterative magnitude pruning, distillation and quantization work on it; structured
pruning does not: squeeze has no reloadable pruned-attention twin for DistilBERT's classes.
"""

from __future__ import annotations

from torch import nn

from squeeze.arch.base import EncoderAdapter


class DistilBertAdapter(EncoderAdapter):
    family = "distilbert"
    model_types = ("distilbert",)
    stack_path = "transformer.layer"
    structured_unsupported = ("DistilBERT has no reloadable pruned-attention twin in squeeze; prune a BERT "
                              "(model=minilm, bert-base-uncased, tiny_bert) or use compress=imp")
    prune_include = r"attention|ffn"
    prune_exclude = r"embed|norm"
    norm_types = (nn.LayerNorm,)

    def attention_dropouts(self, layer):
        return [(layer.attention, "dropout")]

    def smoothing_pairs(self, layer):
        # Post-norm like BERT: only value → output projection folds exactly.
        return [(layer.attention.v_lin, [layer.attention.out_lin])]
