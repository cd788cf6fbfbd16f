"""Every compressor and the documented chains on every tiny family, each a short real run (2 steps): it
finishes, its saved model reloads and re-evaluates to the run's own test metrics, and the saved model
holds what the compressor promises (sparsity, fewer heads, a narrower MLP, integer layers in a smaller
directory, fewer layers) and runs the kernels it names. The quantizers' kernel options (dq's torchao
backend, int8wo/int4wo's cpu_kernel=dequantize) are cells too. Every family does every cell; what a 2-layer
model cannot do (PKD's 1-layer student) is refused with one line that says why. Every cell's run is also
exported (squeeze.export) and the last test loads all the exports in a Python without squeeze."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, FAST, compose_cfg, layers_override, random_ids
from plain_transformers import logits_without_squeeze

from squeeze import formats, run
from squeeze.arch import adapter_for
from squeeze.compress.pruning import select_weights
from squeeze.errors import SqueezeError
from squeeze.export import export
from squeeze.formats.quantized_layers import QuantizedLinear, use_cpu_kernel

CHAINS = [
    "none", "imp", "heads", "rows", "qat", "dq", "int8wo", "int4wo", "kd", "pkd",
    "[imp,dq]", "[imp,qat,dq]", "[pkd,imp,dq]", "[heads,imp]", "[heads,int8wo]", "[heads,qat]", "[heads,dq]",
]
QUANTIZERS = {"qat", "dq", "int8wo", "int4wo"}
DISTILLERS = {"kd", "pkd"}
TEACHER_LAYERS = 4  # kd/pkd cells train a 4-layer model: PKD needs a student of 2 (below)
TARGET = 0.7  # conf/compress/imp.yaml's default sparsity
# Two optimizer steps on a few examples: every compressor's hooks run, nothing more.
SHORT = FAST + ["task=rotten_tomatoes", "task.data.max_examples.train=16", "task.data.max_examples.validation=8",
                "task.data.max_examples.test=8", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                "perf=null", "callbacks.energy=null", "logger=csv"]
SETTINGS = {  # what makes a compressor finish within 2 steps
    "imp": ["compress.imp.end_step=1", "compress.imp.frequency=1"],  # the target from step 1 on
    "heads": ["compress.heads.importance_batches=1"],
}
# The quantizers' kernel options, as cells of their own: {cell: (chain, overrides)}.
OPTIONS = {
    "dq-torchao": ("dq", ["compress.dq.backend=torchao"]),
    "int8wo-dequantize": ("int8wo", ["compress.int8wo.cpu_kernel=dequantize"]),
    "int4wo-dequantize": ("int4wo", ["compress.int4wo.cpu_kernel=dequantize"]),
}
# What the integer linear layers of each cell's last quantizer may run in the test (record["kernels"]). The
# CPU kernels take every tiny layer; the test batches have more than KERNEL_MAX_ROWS rows, which run
# dequantize_bf16 where the CPU has native bf16 matmul.
KERNELS = {"dq": {"fbgemm_dynamic_per_token"}, "dq-torchao": {"torchao"}, "int8wo-dequantize": {"dequantize_fp32"},
           "int4wo-dequantize": {"dequantize_fp32"}, "int4wo": {"int4pack_mm_bf16", "dequantize_bf16"},
           "int8wo": {"int8pack_mm_bf16", "dequantize_bf16"}, "qat": {"int8pack_mm_bf16", "dequantize_bf16"}}


def _parts(chain: str) -> list[str]:
    return chain.strip("[]").split(",")


def _train(family: str, chain: str, run_dir, options: tuple[str, ...] = ()):
    overrides = SHORT + [f"model={family}", f"compress={chain}", "trainer.max_steps=2", *options]
    overrides += [s for part in _parts(chain) for s in SETTINGS.get(part, [])]
    if DISTILLERS & set(_parts(chain)):
        overrides.append(layers_override(family, TEACHER_LAYERS))
    return run.train(compose_cfg("train", overrides, run_dir))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """compress=none per family, run once: the dense model every other cell is compared with."""
    done = {}

    def get(family: str):
        if family not in done:
            run_dir = tmp_path_factory.mktemp(f"{family}-none")
            record = _train(family, "none", run_dir)
            assert record["status"] == "ok", record.get("error")
            done[family] = record, run_dir, formats.load(run_dir / "model", "sequence_classification")
        return done[family]
    return get


def _shapes(model):
    adapter = adapter_for(model)
    return [adapter.shape(layer) for _, layer in adapter.layers(model)]


def _sparsity(model) -> float:
    """Zeros among the weights compress=imp selects by default (integer zeros count: they stay zero)."""
    adapter = adapter_for(model)
    weights, _ = select_weights(model, [adapter.prune_include], [adapter.prune_exclude])
    return sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())


# The default suite runs every single compressor on every family and the chains on GPT-2 (Conv1D, the family
# most unlike the others); the chains on the other families run with -m slow (the suite's time budget).
CELLS = [pytest.param(f, c, marks=[pytest.mark.slow] if c.startswith("[") and f != "tiny_gpt2" else [], id=f"{f}-{c}")
         for f in FAMILIES for c in CHAINS]
# The kernel options: each on one family by default (BERT, the compressed-tensors format, for dq's torchao
# backend; GPT-2, the packed format, for cpu_kernel), the rest with -m slow.
_OPTION_FAMILY = {"dq-torchao": "tiny_bert", "int8wo-dequantize": "tiny_gpt2", "int4wo-dequantize": "tiny_gpt2"}
CELLS += [pytest.param(f, c, marks=[] if f == _OPTION_FAMILY[c] else [pytest.mark.slow], id=f"{f}-{c}")
          for f in FAMILIES for c in OPTIONS]


@pytest.mark.parametrize("family, chain", CELLS)
def test_cell(family, chain, baseline, tmp_path):
    base_record, _, dense = baseline(family)
    cell = chain
    chain, options = OPTIONS.get(cell, (cell, []))
    record, run_dir = (base_record, baseline(family)[1]) if chain == "none" else (
        _train(family, chain, tmp_path, tuple(options)), tmp_path)
    assert record["status"] == "ok", record.get("error")
    parts = set(_parts(chain))

    # The saved model re-evaluates (evaluate.py's path, from the run directory) to the run's test metrics.
    evaluated = run.evaluate(compose_cfg("eval", SHORT + [f"model={family}", f"ckpt={run_dir}"], tmp_path / "eval"))
    assert evaluated["status"] == "ok", evaluated.get("error")
    assert record["metrics"]["test/loss"] == pytest.approx(evaluated["metrics"]["test/loss"], abs=1e-5)
    assert evaluated["params"] == record["params"]

    model = formats.load(run_dir / "model", "sequence_classification")
    before, after = _shapes(dense), _shapes(model)
    if parts & DISTILLERS:  # a student of half the teacher's layers, cut from it
        teacher = record["compress"][(parts & DISTILLERS).pop()]["teacher"]
        assert teacher["layers"] == TEACHER_LAYERS and len(after) == TEACHER_LAYERS // 2 == len(before)
        assert record["params"] < teacher["params"]
    else:
        assert len(after) == len(before)
    assert all(a.heads < b.heads if "heads" in parts else a.heads == b.heads for a, b in zip(after, before))
    assert all(a.intermediate < b.intermediate if "rows" in parts else a.intermediate == b.intermediate
               for a, b in zip(after, before))
    if parts & {"heads", "rows"}:
        assert record["params"] < base_record["params"]
    if "imp" in parts:  # quantizing after pruning keeps the zeros (and may round more weights to zero)
        sparsity = _sparsity(model)
        assert sparsity >= TARGET - 0.005 if parts & QUANTIZERS else sparsity == pytest.approx(TARGET, abs=0.005)
    else:  # int4 rounds the smallest weights to zero, nothing else zeroes more than a few %
        assert _sparsity(model) < (0.3 if "int4wo" in parts else 0.05)
    integer = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if parts & QUANTIZERS:
        assert integer and all(m.weight.dtype == torch.int8 for m in integer)
        # The test ran the cell's kernels, and the reloaded model runs them again (kernel and cpu_kernel saved).
        last = [p for p in _parts(chain) if p in QUANTIZERS][-1]
        allowed = KERNELS[cell if cell in OPTIONS else last]
        for ran in (record["kernels"], evaluated["kernels"]):
            assert ran and {k for kinds in ran.values() for k in kinds} <= allowed, ran
    else:
        assert not integer and record["kernels"] is None
    if not parts <= {"none"} | DISTILLERS:  # smaller than the dense run's (a kd student: than its teacher)
        assert record["checkpoint_bytes"] < base_record["checkpoint_bytes"]
    # result.json says whether model/ itself loads in plain transformers: "no" only for squeeze's own formats, and
    # a "yes" is checked by the last test, which loads model/ too.
    plain = record["model_loads_in_transformers"]
    saved = formats.saved_format(run_dir / "model")
    assert plain.startswith("no: ") == (saved in ("squeeze-sparse", "squeeze-packed"))
    assert plain.startswith("with trust_remote_code") == (saved == "dense" and "heads" in parts
                                                         and family != "tiny_llama")
    _export(f"{family}-{cell}", run_dir, model, tmp_path, also=run_dir / "model" if plain.startswith("yes") else None)


# (cell, export directory, input ids, squeeze's logits, tolerance): every cell's export, for the last test.
EXPORTED: list[tuple[str, object, torch.Tensor, torch.Tensor, float]] = []


def _export(cell: str, run_dir, model, tmp_path, also=None) -> None:
    summary = export(run_dir, tmp_path / "export")
    assert summary["format"] in ("dense", "compressed-tensors") and summary["head"] == "sequence_classification"
    inputs_rounded = any(isinstance(m, QuantizedLinear) and (m.kernel.startswith("dynamic") or m.input_scale is not None)
                         for m in model.modules())
    use_cpu_kernel(model, "dequantize")  # weight-only layers in fp32, as transformers' dequantized weights run
    ids = random_ids(model, batch=2, length=12, low=1)["input_ids"]
    with torch.no_grad():
        own = model.eval()(input_ids=ids).logits
    # The same arithmetic: float rounding; inputs quantized (dq, qat): the two libraries' int8 activation paths
    # differ by a rounding step (≤ 2 % of the largest logit measured in tests/test_formats.py).
    tol = 0.05 if inputs_rounded else 1e-5
    for directory, what in ((tmp_path / "export", "export"), (also, "model/")):
        if directory is not None:
            EXPORTED.append((f"{cell} {what}", directory, ids, own, tol))


def test_every_cell_exports_a_model_plain_transformers_loads_with_the_same_logits(tmp_path):
    if not EXPORTED:
        pytest.skip("needs test_cell's exports: run the whole file (pytest tests/test_matrix.py)")
    got = logits_without_squeeze([(d, "sequence_classification", ids) for _, d, ids, _, _ in EXPORTED], tmp_path)
    errors = {cell: float((plain - own).abs().max() / own.abs().max().clamp_min(1e-6))
              for (cell, _, _, own, _), plain in zip(EXPORTED, got)}
    assert all(errors[cell] <= tol for cell, _, _, _, tol in EXPORTED), errors


@pytest.mark.parametrize("family", FAMILIES)
def test_pkd_refuses_the_one_layer_student_of_a_two_layer_model(family, tmp_path):
    # Half of 2 layers is 1: its only layer is the top, which the KD loss already matches.
    with pytest.raises(SqueezeError, match="pkd: a 1-layer student has no layer below its top to match; give "
                                           "more student layers, an explicit strategy"):
        run.train(compose_cfg("train", SHORT + [f"model={family}", "compress=pkd"], tmp_path))
