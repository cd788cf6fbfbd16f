"""Post-training methods on a real model: SmolLM2-135M, perplexity on the first `--blocks` 128-token
blocks of Persuasion (the austen test text), calibrated on `--samples` 128-token windows of Emma (a
training novel). Every Linear of the 30 decoder blocks is compressed; embeddings and lm_head are not.

  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/ptq_smollm2.py [--blocks 20 --samples 32]

(One thread on a shared 2-core machine: GPTQ/SparseGPT run many small column operations, and two
OpenMP threads competing with another process for a core were 13× slower.)

Measured (20 blocks, 32 calibration windows; perplexity, compress time with evaluation):
  fp32 53.96
  int4 g64:         RTN 78.71   GPTQ 68.65 (50 s)   GPTQ act_order 61.44 (52 s)
  int4 per-channel: RTN 112.13  GPTQ act_order 72.03
  50% unstructured: magnitude 390.2   Wanda 99.5 (31 s)   SparseGPT 83.4 (86 s)
  2:4:              magnitude 1360    Wanda 219.0         SparseGPT 125.4
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from squeeze.arch.linear import as_out_in
from squeeze.assets import cache_dir
from squeeze.compress.calibration import calibration_windows, layer_stack, linear_layers
from squeeze.compress.gptq import gptq_model, rtn_quantize
from squeeze.compress.sparsegpt import sparsegpt_model
from squeeze.compress.sparsity_pattern import nm_mask, row_mask
from squeeze.compress.wanda import wanda_model


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch: int = 5) -> float:
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        x = ids[i:i + batch]
        total += float(model(input_ids=x, labels=x).loss) * x[:, 1:].numel()
        count += x[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def each_stack_weight(model: nn.Module, fn) -> nn.Module:
    for module in linear_layers(layer_stack(model)).values():
        as_out_in(module).copy_(fn(as_out_in(module).detach().float()))
    return model


def inplace(compress):
    """A variant from a function that compresses the model in place (and returns masks or integers)."""
    def build(model):
        compress(model)
        return model
    return build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    path = cache_dir() / "smollm2"
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = "\n".join((cache_dir() / "austen" / "persuasion.txt").read_text(encoding="utf-8").splitlines()[:600])
    ids = torch.tensor(tokenizer(text)["input_ids"][: args.blocks * 128]).reshape(args.blocks, 128)
    emma = (cache_dir() / "austen" / "emma.txt").read_text(encoding="utf-8")[:200_000]
    calib = calibration_windows([tokenizer(emma)["input_ids"]], samples=args.samples, seq_len=128, seed=0,
                                batch_size=8)

    variants = {
        "fp32": lambda m: m,
        "RTN int4 g64 (symmetric)": lambda m: each_stack_weight(m, lambda w: rtn_quantize(w, 4, 64).dequantized),
        "GPTQ int4 g64": inplace(lambda m: gptq_model(m, calib, bits=4, group_size=64)),
        "GPTQ int4 g64 act_order": inplace(lambda m: gptq_model(m, calib, bits=4, group_size=64, act_order=True)),
        "RTN int4 per-channel": lambda m: each_stack_weight(m, lambda w: rtn_quantize(w, 4, None).dequantized),
        "GPTQ int4 per-channel act_order": inplace(
            lambda m: gptq_model(m, calib, bits=4, group_size=None, act_order=True)),
        "magnitude 50% (per row)": lambda m: each_stack_weight(m, lambda w: w * row_mask(w.abs(), 0.5)),
        "Wanda 50%": inplace(lambda m: wanda_model(m, calib, 0.5)),
        "SparseGPT 50%": inplace(lambda m: sparsegpt_model(m, calib, 0.5)),
        "magnitude 2:4": lambda m: each_stack_weight(m, lambda w: w * nm_mask(w.abs(), 2, 4)),
        "Wanda 2:4": inplace(lambda m: wanda_model(m, calib, None, "2:4")),
        "SparseGPT 2:4": inplace(lambda m: sparsegpt_model(m, calib, None, "2:4")),
    }
    print(f"smollm2, {args.blocks} blocks x 128 tokens of Persuasion; calibration {args.samples} x 128 tokens of Emma")
    for name, build in variants.items():
        start = time.perf_counter()
        model = build(copy.deepcopy(base))
        print(f"| {name} | {perplexity(model, ids):.2f} | {time.perf_counter() - start:.0f}s |", flush=True)


if __name__ == "__main__":
    main()
