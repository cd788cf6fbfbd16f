"""Tiny random-init models of each family for the post-training tests (2 layers, 64 wide, vocab 1000)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

FAMILIES = ("bert", "gpt2", "llama")
SIZES = {
    "bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=128),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=128),
}


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=1000, **SIZES[family])
    if family == "bert":
        config.num_labels = 2
        return AutoModelForSequenceClassification.from_config(config).eval()
    return AutoModelForCausalLM.from_config(config).eval()


def token_batches(n: int = 4, batch: int = 2, length: int = 16, seed: int = 0, padded: bool = False):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 1000, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        if padded:
            mask[0, length // 2:] = 0
            ids[0, length // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
