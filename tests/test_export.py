"""squeeze.export: every post-training compressor's model (tests/test_matrix.py exports the trained ones), a head
or head-dim pruned model, integer layers compressed-tensors cannot hold, and --format transformers, each loaded by
plain transformers in a Python that cannot import squeeze, with squeeze's logits; what was given up is said; bad
input is one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import build_tiny, random_ids, tiny_family, token_batches
from plain_transformers import logits_without_squeeze

from squeeze import formats
from squeeze.arch import adapter_for
from squeeze.compress.awq import AWQ
from squeeze.compress.gptq import GPTQ
from squeeze.compress.quantization import DynamicQuantization, WeightOnlyQuantization
from squeeze.compress.smoothquant import SmoothQuant
from squeeze.compress.sparsegpt import SparseGPT
from squeeze.compress.structured import surgery
from squeeze.compress.wanda import Wanda
from squeeze.errors import SqueezeError
from squeeze.export import EXPORT_FILE, export
from squeeze.export.__main__ import main
from squeeze.formats.quantized_layers import use_cpu_kernel

FAMILIES = ("bert", "gpt2", "llama", "opt")
HEAD = {"bert": "sequence_classification"}


def _calibrated(*make):
    def build(model):
        for compressor in make:
            c = compressor()
            c.name = type(c).__name__.lower()
            if hasattr(c, "use_batches"):
                c.use_batches(token_batches(n=2, batch=2, length=16))
            model = c.finalize(model)
        return model
    return build


def _pruned_attention(model):
    """Heads removed from layer 0 and head dims from layer 1 (a different attention size in each layer)."""
    adapter = adapter_for(model)
    surgery.prune_heads(model, adapter, {0: [0, 2]}, "test")
    surgery.prune_head_dims(model, adapter, {1: 4})
    surgery.record_shapes(model, adapter, "test")
    return model


def _quantized(model, **settings):
    c = WeightOnlyQuantization(**settings)
    c.name = "int8wo"
    return c.finalize(model)


POST_TRAINING = {
    "gptq": _calibrated(lambda: GPTQ(group_size=32)),
    "awq": _calibrated(lambda: AWQ(group_size=32)),
    "[smoothquant,dq]": _calibrated(lambda: SmoothQuant(0.8), DynamicQuantization),
    "wanda": _calibrated(Wanda),
    "sparsegpt": _calibrated(SparseGPT),
}
# What each export gives up, by the phrases of its lines (none: the same integers, in compressed-tensors).
GIVEN_UP = {"gptq": [], "awq": ["affine int4"], "[smoothquant,dq]": [], "wanda": ["stored densely"],
            "sparsegpt": ["stored densely"]}
# GPT-2's layer stack is Conv1D (quantized as from_conv1d Linear layers), which compressed-tensors does not
# quantize: dequantized; dq's embeddings and LM head stay int8 in compressed-tensors.
GPT2 = {"gptq": ["Conv1D"], "awq": ["Conv1D"], "[smoothquant,dq]": ["Conv1D"]}
# name: (family, build, --format, the export's format, phrases of what it gives up)
# The one-shot pruners' exports are the same dense save on every family: each on two (the suite's time budget).
PRUNER_FAMILIES = {"wanda": ("bert", "gpt2"), "sparsegpt": ("llama", "opt")}
CASES = {}
for family in FAMILIES:
    for name, build in POST_TRAINING.items():
        if family not in PRUNER_FAMILIES.get(name, FAMILIES):
            continue
        phrases = GPT2.get(name, GIVEN_UP[name]) if family == "gpt2" else GIVEN_UP[name]
        integers_left = name == "[smoothquant,dq]" or not phrases
        CASES[f"{family}-{name}"] = (family, build, "compressed-tensors",
                                     "compressed-tensors" if integers_left else "dense", phrases)
CASES.update({
    "llama-int4 affine with int4 embeddings": ("llama", lambda m: _quantized(m, bits=4, group_size=32, weights="affine"),
                                               "compressed-tensors", "dense", ["int4 embedding", "affine int4"]),
    "llama-[wanda,int8wo]": ("llama", lambda m: _quantized(_calibrated(Wanda)(m)), "compressed-tensors",
                             "compressed-tensors", ["stored densely"]),
    "gpt2-int8wo --format transformers": ("gpt2", _quantized, "transformers", "dense", ["--format transformers"]),
    "llama-dq --format transformers": ("llama", _calibrated(DynamicQuantization), "transformers", "dense",
                                       ["--format transformers", "input quantization"]),
})
for family in ("bert", "gpt2", "opt"):
    CASES[f"{family}-heads and head dims"] = (family, _pruned_attention, "compressed-tensors", "dense",
                                              ["zero rows and columns"])
    CASES[f"{family}-heads and head dims, int8wo"] = (family, lambda m: _quantized(_pruned_attention(m)),
                                                     "compressed-tensors", "dense",
                                                     ["zero rows and columns", "restored as zeros, which needs float"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case saved as a run's model/, exported, with squeeze's own logits; then one clean interpreter's."""
    root = tmp_path_factory.mktemp("export")
    done = {}
    for name, (family, build, fmt, _, _) in CASES.items():
        head = HEAD.get(family, "causal_lm")
        model = build(tiny_family(family))
        tokenizer = build_tiny(f"tiny_{family}", head)[1]
        run_dir = root / name.replace(" ", "_").replace(",", "")
        formats.save(model, tokenizer, run_dir / "model")
        summary = export(run_dir, run_dir / "export", fmt)
        own_model = formats.load(run_dir / "model", head).eval()
        inputs_rounded = any(getattr(m, "kernel", "").startswith("dynamic") for m in own_model.modules())
        use_cpu_kernel(own_model, "dequantize")  # weight-only layers in fp32, as dequantized weights run
        ids = random_ids(own_model, low=1)["input_ids"]
        with torch.no_grad():
            own = own_model(input_ids=ids).logits
        done[name] = {"run": run_dir, "head": head, "ids": ids, "own": own, "summary": summary,
                      "tol": 0.05 if inputs_rounded else 1e-5}
    plain = logits_without_squeeze([(c["run"] / "export", c["head"], c["ids"]) for c in done.values()], root / "child")
    for case, logits in zip(done.values(), plain):
        case["plain"] = logits
    return done


