"""squeeze/formats: integer weights in compressed-tensors load in plain transformers (a Python that never
imports squeeze) with squeeze's outputs; squeeze's loader gives back its integer layers bit for bit;
what compressed-tensors cannot express falls back to squeeze's packed format; files get the umask's mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from plain_transformers import logits_without_squeeze

from squeeze import formats
from squeeze.compress import quantization as q
from squeeze.errors import SqueezeError
from squeeze.formats.compressed import is_compressed
from squeeze.formats.packed import PACKED_FILE, is_packed


def _quantized(name, head, compressor):
    model, tokenizer = build_tiny(name, head)
    compressor.name = "q"
    compressor.prepare_model(model, tokenizer)
    return compressor.finalize(model), tokenizer


# Weight-only: both loaders dequantize the same integers with the same scales in fp32 (squeeze with
# cpu_kernel=dequantize: its CPU kernels would round activations to bf16), so the logits agree to float
# rounding (1e-5). dq: squeeze runs fbgemm's int8 kernel (8-bit activations per token, integer
# accumulation), transformers fake-quantizes the inputs to 8 bits per token in float: the activation
# rounding differs by up to a step, which measured ≤ 2.1% of the largest logit on these models; 5% allowed.
@pytest.mark.parametrize("name,head,make,tol", [
    ("tiny_llama", "causal_lm", lambda: q.WeightOnlyQuantization(cpu_kernel="dequantize"), 1e-5),
    ("tiny_llama", "causal_lm", lambda: q.WeightOnlyQuantization(bits=4, group_size=32, embeddings=False,
                                                                 cpu_kernel="dequantize"), 1e-5),
    ("tiny_bert", "sequence_classification", lambda: q.WeightOnlyQuantization(granularity="tensor", weights="affine",
                                                                             cpu_kernel="dequantize"), 1e-5),
    ("tiny_llama", "causal_lm", lambda: q.DynamicQuantization(), 0.05),
])
def test_transformers_alone_loads_the_quantized_model(name, head, make, tol, tmp_path):
    model, tokenizer = _quantized(name, head, make())
    directory = tmp_path / "model"
    formats.save(model, tokenizer, directory)
    assert is_compressed(directory) and not is_packed(directory)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    back = formats.load(directory, head)
    with torch.no_grad():
        own = back(input_ids=ids).logits
    assert torch.equal(own, before)  # squeeze's loader: the same integer layers and kernels
    for (n, m), (_, b) in zip(model.named_modules(), back.named_modules()):
        if isinstance(m, q.QuantizedLinear):
            assert type(b) is q.QuantizedLinear and b.kernel == m.kernel and torch.equal(b.weight, m.weight)
    plain = logits_without_squeeze([(directory, head, ids)], tmp_path / "plain")[0]
    assert (plain - own).abs().max() <= tol * own.abs().max()


def test_what_compressed_tensors_cannot_hold_stays_packed(tmp_path):
    model, tokenizer = _quantized("tiny_gpt2", "causal_lm", q.WeightOnlyQuantization())
    assert "Conv1D" in formats.why_not_compressed(model)
    formats.save(model, tokenizer, tmp_path / "gpt2")
    assert is_packed(tmp_path / "gpt2") and not is_compressed(tmp_path / "gpt2")
    llama, tokenizer = _quantized("tiny_llama", "causal_lm", q.WeightOnlyQuantization(bits=4, group_size=32))
    assert "int4 embedding" in formats.why_not_compressed(llama)


def test_weight_files_get_the_umask_mode(tmp_path):
    model, tokenizer = _quantized("tiny_llama", "causal_lm", q.WeightOnlyQuantization())
    old = os.umask(0o022)
    try:
        formats.save(model, tokenizer, tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_the_directory_names_its_format_and_untagged_ones_are_read_by_their_files(tmp_path):
    dense, tokenizer = build_tiny("tiny_gpt2", "causal_lm")
    pruned, _ = build_tiny("tiny_gpt2", "causal_lm")
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            if name.endswith("c_fc.weight"):
                p.masked_fill_(p.abs() < p.abs().median(), 0)  # half the MLP's inputs: stored sparse
    saved = {"dense": dense, "squeeze-sparse": pruned,
             "squeeze-packed": _quantized("tiny_gpt2", "causal_lm", q.WeightOnlyQuantization())[0],  # Conv1D
             "compressed-tensors": _quantized("tiny_llama", "causal_lm", q.WeightOnlyQuantization())[0]}
    for fmt, model in saved.items():
        formats.save(model, tokenizer, tmp_path / fmt)
        assert json.loads((tmp_path / fmt / formats.TAG_FILE).read_text()) == {"format": fmt}
        assert formats.saved_format(tmp_path / fmt) == fmt
    # The tag decides, not the files: a stray packed file beside a dense model is not read.
    stray = tmp_path / "dense" / PACKED_FILE
    stray.write_bytes((tmp_path / "squeeze-packed" / PACKED_FILE).read_bytes())
    back = formats.load(tmp_path / "dense", "causal_lm")
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in back.state_dict().items())
    stray.unlink()
    # Saved before squeeze wrote tags: the files say which format, as they always did.
    for fmt, model in saved.items():
        (tmp_path / fmt / formats.TAG_FILE).unlink()
        assert formats.saved_format(tmp_path / fmt) == fmt
        back = formats.load(tmp_path / fmt, "causal_lm")
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    (tmp_path / "dense" / formats.TAG_FILE).write_text('{"format": "squeeze-future"}')
    with pytest.raises(SqueezeError, match="'squeeze-future' format, which this squeeze cannot read .*dense"):
        formats.load(tmp_path / "dense", "causal_lm")


def test_formats_import_no_model_builder():
    # squeeze.models builds models from configs; formats sit below it (and below the compressors).
    code = "import sys, squeeze.formats; print(sorted(m for m in sys.modules if m in ('squeeze.models', "
    code += "'squeeze.compress', 'squeeze.run')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
