"""CPU latency, throughput and checkpoint size of fp32 against squeeze's quantized models, side by side; and
SmolLM2's batch-1 greedy decoding speed and perplexity with the weight-only CPU kernels (--smollm2).

What it measures
    Two random-init models of real shapes: a BERT-base-shaped sequence classifier (12 layers, 768
    wide, 3072 FFN, the 30,522-token vocabulary) and a GPT-2-shaped causal LM (12 layers, 768 wide,
    50,257-token vocabulary, Conv1D layers, lm_head tied to wte). For each model, in one process:

      fp32         the model as built
      dq           compress=dq: int8 weights, activations quantized per call, torch's fbgemm kernel
      dq-torchao   compress=dq backend=torchao (torchao 0.18's Int8DynamicActivationInt8Weight); batch 1
                   in --torchao-repeats rounds only, unless asked: it is far slower than fp32 on this CPU
      int8wo       compress=int8wo: per-channel int8 weights, torch's int8 weight-only CPU kernel (bf16
                   activations; above KERNEL_MAX_ROWS rows a bf16 GEMM where the CPU has native bf16)
      int4wo       compress=int4wo: int4 weights, group 64, torch's int4 weight-only CPU kernel (likewise)
      int4wo-divided  int4wo with a per-channel input divisor on every Linear (compress.awq.scale_unfoldable's
                   cost at inference, an upper bound: AWQ divides only the layers whose scales cannot fold)
      int8wo-deq   int8wo with cpu_kernel=dequantize: the whole weight dequantized per call (the path
      int4wo-deq   before the kernels)
      torch.ao     the reference: torch.ao.quantization.quantize_dynamic (Linear only; GPT-2's Conv1D
                   converted to Linear first), the path the issue's figures were taken with

    Latency: the median of --repeats forward passes (after --warmup untimed ones) at batch 1 and batch
    16, sequence 128, torch threads = --threads (2), inference mode. All variants of a model are held
    at once and timed in rounds, each round running every variant once, so a drift in the machine's
    speed (a shared CPU) hits every variant alike. Throughput: tokens/s at batch 16. Size: the weights
    file (fp32: save_pretrained's model.safetensors; squeeze's: the packed model.packed.safetensors;
    torch.ao: torch.save of its state dict), and the ratio to fp32.
    Each variant is converted from the same fp32 weights. On a shared machine raise --repeats.

    --smollm2: the real SmolLM2-135M (offline asset) as fp32, int8wo and int4wo (group 64; embeddings and
    the tied lm_head quantized, as compress=int8wo / int4wo do). Greedy decoding at batch 1 of exactly
    --new-tokens tokens after a --prompt-tokens prompt from Persuasion (austen's test novel), the three
    models timed interleaved in --decode-rounds rounds (fp32, int8wo, int4wo, fp32, ...): tokens/s (new tokens
    over the generate call's seconds, prompt included) and the ratio to fp32 within each round (median and
    min-max over the rounds); whether the kernels' greedy tokens are the dequantized path's; then the
    perplexity of --blocks 128-token blocks of Persuasion with the dequantized path (cpu_kernel=dequantize,
    as before the kernels), as the run's default runs it (auto), and with the int8/int4 kernels forced at
    every row count. The kernels each quantized model ran are printed (kernels_used).

Run
    .venv/bin/python benchmarks/quantization.py                       # both models, warmup 1, repeats 3
    .venv/bin/python benchmarks/quantization.py --models bert --repeats 10
    .venv/bin/python benchmarks/quantization.py --smollm2             # a few minutes on 2 quiet cores
    .venv/bin/python benchmarks/quantization.py --smollm2 --models bert --variants fp32,dq,int8wo,int8wo-deq
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from squeeze.compress import quantization as q
from squeeze.formats import quantized_layers
from squeeze.formats.quantized_layers import QuantizedLinear
from squeeze.formats.packed import PACKED_FILE, save_packed

SEQ = 128
BATCHES = (1, 16)
CONF = Path(__file__).resolve().parents[1] / "conf"


class _NoTokenizer:
    def save_pretrained(self, directory):
        pass


def build(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        config = AutoConfig.for_model("bert", num_labels=2)  # bert-base-uncased's sizes are the defaults
        return AutoModelForSequenceClassification.from_config(config).eval()
    config = AutoConfig.for_model("gpt2")  # GPT-2 small: 12 × 768, 50,257 tokens
    return AutoModelForCausalLM.from_config(config).eval()


def variants(include_torchao: bool, names: str | None = None):
    def squeeze(cls, name, **kwargs):
        def convert(model):
            c = cls(**kwargs)
            c.name = name
            return c.finalize(c.prepare_model(model, None))
        return convert

    def torch_ao(model):
        q.convert_conv1d(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in torch 2.13
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def divided(model):
        """int4wo with a per-channel input divisor on every integer Linear: what compress.awq.scale_unfoldable
        adds to a layer at inference (AWQ gives one to fewer layers: an upper bound of its cost)."""
        model = squeeze(q.WeightOnlyQuantization, "int4wo", bits=4, group_size=64)(model)
        g = torch.Generator().manual_seed(0)
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                m.set_input_divisor(torch.rand(m.in_features, generator=g) + 0.5)
        return model

    out = {
        "fp32": lambda m: m,
        "dq": squeeze(q.DynamicQuantization, "dq"),
        "int8wo": squeeze(q.WeightOnlyQuantization, "int8wo"),
        "int4wo": squeeze(q.WeightOnlyQuantization, "int4wo", bits=4, group_size=64),
        "int4wo-divided": divided,
        "int8wo-deq": squeeze(q.WeightOnlyQuantization, "int8wo", cpu_kernel="dequantize"),
        "int4wo-deq": squeeze(q.WeightOnlyQuantization, "int4wo", bits=4, group_size=64, cpu_kernel="dequantize"),
        "torch.ao": torch_ao,
    }
    if include_torchao:
        out["dq-torchao"] = squeeze(q.DynamicQuantization, "dq", backend="torchao")
    if names:
        out = {name: out[name] for name in names.split(",")}  # fp32 first: the ratios' reference
    return out


def size_bytes(name: str, model, directory: Path) -> int:
    target = directory / name
    if name == "fp32":
        model.save_pretrained(str(target))
        return (target / "model.safetensors").stat().st_size
    if name == "torch.ao":
        target.mkdir(parents=True)
        torch.save(model.state_dict(), target / "state.pt")
        return (target / "state.pt").stat().st_size
    save_packed(model, _NoTokenizer(), target)
    return (target / PACKED_FILE).stat().st_size


def measure(kind: str, args, directory: Path) -> list[dict]:
    base = build(kind)
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for b in BATCHES:
        ids = torch.randint(0, base.config.vocab_size, (b, SEQ), generator=g)
        inputs[b] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    models, rows = {}, {}
    for name, convert in variants(not args.no_torchao, args.variants).items():
        models[name] = convert(copy.deepcopy(base))
        rows[name] = {"model": kind, "variant": name, "bytes": size_bytes(name, models[name], directory)}
    del base
    gc.collect()

    def cells(rnd: int):
        # dq-torchao is ~20× slower than fp32 here: batch 1 and --torchao-repeats rounds only, by default.
        for b in BATCHES:
            for name, model in models.items():
                if name != "dq-torchao" or (rnd < args.torchao_repeats and (b == 1 or args.torchao_batch16)):
                    yield name, b, model

    times = defaultdict(list)
    with torch.inference_mode():
        for name, b, model in cells(0):
            for _ in range(args.warmup):
                model(**inputs[b])
        # Rounds, each timing every variant once: a machine whose speed drifts (shared CPU) slows all alike.
        for rnd in range(args.repeats):
            for name, b, model in cells(rnd):
                start = time.perf_counter()
                model(**inputs[b])
                times[name, b].append(time.perf_counter() - start)
            print(f"  {kind} round {rnd + 1}/{args.repeats} done", flush=True)
    for (name, b), values in times.items():
        rows[name][f"b{b}_s"] = statistics.median(values)
    for name, model in models.items():
        if used := q.kernels_used(model):
            print(f"  {kind} {name} kernels: {used}")
    return list(rows.values())


def report(rows: list[dict]) -> None:
    print(f"\n{'model':5s} {'variant':10s} {'b1 ms':>9s} {'×fp32':>6s} {'b16 ms':>9s} {'×fp32':>6s} "
          f"{'tok/s b16':>9s} {'MB':>8s} {'size×fp32':>9s}")
    for kind in dict.fromkeys(r["model"] for r in rows):
        fp32 = next(r for r in rows if r["model"] == kind and r["variant"] == "fp32")
        for r in (r for r in rows if r["model"] == kind):
            def cell(key, r=r, fp32=fp32):
                if key not in r:
                    return f"{'—':>9s} {'':>6s}"
                return f"{r[key] * 1000:9.1f} {fp32[key] / r[key]:5.2f}×"
            tps = f"{16 * SEQ / r['b16_s']:9.0f}" if "b16_s" in r else f"{'—':>9s}"
            print(f"{kind:5s} {r['variant']:10s} {cell('b1_s')} {cell('b16_s')} {tps} "
                  f"{r['bytes'] / 1e6:8.1f} {r['bytes'] / fp32['bytes']:8.3f}×")
    print("\n×fp32: time is fp32 / variant (higher is faster); size is variant / fp32 (lower is smaller).")


# -- SmolLM2: batch-1 greedy decoding and perplexity ---------------------------------------------------
def smollm2_models():
    """SmolLM2-135M (the offline asset) in fp32, int8wo and int4wo (group 64), as the compressors leave it."""
    from squeeze import models
    from squeeze.assets import cache_dir

    path = cache_dir() / "smollm2"
    tokenizer = models.prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {"fp32": base}
    for name, settings in (("int8wo", {}), ("int4wo", {"bits": 4, "group_size": 64})):
        c = q.WeightOnlyQuantization(**settings)
        c.name = name
        out[name] = c.finalize(copy.deepcopy(base))
    return out, tokenizer


def persuasion_blocks(tokenizer, blocks: int) -> torch.Tensor:
    """The first `blocks` non-overlapping 128-token blocks of Persuasion (austen's test split) [blocks, 128]."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONF / "task" / "austen.yaml").data
    node.block_size = 128
    node.max_examples = {"train": 50, "validation": 10, "test": 20 * blocks}  # lines: ~12 tokens each
    data = instantiate(node, tokenizer=tokenizer, seed=42, _convert_="all")
    data.setup("fit")
    rows = [r["input_ids"] for r in data.datasets["test"]][:blocks]
    if len(rows) < blocks:
        raise SystemExit(f"Persuasion gave {len(rows)} blocks of 128 tokens, not {blocks}")
    return torch.tensor(rows)


def greedy(model, prompt: torch.Tensor, new_tokens: int, pad: int) -> torch.Tensor:
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad)
    return out[0, prompt.shape[1]:]