@pytest.mark.parametrize("name", list(CASES))
def test_the_export_loads_without_squeeze_with_squeezes_logits(name, exported):
    case = exported[name]
    error = float((case["plain"] - case["own"]).abs().max() / case["own"].abs().max())
    assert error <= case["tol"], error
    config = json.loads((case["run"] / "export" / "config.json").read_text())
    assert "auto_map" not in config and "attention_layout" not in config  # stock classes, no remote code
    summary = case["summary"]
    assert json.loads((case["run"] / "export" / EXPORT_FILE).read_text()) == summary
    *_, fmt, phrases = CASES[name]
    assert summary["format"] == fmt
    given_up = " ".join(summary["given_up"])
    assert all(p in given_up for p in phrases) and (phrases or not given_up), summary["given_up"]


def test_a_quantized_export_is_smaller_than_a_float_one(tmp_path):
    model = _quantized(tiny_family("llama"))
    tokenizer = build_tiny("tiny_llama", "causal_lm")[1]
    formats.save(model, tokenizer, tmp_path / "run" / "model")
    kept = export(tmp_path / "run", tmp_path / "ct")
    floated = export(tmp_path / "run", tmp_path / "float", "transformers")
    assert kept["format"] == "compressed-tensors" and floated["format"] == "dense"
    assert kept["bytes"] < 0.5 * floated["bytes"]


def test_the_command_line_says_what_it_wrote_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    model = tiny_family("gpt2")
    tokenizer = build_tiny("tiny_gpt2", "causal_lm")[1]
    formats.save(_quantized(model), tokenizer, tmp_path / "run" / "model")
    assert main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "AutoModelForCausalLM.from_pretrained" in out and "given up: integer storage" in out
    assert main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0  # an earlier export is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for args, message in (([str(tmp_path / "run"), str(tmp_path / "other")], "is not an earlier export"),
                          ([str(tmp_path / "run"), str(tmp_path / "run" / "model" / "x")], "inside the model"),
                          ([str(tmp_path / "nothing"), str(tmp_path / "o2")], "does not exist")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(SqueezeError, match="--format 'onnx' is not one of"):
        export(tmp_path / "run", tmp_path / "o3", "onnx")
