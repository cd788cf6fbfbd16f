"""Saved formats on the real SmolLM2 (issues 11, 28 §4): the size of a run's model/ as squeeze saves it, whether
plain transformers loads it (result.json's model_loads_in_transformers), and the size of its `squeeze.export` copy
with the max |logit| difference between plain transformers (`AutoModelForCausalLM.from_pretrained`, in a Python
that never imports squeeze) on the export and squeeze's loader on model/ (weight-only layers on squeeze's fp32
dequantize path).

    python benchmarks/formats_interop.py [--out DIR]

Measured 2026-12-06 (session 13, 3 real sentences, `python benchmarks/formats_interop.py`):
                                    model/ bytes  model/ loads in plain transformers    export bytes  max Δlogit
  int8wo                             139,286,335  yes (compressed-tensors installed)    139,286,302   0 of 29.34
  int4wo g64 (int4 embeddings)        79,431,430  no: squeeze-packed                    176,784,047   0 of 32.73
                                                  (export: embeddings and tied lm_head dequantized, the rest int4)
  int4wo g64 embeddings=false        176,784,080  yes (compressed-tensors installed)    176,784,047   0 of 31.53
  dq                                 139,288,777  yes (compressed-tensors installed)    139,288,744   6.2 of 29.29
                                                  (transformers quantizes activations its own way, see README)
  imp 50% (global magnitude)         342,586,655  no: squeeze-sparse                    541,614,890   0 of 31.11
                                                  (export: dense, the zeros stored)
  dq perplexity, 64 blocks of 128 tokens of Persuasion: squeeze on model/ 57.99, plain transformers on the export 57.70

Earlier (session 4; bytes new / old = squeeze's packed format; max Δlogit of max |logit|):
  fp32 dense                        541,614,890
  int8wo                            139,280,822 / 139,069,834   0.0 of 29.3
  int4wo g64 (int4 embeddings)       79,429,066 / 79,429,066    squeeze packed (fallback): not loadable by transformers
  int4wo g64 embeddings=false       176,778,583 / 176,750,914   0.0 of 31.5
  dq                                139,281,994 / 139,070,466   15.6 of 32.2 (activations quantized transformers' way)
  imp 50% (global magnitude)        342,586,626 (squeeze sparse: not loadable by transformers)
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SENTENCES = [
    "It was a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife.",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took up any "
    "book but the Baronetage.",
    "The capital of Germany is",
]

# Run in a fresh interpreter that never imports squeeze: what a user without squeeze gets.
PLAIN = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, reference, sentences = sys.argv[1], sys.argv[2], sys.argv[3:]
tok = AutoTokenizer.from_pretrained(directory)
model = AutoModelForCausalLM.from_pretrained(directory).eval()
ref = torch.load(reference)
with torch.no_grad():
    diff = max((model(**tok(s, return_tensors="pt")).logits - r).abs().max().item() for s, r in zip(sentences, ref))
assert "squeeze" not in sys.modules
print(f"{diff:.4g} {max(r.abs().max().item() for r in ref):.4g}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where to write the saved models (default: a temp dir)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from squeeze import assets, formats
    from squeeze.arch import adapter_for
    from squeeze.compress.pruning import magnitude_masks, select_weights
    from squeeze.compress.quantization.post_training import DynamicQuantization, WeightOnlyQuantization
    from squeeze.export import export
    from squeeze.formats.quantized_layers import use_cpu_kernel

    out = Path(args.out or tempfile.mkdtemp(prefix="formats-"))
    source = assets.locate("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(source))

    def fp32():
        return AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()

    def size(directory: Path) -> int:
        return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())

    formats.save(fp32(), tokenizer, out / "dense")
    print(f"{'fp32 dense':34s} {size(out / 'dense'):>13,}")

    def compressed(make):
        def build():
            compressor = make()
            return compressor.finalize(compressor.prepare_model(fp32(), tokenizer))
        return build

    def pruned50():
        model = fp32()
        adapter = adapter_for(model)
        weights, transposed = select_weights(model, [adapter.prune_include], [adapter.prune_exclude])
        masks = magnitude_masks(weights, 0.5, "global", None, transposed)
        with torch.no_grad():
            for n, p in weights.items():
                p.masked_fill_(~masks[n], 0)
        return model

    variants = {
        "int8wo": compressed(lambda: WeightOnlyQuantization(bits=8)),
        "int4wo g64": compressed(lambda: WeightOnlyQuantization(bits=4, group_size=64)),
        "int4wo g64 embeddings=false": compressed(lambda: WeightOnlyQuantization(bits=4, group_size=64,
                                                                                 embeddings=False)),
        "dq": compressed(lambda: DynamicQuantization()),
        "imp 50% (global magnitude)": pruned50,
    }
    print(f"{'':34s} {'model/ bytes':>13} {'loads in plain transformers':28s} {'export bytes':>13}  "
          "export in plain transformers: max Δlogit of max |logit|")
    for name, build in variants.items():
        model = build()
        saved, exported = out / (name.split(" (")[0].replace(" ", "_")), out / (name.split(" (")[0].replace(" ", "_")
                                                                                + "-export")
        formats.save(model, tokenizer, saved)
        summary = export(saved, exported)
        reloaded = formats.load(saved, "causal_lm").eval()
        use_cpu_kernel(reloaded, "dequantize")  # weight-only in fp32, as the dequantized export computes
        with torch.no_grad():
            logits = [reloaded(**tokenizer(s, return_tensors="pt")).logits for s in SENTENCES]
        torch.save(logits, out / f"{saved.name}.pt")
        done = subprocess.run([sys.executable, "-c", PLAIN, str(exported), str(out / f"{saved.name}.pt"), *SENTENCES],
                              capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ""})
        diff, scale = done.stdout.split()
        print(f"{name:34s} {size(saved):>13,} {formats.loads_in_transformers(saved)[:28]:28s} "
              f"{summary['bytes']:>13,}  {diff} of {scale} ({summary['format']}; gave up: "
              f"{'; '.join(g.split(':')[0] for g in summary['given_up']) or 'nothing'})", flush=True)
    dq_perplexity(out, tokenizer)


# The dq export's perplexity in plain transformers (its logits differ where activations have outliers: how much does
# that move the figure users compare?). Blocks saved by squeeze's austen task, scored in a Python without squeeze.
PLAIN_PPL = """
import math, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
total = 0.0
with torch.no_grad():
    for b in ids.split(8):
        total += float(model(input_ids=b, labels=b).loss) * b.numel()
assert "squeeze" not in sys.modules
print(f"{math.exp(total / ids.numel()):.2f}")
"""


def dq_perplexity(out: Path, tokenizer) -> None:
    from benchmarks.ptq_quality import task_data
    from squeeze import formats

    data = task_data("austen", tokenizer, block_size=128, **{"max_examples.test": 600, "max_examples.validation": 10})
    rows = [r["input_ids"] for r in data.datasets["test"] if len(r["input_ids"]) >= 128]
    ids = torch.tensor([r[:128] for r in rows])
    torch.save(ids, out / "blocks.pt")
    model, total = formats.load(out / "dq", "causal_lm").eval(), 0.0
    with torch.no_grad():
        for b in ids.split(8):
            total += float(model(input_ids=b, labels=b).loss) * b.numel()
    done = subprocess.run([sys.executable, "-c", PLAIN_PPL, str(out / "dq-export"), str(out / "blocks.pt")],
                          capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ""})
    print(f"dq perplexity, {len(ids)} blocks of 128 tokens of Persuasion: squeeze on model/ "
          f"{math.exp(total / ids.numel()):.2f}, plain transformers on the export {done.stdout.strip()}")


if __name__ == "__main__":
    main()