def decode_speed(models: dict, prompt: torch.Tensor, args, pad: int) -> None:
    print(f"\n## SmolLM2-135M greedy decoding, batch 1: {prompt.shape[1]}-token prompt + {args.new_tokens} new "
          f"tokens; {args.decode_rounds} interleaved rounds ({', '.join(models)}, ...)\n", flush=True)
    tokens, times = {}, defaultdict(list)
    with torch.inference_mode():
        for name, model in models.items():
            for _ in range(max(1, args.warmup)):
                tokens[name] = greedy(model, prompt, args.new_tokens, pad)
        for rnd in range(args.decode_rounds):
            for name, model in models.items():  # one round times every model once: a drift hits all alike
                start = time.perf_counter()
                greedy(model, prompt, args.new_tokens, pad)
                times[name].append(time.perf_counter() - start)
            print(f"  round {rnd + 1}/{args.decode_rounds}: " + ", ".join(
                f"{n} {args.new_tokens / t[-1]:.1f} tok/s" for n, t in times.items()), flush=True)
    print(f"\n| model | tokens/s (median) | ×fp32 (median) | ×fp32 min-max over {args.decode_rounds} rounds |")
    print("|---|---|---|---|")
    for name in models:
        ratios = sorted(f / t for f, t in zip(times["fp32"], times[name]))
        print(f"| {name} | {args.new_tokens / statistics.median(times[name]):.1f} | {statistics.median(ratios):.2f}× "
              f"| {ratios[0]:.2f}-{ratios[-1]:.2f}× |")
    print()
    for name, model in models.items():
        if name == "fp32":
            continue
        print(f"{name} kernels: {q.kernels_used(model)}")
        q.use_cpu_kernel(model, "dequantize")  # the path before the kernels, on the same integers
        with torch.inference_mode():
            before = greedy(model, prompt, args.new_tokens, pad)
        q.use_cpu_kernel(model, "auto")
        same = int((before == tokens[name]).sum())
        differs = (before != tokens[name]).nonzero()
        print(f"{name}: greedy tokens with the kernels = the dequantized path's for {same}/{args.new_tokens}"
              + ("" if not len(differs) else f" (first difference at new token {int(differs[0]) + 1})")
              + f"; = fp32's for {int((tokens['fp32'] == tokens[name]).sum())}/{args.new_tokens}")


