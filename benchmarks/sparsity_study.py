"""What closes the gap of one-shot 50 % pruning on a small model (issue 28 §2): Wanda and SparseGPT on SmolLM2-135M,
scored as benchmarks/ptq_quality.py scores them (perplexity of the first `--lines` lines of Persuasion in 128-token
blocks, ratio to fp32), varying one thing at a time: the calibration's size and length (samples × tokens, random
windows of the four training novels), OWL's per-block sparsity allocation, and "within block" sequential
calibration (each group of layers calibrated on the already-pruned layers' outputs).

  OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/sparsity_study.py [VARIANT ...]

A VARIANT is `method[:SAMPLESxLEN][:owl[=THRESHOLD/SPREAD]][:within][:layer]`, e.g.
`sparsegpt:128x512:owl=5/0.08:within`; method is wanda or sparsegpt (50 % unstructured), calibration 128x128 unless
given, OWL 5/0.08 when named alone; `layer` (Wanda only): one comparison group per layer instead of per output row.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.ptq_quality import perplexity, task_data
from squeeze import models
from squeeze.assets import cache_dir
from squeeze.compress.calibration import calibration_from_data
from squeeze.compress.layer_sparsity import block_sparsities
from squeeze.compress.sparsegpt import sparsegpt_model
from squeeze.compress import wanda
from squeeze.compress.sparsity_pattern import lowest_mask, row_mask
from squeeze.compress.wanda import wanda_model

DEFAULT = ["wanda", "sparsegpt", "wanda:128x512", "sparsegpt:128x512", "wanda:512x128", "sparsegpt:512x128",
           "wanda:owl", "sparsegpt:owl", "wanda:within", "sparsegpt:within"]


def parse(variant: str) -> dict:
    method, *parts = variant.split(":")
    out = {"method": method, "samples": 128, "seq_len": 128, "owl": None, "within": False, "layer": False}
    for part in parts:
        if "x" in part and part.replace("x", "").isdigit():
            out["samples"], out["seq_len"] = map(int, part.split("x"))
        elif part.startswith("owl"):
            threshold, spread = (part.split("=", 1)[1].split("/") if "=" in part else ("5", "0.08"))
            out["owl"] = (float(threshold), float(spread))
        elif part == "within":
            out["within"] = True
        elif part == "layer" and method == "wanda":
            out["layer"] = True
        else:
            raise SystemExit(f"unknown part {part!r} of {variant!r}")
    if method not in ("wanda", "sparsegpt"):
        raise SystemExit(f"method {method!r}: wanda or sparsegpt")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*", default=DEFAULT)
    parser.add_argument("--lines", type=int, default=600)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    path = cache_dir() / "smollm2"
    tokenizer = models.prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    data = task_data("austen", tokenizer, block_size=128, **{"max_examples.test": args.lines,
                                                              "max_examples.validation": 10, "eval_batch_size": 8})
    reference = perplexity(base, data.test_dataloader())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); fp32 perplexity {reference:.2f} on "
          f"{len(data.datasets['test'])} blocks of 128 tokens; sparsity {args.sparsity}")
    print("| variant | perplexity | ratio to fp32 | compress s |\n|---|---|---|---|", flush=True)
    calibrations: dict[tuple[int, int], list] = {}
    for text in args.variants:
        v = parse(text)
        key = (v["samples"], v["seq_len"])
        if key not in calibrations:
            calibrations[key] = calibration_from_data(data, samples=key[0], seq_len=key[1], seed=0,
                                                      batch_size=max(1, 8 * 128 // key[1]))
        batches = calibrations[key]
        model = copy.deepcopy(base)
        start = time.perf_counter()
        per_block = None
        if v["owl"] is not None:
            per_block, _ = block_sparsities(model, batches, args.sparsity, "owl", *v["owl"])
        prune = wanda_model if v["method"] == "wanda" else sparsegpt_model
        if v["layer"]:  # the whole matrix one comparison group (the paper's per-layer ablation)
            wanda.row_mask = lambda scores, s: lowest_mask(scores, round(s * scores.numel()))
        try:
            prune(model, batches, args.sparsity, block_sparsity=per_block, within_block=v["within"])
        finally:
            wanda.row_mask = row_mask
        spent = time.perf_counter() - start
        value = perplexity(model.eval(), data.test_dataloader())
        print(f"| {text} | {value:.2f} | {value / reference:.3f}× | {spent:.0f} |", flush=True)
        del model


if __name__ == "__main__":
    main()
