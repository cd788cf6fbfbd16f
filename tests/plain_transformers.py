"""Loading saved or exported models in a Python that cannot import squeeze: the user's side of `from_pretrained`.

`logits_without_squeeze` starts one child interpreter (squeeze blocked on its import path, so neither the model
directory nor transformers can reach it, and no trust_remote_code) that loads every directory with its Auto
class and returns each model's logits on the given input ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

AUTO = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification",
        "token_classification": "AutoModelForTokenClassification", "masked_lm": "AutoModelForMaskedLM"}

_CHILD = r"""
import json, sys


class NoSqueeze:
    def find_spec(self, name, path=None, target=None):
        if name == "squeeze" or name.startswith("squeeze."):
            raise ImportError("squeeze is hidden in this interpreter")


sys.meta_path.insert(0, NoSqueeze())
import torch, transformers

cases, out = json.loads(sys.argv[1]), []
for directory, auto, ids in cases:
    model = getattr(transformers, auto).from_pretrained(directory).eval()
    with torch.no_grad():
        out.append(model(input_ids=torch.load(ids)).logits)
assert not any(m == "squeeze" or m.startswith("squeeze.") for m in sys.modules)
torch.save(out, sys.argv[2])
"""


def logits_without_squeeze(cases: list[tuple[Path, str, torch.Tensor]], scratch: Path) -> list[torch.Tensor]:
    """[(model directory, head, input ids)] → the logits plain transformers computes for each."""
    scratch.mkdir(parents=True, exist_ok=True)
    args = []
    for i, (directory, head, ids) in enumerate(cases):
        torch.save(ids, scratch / f"ids{i}.pt")
        args.append((str(directory), AUTO[head], str(scratch / f"ids{i}.pt")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args), str(scratch / "logits.pt")],
                          capture_output=True, text=True, cwd=scratch, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(scratch / "logits.pt")