@torch.inference_mode()
def perplexity(model, blocks: torch.Tensor, batch: int) -> float:
    total = 0.0
    for i in range(0, len(blocks), batch):
        ids = blocks[i:i + batch]
        total += float(model(input_ids=ids, labels=ids).loss) * len(ids)  # every block scores 127 tokens
    return math.exp(total / len(blocks))


def smollm2_perplexity(models: dict, blocks: torch.Tensor, args) -> None:
    print(f"\n## SmolLM2-135M perplexity, {len(blocks)} blocks of 128 tokens of Persuasion (batch {args.ppl_batch})\n")
    print("| model | dequantize (before) | auto (the default) | kernel at every row count |")
    print("|---|---|---|---|")
    fp32 = perplexity(models["fp32"], blocks, args.ppl_batch)
    print(f"| fp32 | {fp32:.3f} | | |", flush=True)
    limit = quantized_layers.KERNEL_MAX_ROWS
    for name, model in models.items():
        if name == "fp32":
            continue
        q.use_cpu_kernel(model, "dequantize")
        before = perplexity(model, blocks, args.ppl_batch)
        q.use_cpu_kernel(model, "auto")
        auto = perplexity(model, blocks, args.ppl_batch)
        ran = q.kernels_used(model)
        quantized_layers.KERNEL_MAX_ROWS = 1 << 30  # the int8/int4 kernels even for 128 × batch rows
        try:
            forced = perplexity(model, blocks, args.ppl_batch)
        finally:
            quantized_layers.KERNEL_MAX_ROWS = limit
        print(f"| {name} | {before:.3f} | {auto:.3f} | {forced:.3f} |", flush=True)
        print(f"  ({name}, auto ran {ran})")


