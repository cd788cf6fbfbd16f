"""Checkpoint size of magnitude-pruned models, and CPU latency of head-pruned ones, against dense.

What it measures
    Random-init models of real shapes: a BERT-base-shaped sequence classifier (12 layers, 768 wide,
    12 heads, 3072 FFN, the 30,522-token vocabulary) and a GPT-2-shaped causal LM (12 layers, 768
    wide, 12 heads, 50,257-token vocabulary, Conv1D layers, lm_head tied to wte). --quick builds the
    same architectures at toy sizes (2 layers, 64 wide, 4 heads), for a smoke test.

    Size: the model is magnitude-pruned with compress=imp's own functions (default include/exclude
    patterns: the attention and MLP matrices, never embeddings or norms; global granularity) to each
    of --sparsities in turn, the masks only growing as in iterative pruning, and written with
    squeeze's save path (squeeze.formats.save: the sparse bitmask format once a matrix is
    sparse enough, save_pretrained when dense) into a temporary directory. Printed per sparsity:
    the directory's bytes and their ratio to the dense save, and the ratio over the prunable
    matrices only (their stored tensors: bitmask + values, or the dense tensor where that is
    smaller), beside the format's floor for fp32, 1/32 + (1 − sparsity). The embeddings stay dense,
    so the whole-file ratio is higher. Random-init GPT-2 starts its residual projections (c_proj)
    √(2·layers) times smaller than the rest, so global ranking prunes them first and the other
    matrices less. Each save is reloaded with
    checkpoint.load and checked tensor for tensor against the model that was saved.

    Latency: compress=heads with method=magnitude removes --fractions of every layer's heads,
    physically (smaller q/k/v/o projections). The dense and head-pruned models are held at once and
    timed in rounds, each round running every variant once per batch size (batch 1 and 16,
    sequence 128, inference mode, torch threads = --threads, all cores by default), the variants'
    order rotating from round to round, so a drift in the machine's speed (a shared CPU) hits all
    alike. Printed: the median over --repeats rounds, dense time / pruned time (higher is faster),
    and pruned / dense parameters. GPT-2's time includes its 50,257-wide lm_head, which head pruning
    does not touch. On a shared machine raise --repeats; where another process keeps the cores busy,
    also try --threads 1, since torch's threads then spend their time waiting for each other (on a
    2-core machine beside a 2-thread training run, BERT-base at batch 1 took 2.1 s with 2 threads,
    0.46 s with 1).

Run
    .venv/bin/python benchmarks/pruning.py                     # both models, warmup 1, repeats 5
    .venv/bin/python benchmarks/pruning.py --models bert --sparsities 0.5,0.9 --fractions 0.5 --repeats 10
    .venv/bin/python benchmarks/pruning.py --quick --repeats 2  # toy shapes, seconds
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from squeeze import formats
from squeeze.arch import adapter_for
from squeeze.compress.pruning import magnitude_masks, mask_sparsity, select_weights
from squeeze.compress.structured import HeadPruning
from squeeze.models import count_params

SEQ = 128
BATCHES = (1, 16)
KINDS = {"bert": "sequence_classification", "gpt2": "causal_lm"}  # model → the head checkpoint.load rebuilds
QUICK = {
    "bert": {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 256, "max_position_embeddings": SEQ},
    "gpt2": {"vocab_size": 1000, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": SEQ,
             "bos_token_id": 999, "eos_token_id": 999},  # GPT-2's 50256 would lie outside the toy vocabulary
}
NO_TOKENIZER = SimpleNamespace(save_pretrained=lambda directory: None)  # checkpoint.save writes one; none here


def build(kind: str, quick: bool):
    torch.manual_seed(0)
    sizes = QUICK[kind] if quick else {}
    if kind == "bert":
        config = AutoConfig.for_model("bert", num_labels=2, **sizes)  # bert-base-uncased's sizes are the defaults
        return AutoModelForSequenceClassification.from_config(config).eval()
    config = AutoConfig.for_model("gpt2", **sizes)  # GPT-2 small: 12 × 768, 50,257 tokens
    return AutoModelForCausalLM.from_config(config).eval()


# -- size --------------------------------------------------------------------------------------------
def stored_bytes(directory: Path) -> dict[str, int]:
    """Bytes of each tensor in the saved weights file (dense model.safetensors or the sparse file)."""
    (path,) = directory.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).nbytes for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def save_and_check(model, head: str, directory: Path) -> tuple[int, dict[str, int]]:
    """(bytes of the saved directory, bytes per stored tensor), after checking the reload is exact."""
    formats.save(model, NO_TOKENIZER, directory)
    reloaded = formats.load(directory, head).state_dict()
    saved = model.state_dict()
    assert reloaded.keys() == saved.keys(), f"{directory}: the reload has other tensors than the saved model"
    for name, t in saved.items():
        assert torch.equal(reloaded[name], t), f"{directory}: {name} differs after the reload"
    return sum(f.stat().st_size for f in directory.iterdir()), stored_bytes(directory)


def measure_size(kind: str, sparsities: list[float], quick: bool, directory: Path) -> list[dict]:
    model, head = build(kind, quick), KINDS[kind]
    adapter = adapter_for(model)
    weights, transposed = select_weights(model, [adapter.prune_include], [adapter.prune_exclude])

    def prunable(per_tensor: dict[str, int]) -> int:
        # A sparse matrix is stored as <name>:bitmask + <name>:values; a dense one under its own name.
        return sum(n for k, n in per_tensor.items()
                   if k.removesuffix(formats.sparse.BITMASK).removesuffix(formats.sparse.VALUES) in weights)

    dense_bytes, dense_tensors = save_and_check(model, head, directory / "dense")
    rows = [{"model": kind, "sparsity": 0.0, "reached": 0.0, "bytes": dense_bytes,
             "format": "save_pretrained", "size_ratio": 1.0, "prunable_ratio": 1.0}]
    masks = None
    for target in sparsities:  # ascending: each step prunes further from the last, as IMP does
        masks = magnitude_masks(weights, target, "global", masks, transposed)
        with torch.no_grad():
            for name, p in weights.items():
                p.masked_fill_(~masks[name], 0)
        target_dir = directory / f"s{target}"
        size, tensors = save_and_check(model, head, target_dir)
        rows.append({"model": kind, "sparsity": target, "reached": mask_sparsity(masks), "bytes": size,
                     "format": "sparse" if (target_dir / formats.sparse.SPARSE_FILE).exists() else "save_pretrained",
                     "size_ratio": size / dense_bytes, "prunable_ratio": prunable(tensors) / prunable(dense_tensors)})
        print(f"  {kind} sparsity {target:.0%} saved and checked", flush=True)
    return rows


# -- latency -----------------------------------------------------------------------------------------
def measure_latency(kind: str, fractions: list[float], args) -> list[dict]:
    dense = build(kind, args.quick)
    models = {"dense": dense}
    for fraction in fractions:
        pruner = HeadPruning(amount=fraction, method="magnitude")  # compress=heads on every layer, one shot
        models[f"heads-{fraction:.0%}"] = pruner.finalize(pruner.prepare_model(copy.deepcopy(dense), None))
    rows = {}
    for name, model in models.items():
        adapter = adapter_for(model)
        heads = [adapter.shape(layer).heads for _, layer in adapter.layers(model)]
        rows[name] = {"model": kind, "variant": name, "heads": heads, "params": count_params(model)[0]}
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for b in BATCHES:
        ids = torch.randint(0, dense.config.vocab_size, (b, SEQ), generator=g)
        inputs[b] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    times = defaultdict(list)
    names = list(models)
    with torch.inference_mode():
        for name in names:
            for b in BATCHES:
                for _ in range(args.warmup):
                    models[name](**inputs[b])
        for rnd in range(args.repeats):
            order = names[rnd % len(names):] + names[:rnd % len(names)]  # no variant always runs first
            for b in BATCHES:
                for name in order:
                    start = time.perf_counter()
                    models[name](**inputs[b])
                    times[name, b].append(time.perf_counter() - start)
            print(f"  {kind} round {rnd + 1}/{args.repeats} done", flush=True)
    for (name, b), values in times.items():
        rows[name][f"b{b}_s"] = statistics.median(values)
    return list(rows.values())


# -- report ------------------------------------------------------------------------------------------
def report(size_rows: list[dict], latency_rows: list[dict]) -> None:
    if size_rows:
        print(f"\n{'model':5s} {'target':>6s} {'reached':>7s} {'format':15s} {'MB':>8s} {'size×dense':>10s} "
              f"{'prunable×dense':>14s} {'floor':>6s}")
        for r in size_rows:
            floor = f"{1 / 32 + 1 - r['sparsity']:6.3f}" if r["sparsity"] else f"{'':6s}"
            print(f"{r['model']:5s} {r['sparsity']:6.0%} {r['reached']:7.2%} {r['format']:15s} {r['bytes'] / 1e6:8.1f} "
                  f"{r['size_ratio']:9.3f}× {r['prunable_ratio']:13.3f}× {floor}")
        print("size×dense: the saved directory / the dense save's; prunable×dense: the same over the pruned "
              "(non-embedding) matrices only; floor: 1/32 + (1 − sparsity), a bitmask plus fp32 values.")
    if latency_rows:
        print(f"\n{'model':5s} {'variant':10s} {'heads/layer':>11s} {'params×dense':>12s} "
              f"{'b1 ms':>9s} {'×dense':>7s} {'b16 ms':>9s} {'×dense':>7s}")
        for kind in dict.fromkeys(r["model"] for r in latency_rows):
            dense = next(r for r in latency_rows if r["model"] == kind and r["variant"] == "dense")
            for r in (r for r in latency_rows if r["model"] == kind):
                heads = "/".join(map(str, sorted(set(r["heads"]))))
                cells = " ".join(f"{r[k] * 1000:9.1f} {dense[k] / r[k]:6.2f}×" for k in ("b1_s", "b16_s"))
                print(f"{kind:5s} {r['variant']:10s} {heads:>11s} {r['params'] / dense['params']:11.3f}× {cells}")
        print("×dense: dense time / pruned time (higher is faster); params×dense: pruned / dense parameters.")


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert,gpt2")
    parser.add_argument("--sparsities", default="0.3,0.5,0.7,0.9", help="global magnitude sparsities, in (0, 1)")
    parser.add_argument("--fractions", default="0.25,0.5", help="fractions of each layer's heads to remove")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="toy shapes (2 layers, 64 wide), for a smoke test")
    parser.add_argument("--skip-size", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args(argv)
    kinds = args.models.split(",")
    sparsities, fractions = sorted(set(floats(args.sparsities))), floats(args.fractions)
    if unknown := [k for k in kinds if k not in KINDS]:
        parser.error(f"--models {','.join(unknown)}: choose from {','.join(KINDS)}")
    if any(not 0 < s < 1 for s in sparsities):
        parser.error(f"--sparsities {args.sparsities}: each must be strictly between 0 and 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # one bar per save and reload would bury the progress lines
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"warmup {args.warmup}, repeats {args.repeats}, seq {SEQ}{', quick shapes' if args.quick else ''}", flush=True)
    size_rows, latency_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            if not args.skip_size:
                size_rows += measure_size(kind, sparsities, args.quick, Path(tmp) / kind)
            gc.collect()
            if not args.skip_latency:
                latency_rows += measure_latency(kind, fractions, args)
            gc.collect()
    report(size_rows, latency_rows)
    return size_rows, latency_rows


if __name__ == "__main__":
    main()
