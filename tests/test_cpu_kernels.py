"""torch's weight-only CPU kernels behind QuantizedLinear (squeeze/formats/quantized_layers.py): on tiny models of
every family they give the dequantized path's logits within bf16 rounding (int8 per channel / per tensor, int4
groups of 32 and 64, symmetric and affine, the lm_head included); layers they cannot take fall back per layer and
kernels_used says so; their packed weights never reach the state dict, so every kernel saves and reloads; and a
run's record carries the kernels its test ran."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, build_tiny, compose_cfg, random_ids
from torch import nn

from squeeze import formats, run
from squeeze.compress import quantization as q
from squeeze.formats import quantized_layers

# bf16 activations (and scales) keep 8 bits of mantissa, ~0.4% per rounding; through the 2-layer tiny models the
# logits moved ≤ 0.7% of the largest one. A wrong scale, zero point or packing moves them by far more than 2%.
BF16_TOLERANCE = 2e-2

FAMILIES = [("tiny_bert", "sequence_classification"), ("tiny_gpt2", "causal_lm"), ("tiny_llama", "causal_lm"),
            ("tiny_opt", "causal_lm")]
SCHEMES = {  # settings of WeightOnlyQuantization, and the kernel they run
    "int8-channel": ({}, "int8pack_mm_bf16"),
    "int8-tensor": ({"granularity": "tensor"}, "int8pack_mm_bf16"),
    "int8-affine": ({"weights": "affine"}, "int8pack_mm_bf16"),
    "int4-g32": ({"bits": 4, "group_size": 32}, "int4pack_mm_bf16"),
    "int4-g64-affine": ({"bits": 4, "group_size": 64, "weights": "affine"}, "int4pack_mm_bf16"),
}


def _quantize(model, **settings):
    c = q.WeightOnlyQuantization(**settings)
    c.name = "wo"
    return c.finalize(model)


def _logits(model, inputs):
    with torch.inference_mode():
        return model(**inputs).logits


def _close(got, want):
    return (got - want).abs().max() <= BF16_TOLERANCE * want.abs().max()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name, head", FAMILIES)
def test_kernels_give_the_dequantized_logits(name, head, scheme):
    settings, kernel = SCHEMES[scheme]
    model = _quantize(build_tiny(name, head)[0], **settings)
    inputs = random_ids(model, batch=1)  # 12 rows: the kernels' side of KERNEL_MAX_ROWS
    fast = _logits(model, inputs)
    expected = {"linear": {kernel: len([m for m in model.modules() if isinstance(m, q.QuantizedLinear)])}}
    if head == "causal_lm":  # the output head (GPT-2's shares its integers with wte) runs the kernel too
        expected = {"linear": {kernel: expected["linear"][kernel] - 1}, "lm_head": {kernel: 1}}
    assert q.kernels_used(model) == expected
    assert q.use_cpu_kernel(model, "dequantize") == sum(expected[k][kernel] for k in expected)
    slow = _logits(model, inputs)
    assert set(q.kernels_used(model)["linear"]) == {"dequantize_fp32"}
    assert _close(fast, slow) and not torch.equal(fast, slow)  # close, and really another path


@pytest.mark.parametrize("bits, group_size, kernel", [(8, None, "int8pack_mm_bf16"), (4, 32, "int4pack_mm_bf16")])
def test_many_rows_take_a_bf16_gemm_where_the_cpu_has_one(bits, group_size, kernel, monkeypatch):
    inputs = random_ids(build_tiny("tiny_llama", "causal_lm")[0], batch=4)  # 48 rows > KERNEL_MAX_ROWS
    ran = {}
    for native in (True, False):
        monkeypatch.setattr(quantized_layers, "cpu_has_bf16_matmul", lambda native=native: native)
        model = _quantize(build_tiny("tiny_llama", "causal_lm")[0], bits=bits, group_size=group_size)
        ran[native] = (_logits(model, inputs), q.kernels_used(model))
    q.use_cpu_kernel(model, "dequantize")
    slow = _logits(model, inputs)
    assert ran[True][1] == {"linear": {"dequantize_bf16": 14}, "lm_head": {"dequantize_bf16": 1}}
    assert ran[False][1] == {"linear": {kernel: 14}, "lm_head": {kernel: 1}}
    assert _close(ran[True][0], slow) and _close(ran[False][0], slow)


LAYERS = {  # a layer's scheme and shape -> the path it runs
    "int4 group 48": ({"bits": 4, "group_size": 48}, 96, 32, "dequantize_fp32"),  # no kernel group (32…256) divides 48
    "int4 group 16": ({"bits": 4, "group_size": 16}, 64, 32, "dequantize_fp32"),
    "int8 rows of 40": ({}, 40, 24, "dequantize_fp32"),  # the int8 kernel steps 16 values at a time, no remainder
    "int8 group 32": ({"group_size": 32}, 96, 24, "dequantize_fp32"),  # it takes one scale per channel
    "int4 group 96": ({"bits": 4, "group_size": 96}, 96, 24, "int4pack_mm_bf16"),  # groups of 32, scales repeated
    "int4 per channel": ({"bits": 4}, 96, 24, "int4pack_mm_bf16"),  # 24 output channels padded to 32 inside
    "int4 per channel, rows of 48": ({"bits": 4}, 48, 8, "int8pack_mm_bf16"),  # 4-bit values, one scale a row
    "int8 per tensor, bias": ({"granularity": "tensor"}, 32, 5, "int8pack_mm_bf16"),
}


@pytest.mark.parametrize("case", LAYERS)
def test_each_layer_runs_the_kernel_its_scheme_and_shape_allow(case):
    settings, cols, rows, kernel = LAYERS[case]
    torch.manual_seed(0)
    holder = _quantize(nn.Sequential(nn.Linear(cols, rows)), **settings)
    x = torch.randn(2, 3, cols)
    with torch.inference_mode():
        fast = holder(x)
        assert q.kernels_used(holder) == {"linear": {kernel: 1}}
        q.use_cpu_kernel(holder, "dequantize")
        slow = holder(x)
    assert fast.shape == slow.shape == (2, 3, rows) and _close(fast, slow)


def test_a_model_counts_the_layers_that_fell_back():
    # An MLP width of 120 is not a multiple of 16: the two down projections (rows of 120) dequantize.
    model = _quantize(build_tiny("tiny_llama", "causal_lm", intermediate_size=120)[0])
    fast = _logits(model, random_ids(model, batch=1))
    assert q.kernels_used(model) == {"linear": {"int8pack_mm_bf16": 12, "dequantize_fp32": 2},
                                     "lm_head": {"int8pack_mm_bf16": 1}}
    q.use_cpu_kernel(model, "dequantize")
    assert _close(fast, _logits(model, random_ids(model, batch=1)))


def test_a_kernel_that_raises_falls_back_with_a_warning(monkeypatch):
    def missing(*args):
        raise RuntimeError("Could not run 'aten::_weight_int8pack_mm' with arguments from the 'CPU' backend.")

    monkeypatch.setattr(quantized_layers, "_INT8_MM", missing)
    model = _quantize(build_tiny("tiny_bert")[0])
    with pytest.warns(RuntimeWarning, match="weight-only CPU kernel failed .Could not run"):
        _logits(model, random_ids(model, batch=1))
    assert q.kernels_used(model) == {"linear": {"dequantize_fp32": 14}}


def test_bf16_inputs_at_any_offset_and_gradients():
    torch.manual_seed(0)
    holder = _quantize(nn.Sequential(nn.Linear(64, 32)))
    layer = holder[0]
    wide = torch.randn(3, 65, dtype=torch.bfloat16)
    x = wide[:, 1:]  # a view 2 bytes past an aligned address: the kernel's aligned loads would crash on it
    with torch.inference_mode():
        fast = layer(x)
    assert fast.dtype == torch.bfloat16 and layer.kernels_ran == {"int8pack_mm_bf16"}
    # The kernels have no backward: an input that wants a gradient takes the dequantized (differentiable) path.
    y = torch.randn(2, 64, requires_grad=True)
    layer(y).sum().backward()
    assert y.grad is not None and "dequantize_fp32" in layer.kernels_ran
    q.use_cpu_kernel(holder, "dequantize")
    with torch.inference_mode():
        assert _close(fast.float(), layer(x).float())


# -- saving: every kernel and backend option -----------------------------------------------------------------
OPTIONS = {  # compressor, settings, what its linears run on the test input
    "int8wo": (q.WeightOnlyQuantization, {}, "int8pack_mm_bf16"),
    "int4wo": (q.WeightOnlyQuantization, {"bits": 4, "group_size": 32, "embeddings": False}, "int4pack_mm_bf16"),
    "int8wo dequantize": (q.WeightOnlyQuantization, {"cpu_kernel": "dequantize"}, "dequantize_fp32"),
    "dq fbgemm": (q.DynamicQuantization, {}, "fbgemm_dynamic_per_token"),
    "dq fbgemm per tensor": (q.DynamicQuantization, {"activations": "tensor"}, "fbgemm_dynamic"),
    "dq torchao": (q.DynamicQuantization, {"backend": "torchao"}, "torchao"),
}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("name, head", [("tiny_llama", "causal_lm"), ("tiny_gpt2", "causal_lm")])
def test_every_kernel_saves_and_reloads_after_it_ran(name, head, option, tmp_path):
    cls, settings, kernel = OPTIONS[option]
    model, tokenizer = build_tiny(name, head)
    c = cls(**settings)
    c.name = option.split()[0]
    c.finalize(model)
    keys = set(model.state_dict())
    inputs = random_ids(model, batch=1)
    before = _logits(model, inputs)  # builds the kernel's packed weight: it must not become model state
    assert set(model.state_dict()) == keys and not any("_cache" in k for k in keys)
    assert set(q.kernels_used(model)["linear"]) == {kernel}
    formats.save(model, tokenizer, tmp_path / "model")  # llama: compressed-tensors; GPT-2 (Conv1D): packed
    back = formats.load(tmp_path / "model", head)
    assert torch.equal(_logits(back, inputs), before)
    assert set(q.kernels_used(back)["linear"]) == {kernel}
    assert {(m.kernel, m.cpu_kernel) for m in back.modules() if isinstance(m, q.QuantizedLinear)} == \
        {(m.kernel, m.cpu_kernel) for m in model.modules() if isinstance(m, q.QuantizedLinear)}


# -- runs ---------------------------------------------------------------------------------------------------
def test_evaluate_records_kernels_and_saves_dq_with_torchao(tmp_path):
    # The reported failure: evaluate.py ckpt=<tiny_bert run> compress=dq compress.dq.backend=torchao tested the
    # model, then failed to save it (torchao's weight had been registered as a parameter of each layer).
    common = [*FAST, "model=tiny_bert", "task=rotten_tomatoes", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1", "perf=null", "callbacks.energy=null"]
    trained = run.train(compose_cfg("train", [*common, "trainer.max_steps=1"], tmp_path / "plain"))
    assert trained["status"] == "ok", trained["error"]
    assert trained["kernels"] is None  # no integer layers
    evaluated = run.evaluate(compose_cfg("eval", [*common, f"ckpt={tmp_path / 'plain'}", "compress=dq",
                                                  "compress.dq.backend=torchao"], tmp_path / "dq"))
    assert evaluated["status"] == "ok", evaluated["error"]
    assert evaluated["kernels"] == {"linear": {"torchao": 14}}
    again = run.evaluate(compose_cfg("eval", [*common, f"ckpt={tmp_path / 'dq'}"], tmp_path / "again"))
    assert again["status"] == "ok", again["error"]
    assert again["kernels"] == evaluated["kernels"]
    assert again["metrics"]["test/loss"] == pytest.approx(evaluated["metrics"]["test/loss"], abs=1e-6)
