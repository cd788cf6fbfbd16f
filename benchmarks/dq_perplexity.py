"""Why does compress=dq lose more perplexity than torch's quantize_dynamic on smollm2? (issue 12)

A small, cheap slice: the first `--blocks` non-overlapping 128-token blocks of Persuasion (the austen
task's test split), SmolLM2-135M in fp32, perplexity = exp(mean next-token loss). Each variant changes
one thing, so the differences point at the cause:

  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/dq_perplexity.py [--blocks 20] [--only a,b]

Measured (2-core AVX512-VNNI CPU, torch 2.13; perplexity, 20 blocks / 64 blocks = the 600-line slice):
  fp32                                                   53.96 / 53.42
  int8 weights only (int8wo, per-channel)                54.17 / 53.52   weights are not the problem
  only the embeddings int8 | only lm_head int8            53.96 | 58.22
  torch quantize_dynamic per-tensor | per-channel        224.0 | 191.0 / 187.0
  torch quantize_dynamic per-channel, lm_head float      171.8 / 169.3
  squeeze dq (default)                                   185.7 / 182.1   same kernel and scheme as torch's
  squeeze dq embeddings=false (tied lm_head float)       155.8
  squeeze dq reduce_range=False (8-bit activations)       96.9 / 92.8
  squeeze dq, mlp.down_proj float                         73.2 / 69.9
  squeeze dq reduce_range=False, mlp.down_proj float      58.3 / 57.4
  simulated per-token int8 | int7 activations             56.4 | 63.1 / 55.8 | 61.3
  SmoothQuant a=0.5 (fp32 unchanged: 53.96) + dq          89.8
  SmoothQuant a=0.8 + dq                                  71.0
  SmoothQuant a=0.5 | a=0.8 + dq reduce_range=False       65.7 | 58.0
The loss is the per-tensor dynamic activation scale: one int8 grid for a whole [tokens, channels]
input whose outlier channels (largest at down_proj's input) take the range; reduce_range halves the
grid again (7 bits).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import types

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from squeeze.assets import cache_dir
from squeeze.compress.calibration import calibration_windows
from squeeze.compress.quantization import (DynamicQuantization, QuantizedLinear, WeightOnlyQuantization,
                                           fbgemm_pack)
from squeeze.compress.smoothquant import smooth


def blocks(tokenizer, n: int, size: int = 128) -> torch.Tensor:
    lines = (cache_dir() / "austen" / "persuasion.txt").read_text(encoding="utf-8").splitlines()[:600]
    ids = tokenizer("\n".join(lines))["input_ids"]
    ids = torch.tensor(ids[: n * size]).reshape(n, size)
    return ids


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch: int = 5) -> float:
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        x = ids[i:i + batch]
        loss = model(input_ids=x, labels=x).loss  # mean over the batch's predicted tokens
        total += float(loss) * x[:, 1:].numel()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def untie(model: nn.Module) -> nn.Module:
    """lm_head with its own copy of the embedding matrix, so either can be quantized alone."""
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def torch_dynamic(model: nn.Module, per_channel: bool, lm_head: bool) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {n: qconfig for n, m in model.named_modules()
            if type(m) is nn.Linear and (lm_head or n != "lm_head")}
    return quantize_dynamic(model, spec, inplace=True)


def squeeze_dq(model: nn.Module, reduce_range: bool = True, **kwargs) -> nn.Module:
    model = DynamicQuantization(**kwargs).finalize(model)
    if not reduce_range:  # the same layers, the kernel asked for 8-bit activations instead of 7
        def full(self, x):
            if self._cache is None:
                self._cache = fbgemm_pack(self.weight, self.scale, self.bias)
            return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._cache, False).to(x.dtype)
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                m._fbgemm = types.MethodType(full, m)
    return model


def per_token_activations(model: nn.Module, bits: int = 8) -> nn.Module:
    """Simulate int8 activations with one scale per token (what torchao's dynamic int8 does) on top of
    per-channel int8 weights: x -> round(x / s_t) · s_t, s_t = max_j |x_tj| / 127."""
    model = WeightOnlyQuantization().finalize(model)
    qmax = 2 ** (bits - 1) - 1

    def quantize_input(module, args):
        x = args[0]
        scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
        return (torch.round(x / scale).clamp(-qmax, qmax) * scale, *args[1:])

    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.register_forward_pre_hook(quantize_input)
    return model


def smoothed(model: nn.Module, tokenizer, alpha: float) -> nn.Module:
    """SmoothQuant calibrated on 32 windows of 128 tokens of Emma (a training novel, not the test text)."""
    text = (cache_dir() / "austen" / "emma.txt").read_text(encoding="utf-8")[:200_000]
    batches = calibration_windows([tokenizer(text)["input_ids"]], samples=32, seq_len=128, seed=0, batch_size=8)
    smooth(model, batches, alpha=alpha)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--only", default="",
                        help="run the variants whose name contains one of these (comma-separated)")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = cache_dir() / "smollm2"
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = blocks(tokenizer, args.blocks)

    variants = {
        "fp32": lambda m: m,
        "torch quantize_dynamic per-tensor (all Linear)": lambda m: torch_dynamic(m, False, True),
        "torch quantize_dynamic per-channel (all Linear)": lambda m: torch_dynamic(m, True, True),
        "torch quantize_dynamic per-channel, lm_head float": lambda m: torch_dynamic(m, True, False),
        "squeeze dq (default: embeddings=true, tied lm_head)": lambda m: squeeze_dq(m),
        "squeeze dq embeddings=false (tied lm_head stays float)": lambda m: squeeze_dq(m, embeddings=False),
        "squeeze dq untied, lm_head float, embeddings int8": lambda m: squeeze_dq(untie(m), exclude=["lm_head"]),
        "squeeze dq untied, lm_head int8, embeddings float": lambda m: squeeze_dq(untie(m), embeddings=False),
        "squeeze dq untied, only the embeddings int8": lambda m: squeeze_dq(
            untie(m), exclude=[r"^model\.layers", "lm_head"]),
        "squeeze dq untied, only lm_head int8": lambda m: squeeze_dq(
            untie(m), embeddings=False, exclude=[r"^model\.layers"]),
        "squeeze dq default, reduce_range=False": lambda m: squeeze_dq(m, reduce_range=False),
        "squeeze dq per-tensor weights": lambda m: squeeze_dq(m, granularity="tensor"),
        "squeeze int8wo (weights only, per-channel)": lambda m: WeightOnlyQuantization().finalize(m),
        "squeeze dq reduce_range=False, embeddings=false": lambda m: squeeze_dq(
            m, reduce_range=False, embeddings=False),
        "squeeze dq, mlp.down_proj float": lambda m: squeeze_dq(m, exclude=["down_proj"]),
        "squeeze dq reduce_range=False, mlp.down_proj float": lambda m: squeeze_dq(
            m, reduce_range=False, exclude=["down_proj"]),
        "sim: int8 weights + int8 per-token activations": per_token_activations,
        "sim: int8 weights + int7 per-token activations": lambda m: per_token_activations(m, 7),
        "smoothquant a=0.5, fp32 (must equal fp32)": lambda m: smoothed(m, tokenizer, 0.5),
        "smoothquant a=0.5 + squeeze dq": lambda m: squeeze_dq(smoothed(m, tokenizer, 0.5)),
        "smoothquant a=0.8 + squeeze dq": lambda m: squeeze_dq(smoothed(m, tokenizer, 0.8)),
        "smoothquant a=0.5 + squeeze dq reduce_range=False": lambda m: squeeze_dq(
            smoothed(m, tokenizer, 0.5), reduce_range=False),
        "smoothquant a=0.8 + squeeze dq reduce_range=False": lambda m: squeeze_dq(
            smoothed(m, tokenizer, 0.8), reduce_range=False),
    }
    print(f"{args.blocks} blocks x 128 tokens of Persuasion, smollm2 fp32 weights")
    for name, build in variants.items():
        if args.only and not any(o in name for o in args.only.split(",")) and name != "fp32":
            continue
        start = time.perf_counter()
        model = build(copy.deepcopy(base))
        ppl = perplexity(model, ids)
        print(f"| {name} | {ppl:.2f} | {time.perf_counter() - start:.0f}s |", flush=True)


if __name__ == "__main__":
    main()