def smollm2(args) -> None:
    models, tokenizer = smollm2_models()
    blocks = persuasion_blocks(tokenizer, args.blocks)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    decode_speed(models, blocks[:1, :args.prompt_tokens], args, pad)
    smollm2_perplexity(models, blocks, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="bert,gpt2 (the default without --smollm2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torchao", action="store_true", help="skip dq with the torchao backend")
    parser.add_argument("--torchao-batch16", action="store_true", help="also time dq-torchao at batch 16 (slow)")
    parser.add_argument("--torchao-repeats", type=int, default=1, help="rounds that time dq-torchao (slow)")
    parser.add_argument("--variants", default=None, help="comma-separated, fp32 first (default: all)")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2 decoding and perplexity (--models: none)")
    parser.add_argument("--decode-rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=20, help="Persuasion blocks scored for perplexity")
    parser.add_argument("--ppl-batch", type=int, default=4)
    args = parser.parse_args()
    if args.models is None:
        args.models = "" if args.smollm2 else "bert,gpt2"
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, engine {torch.backends.quantized.engine}, "
          f"cpus {os.cpu_count()}, cpu capability {torch.backends.cpu.get_cpu_capability()}, native bf16 matmul "
          f"{quantized_layers.cpu_has_bf16_matmul()}, warmup {args.warmup}, repeats {args.repeats}, seq {SEQ}",
          flush=True)
    if args.smollm2:
        smollm2(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in filter(None, args.models.split(",")):
            rows += measure(kind, args, Path(tmp) / kind)
    if rows:
        report(rows)


if __name__ == "__main__":
    main()
