"""CPU latency, throughput and checkpoint size of fp32 against squeeze's quantized models, side by side.

What it measures
    Two random-init models of real shapes: a BERT-base-shaped sequence classifier (12 layers, 768
    wide, 3072 FFN, the 30,522-token vocabulary) and a GPT-2-shaped causal LM (12 layers, 768 wide,
    50,257-token vocabulary, Conv1D layers, lm_head tied to wte). For each model, in one process:

      fp32         the model as built
      dq           compress=dq: int8 weights, activations quantized per call, torch's fbgemm kernel
      dq-torchao   compress=dq backend=torchao (torchao 0.18's Int8DynamicActivationInt8Weight); batch 1
                   in --torchao-repeats rounds only, unless asked: it is far slower than fp32 on this CPU
      int8wo       compress=int8wo: per-channel int8 weights, dequantized per call on CPU
      int4wo       compress=int4wo: int4 weights, group 64, dequantized per call on CPU
      torch.ao     the reference: torch.ao.quantization.quantize_dynamic (Linear only; GPT-2's Conv1D
                   converted to Linear first), the path the issue's figures were taken with

    Latency: the median of --repeats forward passes (after --warmup untimed ones) at batch 1 and batch
    16, sequence 128, torch threads = --threads (2), inference mode. All variants of a model are held
    at once and timed in rounds, each round running every variant once, so a drift in the machine's
    speed (a shared CPU) hits every variant alike. Throughput: tokens/s at batch 16. Size: the weights
    file (fp32: save_pretrained's model.safetensors; squeeze's: the packed model.packed.safetensors;
    torch.ao: torch.save of its state dict), and the ratio to fp32.
    Each variant is converted from the same fp32 weights. On a shared machine raise --repeats.

Run
    .venv/bin/python benchmarks/quantization.py                       # both models, warmup 1, repeats 3
    .venv/bin/python benchmarks/quantization.py --models bert --repeats 10
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from squeeze.compress import quantization as q
from squeeze.formats.packed import PACKED_FILE, save_packed

SEQ = 128
BATCHES = (1, 16)


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


def variants(include_torchao: bool):
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

    out = {
        "fp32": lambda m: m,
        "dq": squeeze(q.DynamicQuantization, "dq"),
        "int8wo": squeeze(q.WeightOnlyQuantization, "int8wo"),
        "int4wo": squeeze(q.WeightOnlyQuantization, "int4wo", bits=4, group_size=64),
        "torch.ao": torch_ao,
    }
    if include_torchao:
        out["dq-torchao"] = squeeze(q.DynamicQuantization, "dq", backend="torchao")
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
    for name, convert in variants(not args.no_torchao).items():
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert,gpt2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torchao", action="store_true", help="skip dq with the torchao backend")
    parser.add_argument("--torchao-batch16", action="store_true", help="also time dq-torchao at batch 16 (slow)")
    parser.add_argument("--torchao-repeats", type=int, default=1, help="rounds that time dq-torchao (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, engine {torch.backends.quantized.engine}, "
          f"cpus {os.cpu_count()}, warmup {args.warmup}, repeats {args.repeats}, seq {SEQ}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            rows += measure(kind, args, Path(tmp) / kind)
    report(rows)


if __name__ == "__main__":
    main()
