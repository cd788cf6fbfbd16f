"""Saved formats on the real SmolLM2 (issue 11): file size in the new format (compressed-tensors where it can
express the model) against squeeze's own packed format, and the max |logit| difference between plain
transformers (`AutoModelForCausalLM.from_pretrained`, in a Python that never imports squeeze) and squeeze's loader.

    python benchmarks/formats_interop.py [--out DIR]

Measured (session 4, 3 real sentences; bytes new / old; max Δlogit of max |logit|):
  fp32 dense                        541,614,890
  int8wo                            139,280,822 / 139,069,834   0.0 of 29.3
  int4wo g64 (int4 embeddings)       79,429,066 / 79,429,066    squeeze packed (fallback): not loadable by transformers
  int4wo g64 embeddings=false       176,778,583 / 176,750,914   0.0 of 31.5
  dq                                139,281,994 / 139,070,466   15.6 of 32.2 (activations quantized transformers' way)
  imp 50% (global magnitude)        342,586,626 (squeeze sparse: not loadable by transformers)
"""

from __future__ import annotations

import argparse
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
    from squeeze.formats.packed import save_packed

    out = Path(args.out or tempfile.mkdtemp(prefix="formats-"))
    source = assets.locate("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(source))

    def fp32():
        return AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()

    def size(directory: Path) -> int:
        return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())

    formats.save(fp32(), tokenizer, out / "dense")
    print(f"{'fp32 dense':34s} {size(out / 'dense'):>13,}")
    variants = {
        "int8wo": lambda: WeightOnlyQuantization(bits=8),
        "int4wo g64": lambda: WeightOnlyQuantization(bits=4, group_size=64),
        "int4wo g64 embeddings=false": lambda: WeightOnlyQuantization(bits=4, group_size=64, embeddings=False),
        "dq": lambda: DynamicQuantization(),
    }
    for name, make in variants.items():
        compressor = make()
        model = compressor.finalize(compressor.prepare_model(fp32(), tokenizer))
        new, old = out / (name.replace(" ", "_") + "-new"), out / (name.replace(" ", "_") + "-old")
        formats.save(model, tokenizer, new)
        save_packed(model, tokenizer, old)
        line = f"{name:34s} {size(new):>13,} / {size(old):>13,}"
        if formats.compressed.is_compressed(new):
            reloaded = formats.load(new, "causal_lm").eval()
            with torch.no_grad():
                logits = [reloaded(**tokenizer(s, return_tensors="pt")).logits for s in SENTENCES]
            torch.save(logits, out / f"{new.name}.pt")
            done = subprocess.run([sys.executable, "-c", PLAIN, str(new), str(out / f"{new.name}.pt"), *SENTENCES],
                                  capture_output=True, text=True, check=True)
            diff, scale = done.stdout.split()
            line += f"   max Δlogit {diff} of {scale}"
        else:
            line += "   squeeze's packed format (fallback): not loadable by transformers"
        print(line)
    model = fp32()
    adapter = adapter_for(model)
    weights, transposed = select_weights(model, [adapter.prune_include], [adapter.prune_exclude])
    masks = magnitude_masks(weights, 0.5, "global", None, transposed)
    with torch.no_grad():
        for n, p in weights.items():
            p.masked_fill_(~masks[n], 0)
    formats.save(model, tokenizer, out / "pruned50")
    print(f"{'imp 50% (squeeze sparse)':34s} {size(out / 'pruned50'):>13,}")


if __name__ == "__main__":
    main()
